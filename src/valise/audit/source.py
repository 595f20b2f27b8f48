"""Where an audit reads the log from: a `TileSource` (C2SP tlog-tiles paths), a directory or HTTP.

The verifier only ever calls `read(path)` with `checkpoint` or a canonical `tile/...` path, and treats every
answer as untrusted bytes: it checks each one against the signed checkpoint. These two classes are the only
I/O of the audit; both cap what they read, so a hostile server cannot make the auditor buffer without bound.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import stat
import threading
import urllib.parse
from pathlib import Path
from typing import Protocol

from valise.errors import StoreError, UsageError
from valise.store.export import MAX_TILE_FILE

TIMEOUT = 30.0  # for each read from the server
# For a whole request: a server that sends a byte now and then, or one header line every few seconds, would
# otherwise hold the auditor for as long as it likes (an entry bundle is at most 16 MiB: ~2 min at 1 Mbit/s).
REQUEST_TIMEOUT = 300.0


class TileSource(Protocol):
    """A read-only view of a log in the tlog-tiles layout; `read` returns None when the path does not exist."""

    def read(self, path: str) -> bytes | None: ...

    def describe(self) -> str: ...


class DirSource:
    """An exported directory (`valise log export --out DIR`), or any mirror of it on disk."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise UsageError(f"{root} is not a directory")
        self.root = root

    def read(self, path: str) -> bytes | None:
        target = self.root / path
        try:
            # Non-blocking, then checked to be a regular file: a FIFO put in a tile's place would hang the open.
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {target}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise StoreError(f"{target} is not a regular file")
                data = f.read(MAX_TILE_FILE + 1)
        except OSError as exc:
            raise StoreError(f"cannot read {target}: {exc.strerror}") from None
        if len(data) > MAX_TILE_FILE:
            raise StoreError(f"{target} is larger than any tile can be")
        return data

    def describe(self) -> str:
        return str(self.root)


class HttpSource:
    """A tlog-tiles server, e.g. the broker's HTTP read side (`/checkpoint`, `/tile/...`)."""

    def __init__(self, base: str, *, timeout: float = TIMEOUT, request_timeout: float = REQUEST_TIMEOUT) -> None:
        if not base.startswith(("http://", "https://")):
            raise UsageError(f"{base[:80]!r} is not an http(s) URL")
        try:
            parts = urllib.parse.urlsplit(base)
            if parts.hostname:
                parts.hostname.encode("idna")  # a name no resolver could take ("a..b")
        except (ValueError, UnicodeError) as exc:
            raise UsageError(f"{base[:80]!r} is not a URL that can be read: {exc}") from None
        if parts.query or parts.fragment:
            raise UsageError(f"{base[:80]!r} has a query or fragment: give the URL of the log's directory")
        try:
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"{base[:80]!r}: {exc}") from None
        if not parts.hostname:
            raise UsageError(f"{base[:80]!r} names no host")
        self.base = base.rstrip("/") + "/"
        self._https = parts.scheme == "https"
        # Connected to directly: proxy variables (http_proxy, ...) are not used, as an auditor must know where the
        # bytes it checks come from.
        self._host, self._port = parts.hostname, port
        self._prefix = urllib.parse.quote(parts.path.rstrip("/") + "/", safe="/%")  # requests are ASCII
        self.timeout = timeout
        self.request_timeout = request_timeout

    def read(self, path: str) -> bytes | None:
        url = self.base + path
        status, data = self._get(url, self._prefix + path)
        if status == 404:
            return None
        if status == 403 and path.startswith("tile/entries/"):
            # A broker serves full records (who sent what to whom) only on an address for auditors.
            raise StoreError(
                f"GET {url}: HTTP 403: this address does not serve the log's entries",
                hint="audit an export (`valise log export`), or a broker address started with --serve-entries",
            )
        if status != 200:  # redirects are not followed: a log is read where the auditor pointed, nowhere else
            raise StoreError(f"GET {url}: HTTP {status}")
        if len(data) > MAX_TILE_FILE:
            raise StoreError(f"GET {url}: larger than any tile can be")
        return data

    def _get(self, url: str, target: str) -> tuple[int, bytes]:
        """One GET on a new connection, given up after `request_timeout` whatever the server or the resolver does:
        the request runs in a thread that is waited for that long. Past it, its socket (if it has one yet) is shut,
        which ends a read the server keeps alive with a byte now and then; a thread still resolving or trying
        addresses ends on its own per-attempt timeout, and nothing waits for it."""
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = kind(self._host, self._port, timeout=self.timeout)
        outcome: list[tuple[int, bytes] | BaseException] = []

        def request() -> None:
            try:
                conn.request("GET", target, headers={"Connection": "close"})
                resp = conn.getresponse()
                outcome.append((resp.status, resp.read(MAX_TILE_FILE + 1)))
            except (http.client.HTTPException, OSError, UnicodeError) as exc:
                outcome.append(exc)
            finally:
                conn.close()

        worker = threading.Thread(target=request, name=f"GET {url}", daemon=True)
        worker.start()
        worker.join(self.request_timeout)
        if worker.is_alive() or not outcome:
            if conn.sock is not None:
                with contextlib.suppress(OSError):  # already closed: nothing to end
                    conn.sock.shutdown(socket.SHUT_RDWR)
            raise StoreError(f"GET {url}: no complete answer within {self.request_timeout:g} s")
        result = outcome[0]
        if isinstance(result, BaseException):
            raise StoreError(f"GET {url}: {type(result).__name__}: {str(result)[:200]}")
        return result

    def describe(self) -> str:
        return self.base


def open_source(where: str) -> TileSource:
    """An HTTP source for a URL, a directory source otherwise."""
    if where.startswith(("http://", "https://")):
        return HttpSource(where)
    return DirSource(Path(where))
