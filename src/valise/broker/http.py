"""A minimal HTTP/1.1 GET server for the log's read side (C2SP tlog-tiles), on trio.

Only what a tiles client needs: GET and HEAD of static-looking paths, keep-alive, nothing else. The request head
is capped (8 KiB) and must arrive within a deadline, each answer must be taken within another, and connections are
capped (the oldest goes first), so a slow or hostile client costs one small buffer, one task and one descriptor
for a bounded time; the content is public, so there is no authentication here. The tiles spec asks for
immutable caching of full tiles; the checkpoint must not be cached.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from valise.broker.fds import listen_tcp

log = logging.getLogger("valise.http")

MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0  # a client that reads nothing of an answer for this long is closed
MAX_REQUESTS_PER_CONNECTION = 1000
MAX_CONNECTIONS = 1024  # past this the oldest connection is closed (the daemon may set a lower cap)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/octet-stream"
    immutable: bool = False


Resolver = Callable[[str], Awaitable[Response]]

REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


def _render(resp: Response, *, head_only: bool, keep_alive: bool) -> bytes:
    cache = "public, max-age=604800, immutable" if resp.immutable else "no-store"
    lines = [
        f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Error')}",
        f"Content-Type: {resp.content_type}",
        f"Content-Length: {len(resp.body)}",
        f"Cache-Control: {cache}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + resp.body


def _text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode(), "text/plain; charset=utf-8")


async def _read_head(stream: trio.abc.Stream, buf: bytearray) -> bytes | None:
    """Read one request head (up to the blank line). None at a clean EOF before any byte."""
    while True:
        # RFC 9112 §2.2: a server MAY take a bare LF for CRLF; some scripts and tools send only LF.
        ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n", b"\n\r\n") if (i := buf.find(sep)) >= 0]
        if ends:
            end, length = min(ends)
            head = bytes(buf[:end])
            del buf[: end + length]
            return head
        if len(buf) > MAX_HEAD:
            raise ValueError("request head too large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            if buf:
                raise ValueError("connection closed inside a request head")
            return None
        buf += chunk


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    """Write an answer; a client that does not take it within WRITE_TIMEOUT is broken off (it would otherwise hold
    its task and descriptor for as long as it likes, whatever the other deadlines say)."""
    with trio.move_on_after(WRITE_TIMEOUT) as scope:
        await stream.send_all(data)
    if scope.cancelled_caught:
        raise trio.BrokenResourceError(f"the client took nothing for {WRITE_TIMEOUT:g} s")


async def _refuse(stream: trio.abc.Stream, status: int, message: str) -> None:
    """Answer with an error and close gracefully: drain briefly what the client still sends, so the kernel does
    not reset the connection (and discard our answer) because of unread bytes."""
    await _send(stream, _render(_text(status, message), head_only=False, keep_alive=False))
    if isinstance(stream, trio.SocketStream):
        await stream.send_eof()
        with trio.move_on_after(1.0):
            drained = 0
            while drained < 1 << 20 and (chunk := await stream.receive_some(65536)):
                drained += len(chunk)


async def handle_connection(stream: trio.abc.Stream, resolve: Resolver) -> None:
    buf = bytearray()
    try:
        for served in range(1, MAX_REQUESTS_PER_CONNECTION + 1):
            with trio.move_on_after(HEAD_TIMEOUT) as scope:
                try:
                    head = await _read_head(stream, buf)
                except ValueError as exc:
                    await _refuse(stream, 400, str(exc))
                    return
            if scope.cancelled_caught or head is None:
                return
            lines = [line.removesuffix("\r") for line in head.decode("latin-1").split("\n")]
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                await _refuse(stream, 400, "malformed request line")
                return
            method, target, version = parts
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            if "content-length" in headers or "transfer-encoding" in headers:
                # GET with a body is never needed here; refusing it avoids request smuggling questions.
                await _refuse(stream, 400, "request bodies are not accepted")
                return
            keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
            keep_alive = keep_alive and served < MAX_REQUESTS_PER_CONNECTION  # the last answer says we close
            if method not in ("GET", "HEAD"):
                resp = _text(405, "only GET and HEAD are served")
            else:
                path = target.split("?", 1)[0]
                try:
                    resp = await resolve(path)
                except Exception:
                    log.exception("http: resolving %s failed", path)
                    resp = _text(500, "internal error")
            await _send(stream, _render(resp, head_only=method == "HEAD", keep_alive=keep_alive))
            if not keep_alive:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def serve(
    resolve: Resolver,
    host: str,
    port: int,
    *,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound port through `task_status`.

    At most `max_connections` at once: a newcomer past the cap closes the oldest connection, so a flood of held
    connections delays a reader by one eviction instead of using up the process's descriptors."""
    listeners = await listen_tcp(host, port, "--http")
    task_status.started(listeners[0].socket.getsockname()[1])
    open_ones: dict[trio.CancelScope, None] = {}  # insertion order: oldest first

    async def handler(stream: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        open_ones[scope] = None
        if len(open_ones) > max_connections:
            oldest = next(iter(open_ones))
            del open_ones[oldest]
            oldest.cancel()
        try:
            with scope:
                await handle_connection(stream, resolve)  # closes the stream however it ends
        finally:
            open_ones.pop(scope, None)

    await trio.serve_listeners(handler, listeners)
