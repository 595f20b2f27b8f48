"""The broker's TLS stream (OpenSSL on the socket itself) against trio's own SSLStream, over real sockets."""

from __future__ import annotations

import functools
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from valise import identity, keyfiles, tls
from valise.tlsstream import TLSSocketStream

from .conftest import NOW, seeded_random

Serve = Callable[[TLSSocketStream], Awaitable[None]]


def _make(tmp_path: Path, member_id: str) -> tuple[identity.Identity, Path]:
    ident = identity.generate(member_id, seeded_random(b"tlsstream" + member_id.encode()), NOW)
    d = tmp_path / member_id
    keyfiles.save_identity(d, ident, None)
    return ident, d


@asynccontextmanager
async def _pair(tmp_path: Path, serve: Serve, client_id: str = "FRA") -> AsyncIterator[trio.SSLStream[trio.Stream]]:
    """A server whose connections are TLSSocketStreams running `serve`, and a trio.SSLStream client to it."""
    broker, bdir = _make(tmp_path, "BRK")
    fra, _ = _make(tmp_path, "FRA")
    cdir = tmp_path / "FRA" if client_id == "FRA" else _make(tmp_path, client_id)[1]
    sctx = tls.server_context(bdir / "BRK.tls.crt", bdir / "BRK.tls.key", [fra.bundle.cert_der])
    cctx = tls.client_context(cdir / f"{client_id}.tls.crt", cdir / f"{client_id}.tls.key", broker.bundle.cert_der)

    async def handler(stream: trio.SocketStream) -> None:
        s = TLSSocketStream.wrap(stream, sctx, server_side=True)
        try:
            await s.do_handshake()
            await serve(s)
        except trio.BrokenResourceError as exc:
            await s.close_after_refusal(1.0)
            handler.errors.append(exc)  # type: ignore[attr-defined]
        finally:
            await trio.aclose_forcefully(s)

    handler.errors = []  # type: ignore[attr-defined]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), cctx)
        try:
            with trio.fail_after(10):
                yield client
        finally:
            await trio.aclose_forcefully(client)
            nursery.cancel_scope.cancel()


async def _echo(s: TLSSocketStream) -> None:
    while data := await s.receive_some():
        await s.send_all(data)
    await s.aclose()


async def test_round_trips_small_and_large_writes_and_reports_the_peer(tmp_path: Path) -> None:
    seen: list[tuple[bytes | None, str | None]] = []

    async def serve(s: TLSSocketStream) -> None:
        seen.append((s.getpeercert(), s.selected_alpn_protocol()))
        await _echo(s)

    async with _pair(tmp_path, serve) as client:
        await client.do_handshake()
        for size in (1, 1100, 16 * 1024 + 1, 3 * 1024 * 1024):  # one record, several, more than a socket buffer
            payload = os.urandom(size)
            got = bytearray()

            async def read_all(expect: int = size, buf: bytearray = got) -> None:
                while len(buf) < expect:
                    buf += await client.receive_some()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                await client.send_all(payload)
            assert bytes(got) == payload
    assert seen
    assert seen[0][0]
    assert seen[0][1] == tls.ALPN


async def test_close_notify_is_end_of_stream_and_a_closed_stream_says_so(tmp_path: Path) -> None:
    results: list[object] = []

    async def serve(s: TLSSocketStream) -> None:
        results.append(await s.receive_some())  # the client's close_notify
        await s.aclose()
        for op in (s.receive_some(), s.send_all(b"x")):
            try:
                await op
            except trio.ClosedResourceError as exc:
                results.append(type(exc))

    async with _pair(tmp_path, serve) as client:
        await client.do_handshake()
        await client.aclose()
        await trio.sleep(0.2)
    assert results == [b"", trio.ClosedResourceError, trio.ClosedResourceError]


async def test_an_eof_without_close_notify_is_a_broken_stream(tmp_path: Path) -> None:
    results: list[object] = []

    async def serve(s: TLSSocketStream) -> None:
        try:
            while data := await s.receive_some():
                results.append(data)
            results.append("clean end")
        except trio.BrokenResourceError as exc:
            results.append(exc)

    async with _pair(tmp_path, serve) as client:
        await client.do_handshake()
        await client.send_all(b"hello")
        # Cut the TCP connection under TLS: no close_notify (what a crashed peer or a truncation attack looks like).
        client.transport_stream.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        await trio.sleep(0.3)
    assert results[0] == b"hello"
    assert len(results) == 2, results
    assert isinstance(results[1], trio.BrokenResourceError)


async def test_two_receivers_at_once_are_refused(tmp_path: Path) -> None:
    results: list[BaseException] = []

    async def serve(s: TLSSocketStream) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.receive_some)
            await trio.sleep(0.05)
            try:
                await s.receive_some()
            except trio.BusyResourceError as exc:
                results.append(exc)
            nursery.cancel_scope.cancel()

    async with _pair(tmp_path, serve) as client:
        await client.do_handshake()
        await trio.sleep(0.3)
    assert len(results) == 1


async def test_a_refused_client_reads_the_alert_that_says_why(tmp_path: Path) -> None:
    async with _pair(tmp_path, _echo, client_id="EVIL") as client:
        caught = None
        try:
            await client.do_handshake()
            await client.send_all(b"hello")  # TLS 1.3: the refusal may only show once the client reads
            await client.receive_some()
        except trio.BrokenResourceError as exc:
            caught = exc
    assert caught is not None
    assert "alert unknown ca" in str(caught.__cause__)


async def test_a_send_cut_short_breaks_the_stream(tmp_path: Path) -> None:
    results: list[object] = []

    async def serve(s: TLSSocketStream) -> None:
        # The client never reads: the socket buffers fill and the send waits; cancel it mid-record.
        with trio.move_on_after(0.5):
            await s.send_all(os.urandom(32 * 1024 * 1024))
        try:
            await s.send_all(b"more")
        except trio.BrokenResourceError as exc:
            results.append(exc)

    async with _pair(tmp_path, serve) as client:
        await client.do_handshake()
        await trio.sleep(1.0)
    assert len(results) == 1
    assert "broke earlier" in str(results[0])


async def test_a_context_that_cannot_wrap_the_socket_leaves_no_socket_open() -> None:
    # A client context that checks host names needs one; wrapping without it fails, and the socket it took from
    # the trio stream must be closed, not left to the garbage collector.
    bad = ssl.create_default_context()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, lambda s: s.aclose(), 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                TLSSocketStream.wrap(tcp, bad, server_side=False)
            except ValueError:
                pass
            else:
                raise AssertionError("wrapping without a host name for a checking context should fail")
        await trio.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) == before
        nursery.cancel_scope.cancel()
