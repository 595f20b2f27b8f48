"""Where an auditor reads a log from, served by a hostile party: every answer is bounded in time and size, and
every failure is an error that names the address, never a traceback or a hang. Real sockets, real files."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from valise.audit.source import DirSource, HttpSource
from valise.errors import StoreError, UsageError


@contextmanager
def _server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A one-connection-at-a-time server on 127.0.0.1 that reads a request head and lets `answer` misbehave."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):  # the auditor hung up, as it should
                conn.recv(65536)
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join()
        listener.close()


def _trickle(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8192\r\n\r\n")
    for _ in range(100):
        conn.sendall(b"x")
        time.sleep(0.1)


def _slow_head(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for i in range(100):
        conn.sendall(b"X-%d: y\r\n" % i)
        time.sleep(0.1)


def test_a_server_that_trickles_its_answer_is_given_up_on_as_a_whole() -> None:
    """Each read came within the 30 s socket timeout, so a byte every few seconds held the auditor for good."""
    for misbehave in (_trickle, _slow_head):
        with _server(misbehave) as base:
            source = HttpSource(base, timeout=5.0, request_timeout=1.0)
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"GET .*checkpoint: no complete answer within 1 s"):
                source.read("checkpoint")
            assert time.monotonic() - started < 5  # not the 10 s the server would take


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"NONSENSE\r\n\r\n", "BadStatusLine"),  # was a traceback
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "LineTooLong"),  # was a traceback
        (b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.example/\r\nContent-Length: 0\r\n\r\n", "HTTP 302"),
    ],
)
def test_a_malformed_or_redirecting_answer_is_an_error_naming_the_address(raw: bytes, what: str) -> None:
    with (
        _server(lambda conn: conn.sendall(raw)) as base,
        pytest.raises(StoreError, match=f"GET {base}checkpoint: .*{what}"),
    ):
        HttpSource(base, timeout=5.0).read("checkpoint")


def test_a_fifo_in_place_of_an_exported_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "checkpoint")
    with pytest.raises(StoreError, match="checkpoint is not a regular file"):
        DirSource(tmp_path).read("checkpoint")


def test_the_request_deadline_also_covers_a_slow_connect() -> None:
    """With the server's accept queue full, connect() retries its SYN past the deadline; there was no socket to
    shut then, so the request went on with the per-read timeout only, for as long as the server trickled."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.create_connection(("127.0.0.1", port))]
    late = socket.socket()
    late.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        late.connect(("127.0.0.1", port))
    fillers.append(late)
    stop = threading.Event()

    def serve() -> None:
        stop.wait(2.5)  # past the auditor's 1 s deadline, its SYN gets through; then a byte a second
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                if conn.getpeername()[1] in [f.getsockname()[1] for f in fillers]:
                    continue
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
                for _ in range(30):
                    if stop.is_set():
                        return
                    conn.sendall(b"x")
                    time.sleep(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="no complete answer within 1 s"):
            HttpSource(f"http://127.0.0.1:{port}/", timeout=30.0, request_timeout=1.0).read("checkpoint")
        assert time.monotonic() - started < 15  # not the ~30 s of trickling
    finally:
        stop.set()
        thread.join()
        for f in fillers:
            f.close()
        listener.close()


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("http://127.0.0.1:99999/log", "out of range"),  # was a ValueError traceback
        ("http://127.0.0.1:abc/log", "abc"),
        ("http://127.0.0.1/log?x=1", "has a query or fragment"),  # fetched the checkpoint at the wrong path
        ("http://[::1/log", "is not a URL that can be read"),  # these two were tracebacks
        ("http://a..b/log", "is not a URL that can be read"),
    ],
)
def test_a_log_url_that_cannot_be_read_as_given_is_refused_at_once(url: str, what: str) -> None:
    with pytest.raises(UsageError, match=what):
        HttpSource(url)
