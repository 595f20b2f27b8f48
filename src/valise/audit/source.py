"""Where an audit reads the log from: a `TileSource` (C2SP tlog-tiles paths), a directory or HTTP.

The verifier only ever calls `read(path)` with `checkpoint` or a canonical `tile/...` path, and treats every
answer as untrusted bytes: it checks each one against the signed checkpoint. These two classes are the only
I/O of the audit; both cap what they read, so a hostile server cannot make the auditor buffer without bound.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

from valise.errors import StoreError, UsageError
from valise.store.export import MAX_TILE_FILE

TIMEOUT = 30.0


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
            with target.open("rb") as f:
                data = f.read(MAX_TILE_FILE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {target}: {exc.strerror}") from None
        if len(data) > MAX_TILE_FILE:
            raise StoreError(f"{target} is larger than any tile can be")
        return data

    def describe(self) -> str:
        return str(self.root)


class HttpSource:
    """A tlog-tiles server, e.g. the broker's HTTP read side (`/checkpoint`, `/tile/...`)."""

    def __init__(self, base: str, *, timeout: float = TIMEOUT) -> None:
        if not base.startswith(("http://", "https://")):
            raise UsageError(f"{base[:80]!r} is not an http(s) URL")
        self.base = base.rstrip("/") + "/"
        self.timeout = timeout

    def read(self, path: str) -> bytes | None:
        url = self.base + path
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                data: bytes = resp.read(MAX_TILE_FILE + 1)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            if exc.code == 403 and path.startswith("tile/entries/"):
                # A broker serves full records (who sent what to whom) only on an address for auditors.
                raise StoreError(
                    f"GET {url}: HTTP 403: this address does not serve the log's entries",
                    hint="audit an export (`valise log export`), or a broker address started with --serve-entries",
                ) from None
            raise StoreError(f"GET {url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise StoreError(f"GET {url}: {getattr(exc, 'reason', exc)}") from None
        if len(data) > MAX_TILE_FILE:
            raise StoreError(f"GET {url}: larger than any tile can be")
        return data

    def describe(self) -> str:
        return self.base


def open_source(where: str) -> TileSource:
    """An HTTP source for a URL, a directory source otherwise."""
    if where.startswith(("http://", "https://")):
        return HttpSource(where)
    return DirSource(Path(where))
