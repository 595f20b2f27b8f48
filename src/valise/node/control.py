"""The node's local control channel: framing over a Unix socket (an I/O edge; specs/protocol.md, "Control").

Frames are a 4-byte big-endian length and a canonical msgpack map. A request is one map with an "op"; bulk data
(a payload to send, a plaintext being read) follows as {"op": "data", "data": bytes} frames and one
{"op": "end"} frame, so a file of any size streams through in bounded memory. Replies carry "ok": true, or
"ok": false with "error" (a message for a person) and "code" (the process exit code the CLI should use).

The socket file is created mode 0600 inside the node directory: only the node's own user can drive it, and
the daemon holds the unlocked keys, so the CLI never needs the passphrase.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import trio

from valise import encoding
from valise.errors import LimitError, WireError

log = logging.getLogger("valise.node")

MAX_FRAME = 1 << 20  # a control frame; bulk data is split into chunks of at most CHUNK
# Control connections served at once; more wait in the listen backlog until one ends. Each holds a descriptor
# and a task (and in `send` and `read` a worker thread) for up to a minute when idle.
MAX_CONNECTIONS = 128
# What accept() says when the process or the system is out of room, not that the listener broke: wait, accept
# again (as trio.serve_listeners does). Raised, they stopped the node daemon, broker connection and all.
_OUT_OF_ROOM = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY = 0.1
CHUNK = 512 * 1024


class PeerStalled(WireError):
    """The peer took nothing for too long while we wrote a frame: the stream may end inside that frame, so nothing
    more can be written to it (an error answer after it would be read as garbage)."""


async def send_msg(stream: trio.abc.SendStream, message: dict[str, Any], *, within: float | None = None) -> None:
    """Send one message; with `within`, a peer that takes nothing for that long is PeerStalled."""
    body = encoding.pack(message)
    if len(body) > MAX_FRAME:
        raise LimitError(f"control message of {len(body)} bytes is over the limit of {MAX_FRAME}")
    with trio.move_on_after(math.inf if within is None else within) as scope:
        await stream.send_all(len(body).to_bytes(4, "big") + body)
    if scope.cancelled_caught:
        raise PeerStalled(f"the control client took nothing for {within:g} s")


class RateFloor:
    """A data stream's pace, held to `min_rate` bytes a second on average once `grace` seconds have passed.

    An idle limit per frame alone lets a client that trickles a byte (or takes a frame) now and then keep the
    stream, and the worker thread sealing or opening it, for good. Time is passed in."""

    def __init__(self, min_rate: int, grace: float, now: float) -> None:
        self.min_rate, self.grace, self.began, self.moved = min_rate, grace, now, 0

    def add(self, n: int, now: float, *, what: str) -> None:
        """Count `n` more bytes moved at `now`; a WireError if the stream is too slow."""
        self.moved += n
        elapsed = now - self.began
        if elapsed > self.grace and self.moved < self.min_rate * elapsed:
            raise WireError(
                f"the control client {what} {self.moved} bytes in {elapsed:.0f} s, under the "
                f"{self.min_rate // 1024} KiB/s a data stream needs (valise send and read go at disk speed)"
            )


class MessageReader:
    """Reads frames from a stream, buffering at most one frame. With `idle`, a peer that sends nothing for that
    long is a WireError (the daemon's side: a stalled local client must not hold a task, and for `send` a
    worker thread, for good; the CLI waits as long as its `--wait` says)."""

    def __init__(
        self, stream: trio.abc.ReceiveStream, *, idle: float | None = None, min_rate: int | None = None
    ) -> None:
        """`min_rate`: bytes a second a data stream must average once `idle` seconds have passed since it began.
        The idle limit alone let a client that trickles a byte now and then hold a worker thread for good."""
        self._stream = stream
        self._buf = bytearray()
        self._idle = math.inf if idle is None else idle
        self._min_rate = min_rate

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            with trio.move_on_after(self._idle) as scope:
                chunk = await self._stream.receive_some(max(65536, n - len(self._buf)))
            if scope.cancelled_caught:
                raise WireError(f"the control client sent nothing for {self._idle:g} s")
            if not chunk:
                return False
            self._buf += chunk
        return True

    async def next(self) -> dict[str, Any] | None:
        """The next message, or None at a clean end of stream."""
        if not await self._fill(4):
            if self._buf:
                raise WireError("control connection closed inside a frame length")
            return None
        size = int.from_bytes(self._buf[:4], "big")
        if size > MAX_FRAME:
            raise LimitError(f"control frame of {size} bytes is over the limit of {MAX_FRAME}")
        if not await self._fill(4 + size):
            raise WireError("control connection closed inside a frame")
        body = bytes(self._buf[4 : 4 + size])
        del self._buf[: 4 + size]
        value = encoding.unpack(body, what="control message", max_size=MAX_FRAME)
        if not isinstance(value, dict) or not isinstance(value.get("op", value.get("ok")), str | bool):
            raise WireError("control message is not a map with 'op' or 'ok'")
        return value

    async def data(self) -> AsyncGenerator[bytes, None]:
        """Yield the bytes of the `data` frames up to the `end` frame."""
        floor = None if self._min_rate is None else RateFloor(self._min_rate, self._idle, trio.current_time())
        while True:
            msg = await self.next()
            if msg is None:
                raise WireError("control connection closed inside a data stream")
            if msg.get("op") == "end":
                return
            chunk = msg.get("data")
            if msg.get("op") != "data" or not isinstance(chunk, bytes):
                raise WireError("expected a data or end frame in a data stream")
            if floor is not None:
                floor.add(len(chunk), trio.current_time(), what="sent")
            yield chunk


async def send_data(stream: trio.abc.SendStream, source: Any) -> None:
    """Stream a binary file-like object as data frames and an end frame."""
    while chunk := source.read(CHUNK):
        await send_msg(stream, {"op": "data", "data": chunk})
    await send_msg(stream, {"op": "end"})


def socket_path(node_dir: Path) -> Path:
    return node_dir / "control.sock"


# sun_path holds 108 bytes on Linux (104 on BSDs); refuse early with advice instead of a cryptic OSError.
MAX_SOCKET_PATH = 100


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise LimitError(
            f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes", hint="use a shorter node directory"
        )


def _remove_stale(path: Path) -> None:
    # Only a socket left by a dead daemon is removed; a running daemon holds a lock (see node/daemon.py).
    if path.is_socket():
        path.unlink()


# Connections the kernel queues before the daemon accepts them: scripts start many `valise` commands at once.
# Past it a client retries (cli/node.py), so this only saves round trips.
LISTEN_BACKLOG = 128


async def listen(path: Path) -> trio.SocketListener:
    """Bind the control socket with mode 0600 from the start (umask), replacing a stale socket file."""
    check_socket_path(path)
    _remove_stale(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(LISTEN_BACKLOG)
    return trio.SocketListener(sock)


async def connect(path: Path) -> trio.SocketStream:
    check_socket_path(path)
    return await trio.open_unix_socket(str(path))


async def serve(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    *,
    limit: int = MAX_CONNECTIONS,
) -> NoReturn:
    """Serve each connection `listener` accepts in its own task, at most `limit` at once. Out of descriptors, it
    waits and accepts again: a burst of local clients (a script running `valise send` in parallel) must not stop
    the daemon, whose broker connection and outbox serve everyone else (a concurrency review)."""
    slots = trio.Semaphore(limit)
    said = False  # one log line per shortage, not one per retry
    async with trio.open_nursery() as nursery:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _OUT_OF_ROOM:
                    raise
                if not said:
                    log.error("control socket: cannot accept (%s); trying again every %g s", exc, ACCEPT_RETRY)
                    said = True
                await trio.sleep(ACCEPT_RETRY)
                continue
            said = False
            nursery.start_soon(_serve_one, handler, stream, slots)


async def _serve_one(
    handler: Callable[[trio.SocketStream], Awaitable[object]], stream: trio.SocketStream, slots: trio.Semaphore
) -> None:
    try:
        await handler(stream)
    finally:
        slots.release()
