"""The tiles HTTP server over a real socket."""

from __future__ import annotations

import functools
import socket

import pytest
import trio

from valise.broker import http


async def _resolve(path: str) -> http.Response:
    if path == "/checkpoint":
        return http.Response(200, b"origin\n1\nroot\n", "text/plain; charset=utf-8")
    if path == "/boom":
        raise RuntimeError("bug")
    return http.Response(404, b"not found\n")


async def _exchange(port: int, raw: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(raw)
    out = b""
    with trio.move_on_after(5):
        while chunk := await stream.receive_some(65536):
            out += chunk
    await stream.aclose()
    return out


async def test_get_head_errors_and_keepalive() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(http.serve, _resolve, "127.0.0.1", 0))
        out = await _exchange(port, b"GET /checkpoint HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Cache-Control: no-store" in out
        assert out.endswith(b"origin\n1\nroot\n")
        # Two requests on one connection, then the client closes.
        out = await _exchange(port, b"GET /x HTTP/1.1\r\n\r\nHEAD /checkpoint HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert out.count(b"HTTP/1.1 ") == 2
        assert b"404 Not Found" in out
        assert not out.endswith(b"root\n")  # HEAD has no body
        assert b"405" in await _exchange(port, b"POST /checkpoint HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert b"500" in await _exchange(port, b"GET /boom HTTP/1.0\r\n\r\n")
        assert b"400" in await _exchange(port, b"GARBAGE\r\n\r\n")
        assert b"400" in await _exchange(port, b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
        # An oversized head gets a 400, not an unbounded buffer.
        assert b"too large" in await _exchange(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
        nursery.cancel_scope.cancel()


async def _big(path: str) -> http.Response:
    return http.Response(200, b"x" * 8192)  # a full hash tile


async def test_a_client_that_reads_no_answers_is_broken_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipelined requests and a client that never reads: without a write deadline its task and descriptor are held
    for good (past HEAD_TIMEOUT and the request cap: the handler is stuck in a write)."""
    monkeypatch.setattr(http, "WRITE_TIMEOUT", 0.5)
    ended = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        await http.handle_connection(stream, _big)
        ended.set()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        await sock.send(b"GET /tile/0/000 HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
        with trio.fail_after(5):
            await ended.wait()
        sock.close()
        nursery.cancel_scope.cancel()


async def test_past_the_cap_the_oldest_connection_goes() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(http.serve, _resolve, "127.0.0.1", 0, max_connections=4))
        held = []
        for _ in range(4):  # keep-alive readers, each with an answered request
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"GET /checkpoint HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await s.receive_some(65536)).startswith(b"HTTP/1.1 200")
            held.append(s)
        # A fifth is served at once, and the oldest is closed to make room.
        out = await _exchange(port, b"GET /checkpoint HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200")
        with trio.fail_after(5):
            assert await held[0].receive_some(65536) == b""
        for s in held[1:]:  # the others are still served
            await s.send_all(b"GET /checkpoint HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await s.receive_some(65536)).startswith(b"HTTP/1.1 200")
        for s in held:
            await s.aclose()
        nursery.cancel_scope.cancel()


async def test_bare_lf_line_ends_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 9112 lets a server take LF for CRLF; a request in bare LFs got no answer, then a close 10 s later."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(http.serve, _resolve, "127.0.0.1", 0))
        out = await _exchange(port, b"GET /checkpoint HTTP/1.1\nHost: x\nConnection: close\n\n")
        assert out.startswith(b"HTTP/1.1 200 OK\r\n")
        assert out.endswith(b"origin\n1\nroot\n")
        nursery.cancel_scope.cancel()


async def test_the_last_answer_a_connection_gets_says_it_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_REQUESTS_PER_CONNECTION the server closes: its last answer must say so, or a client that
    pipelined more requests takes the close for a failure instead of reconnecting for the rest."""
    monkeypatch.setattr(http, "MAX_REQUESTS_PER_CONNECTION", 3)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(http.serve, _resolve, "127.0.0.1", 0))
        out = await _exchange(port, b"GET /checkpoint HTTP/1.1\r\n\r\n" * 5)
        answers = out.split(b"HTTP/1.1 200 OK")[1:]
        assert len(answers) == 3
        assert [b"Connection: keep-alive" in a for a in answers] == [True, True, False]
        assert b"Connection: close" in answers[-1]
        nursery.cancel_scope.cancel()
