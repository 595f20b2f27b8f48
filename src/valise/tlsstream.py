"""TLS for trio on a non-blocking `ssl.SSLSocket`: OpenSSL reads and writes the socket itself (an I/O edge).

`trio.SSLStream` drives an `SSLObject` through memory BIOs in Python: each receive or send is several Python-level
steps (the BIO, the socket wrapper, the retry loop). The broker makes a few of each per packet for each of hundreds
of members, and its one thread is what limits it; letting OpenSSL do the socket I/O costs about 13 µs less per
receive-and-send pair (35 → 22 µs of the server's CPU for a 1 KiB echo over loopback). The contexts, certificates,
pinning and ALPN are the same (`valise.tls`); only who moves the bytes changes.

Semantics follow trio's streams: every call is a checkpoint; a peer's close_notify is end of stream (b""); an
EOF without one, a reset or a TLS alert is `trio.BrokenResourceError`; a closed stream raises
`trio.ClosedResourceError`. A send cut short (cancelled, or failed) breaks the stream: OpenSSL requires a
partial record to be retried with the same bytes, which a later send would not do.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

import trio

DEFAULT_READ = 64 * 1024
# SSL_read may want to write (and SSL_write to read) only in rare post-handshake exchanges; the other direction's
# task may be waiting on the socket meanwhile, so the retry polls instead of waiting on the same socket twice.
_POLL = 0.001

T = TypeVar("T")


class TLSSocketStream(trio.abc.Stream):
    """A TLS connection over a socket taken from a `trio.SocketStream` (which must not be used afterwards)."""

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self._tls = tls
        self._closed = False
        self._broken: BaseException | None = None
        self._sending = False
        self._receiving = False

    @classmethod
    def wrap(cls, stream: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool) -> TLSSocketStream:
        """Take the socket out of `stream` and put TLS on it; `trio.BrokenResourceError` if the peer is already
        gone (then the socket is closed, and `stream` holds nothing to close)."""
        raw = stream.socket
        family, type_, proto = raw.family, raw.type, raw.proto
        sock = socket.socket(family, type_, proto, fileno=raw.detach())
        try:
            # Checked here first: `wrap_socket` checks too, but if that fails it leaves the socket it made to the
            # garbage collector (a reset can still come between the two; then the collector closes it).
            sock.getpeername()
            sock.setblocking(False)
            tls = context.wrap_socket(
                sock, server_side=server_side, do_handshake_on_connect=False, suppress_ragged_eofs=False
            )
        except OSError as exc:  # ssl.SSLError included ("closed before TLS handshake with data in recv buffer")
            sock.close()
            raise trio.BrokenResourceError(f"the connection was lost before TLS: {exc}") from exc
        except BaseException:  # a context that cannot wrap this socket (ValueError): not ours to keep open either
            sock.close()
            raise
        return cls(tls)

    # --- what the broker reads off the handshake ------------------------------------------------------------

    def getpeercert(self, binary_form: bool = True) -> bytes | None:
        assert binary_form
        return self._tls.getpeercert(binary_form=True)

    def selected_alpn_protocol(self) -> str | None:
        return self._tls.selected_alpn_protocol()

    # --- the stream -----------------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"the TLS stream broke earlier: {self._broken}")

    async def _io(self, op: Callable[[], T], what: str, *, reading: bool) -> T:
        """Run `op` (an SSLSocket call) until it completes, waiting on the socket as OpenSSL asks. The direction
        this call is not for is polled instead of waited on: SSL_read may want to write (and SSL_write to read)
        only in rare post-handshake exchanges, and another task may be waiting on the socket that way already
        (trio allows one waiter per direction)."""
        while True:
            try:
                return op()
            except ssl.SSLWantReadError:
                if reading:
                    await trio.lowlevel.wait_readable(self._tls)
                else:
                    await trio.sleep(_POLL)
            except ssl.SSLWantWriteError:
                if reading:
                    await trio.sleep(_POLL)
                else:
                    await trio.lowlevel.wait_writable(self._tls)
            except OSError as exc:  # ssl.SSLError included: an alert, a refused certificate, garbage, a reset
                if self._closed:
                    raise trio.ClosedResourceError("the TLS stream was closed") from None
                raise trio.BrokenResourceError(f"TLS {what} failed: {exc}") from exc

    async def do_handshake(self) -> None:
        self._check()
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            # (A handshake message waits for room in the socket's send buffer only if the peer reads nothing;
            # a poll is good enough there.)
            await self._io(self._tls.do_handshake, "handshake", reading=True)
        except trio.BrokenResourceError as exc:
            self._broken = exc
            raise
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check()
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this TLS stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        size = max_bytes or DEFAULT_READ
        try:
            data = await self._io(functools.partial(self._tls.recv, size), "receive", reading=True)
        except trio.BrokenResourceError as exc:
            self._broken = exc
            raise
        finally:
            self._receiving = False
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this TLS stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._sending = True
        view = memoryview(data)
        try:
            while view:
                n = await self._io(functools.partial(self._tls.send, view), "send", reading=False)
                view = view[n:]
        except BaseException as exc:
            if view:  # part of a record may be out: nothing else can be sent on this stream
                self._broken = exc
            raise
        finally:
            self._sending = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def close_after_refusal(self, linger: float) -> None:
        """Close after a failed handshake so that the peer can read why. OpenSSL has written its alert; closing a
        socket with unread input makes the kernel send a reset, which discards the alert on the peer's side
        before it is read. So: end our direction, discard what the peer still sends until it closes (or for
        `linger` seconds at most), then close."""
        try:
            self._tls.shutdown(socket.SHUT_WR)  # drops the TLS layer: what follows reads the raw socket
            with trio.move_on_after(linger):
                while True:
                    try:
                        if not self._tls.recv(DEFAULT_READ):
                            break
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(self._tls)
        except OSError:
            pass
        await self.aclose()

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        await trio.lowlevel.wait_writable(self._tls)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        if self._broken is None and not self._sending:
            # Best effort close_notify, without waiting for the peer's (a member that has gone away must not hold
            # a broker task): the peer then sees an orderly end of stream.
            with contextlib.suppress(OSError, ValueError):
                self._tls.unwrap()
        trio.lowlevel.notify_closing(self._tls)
        self._tls.close()
        await trio.lowlevel.checkpoint()
