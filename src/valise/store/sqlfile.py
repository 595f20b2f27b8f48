"""Checks that an SQLite file holds the store it should, before anything is created in it.

SQLite opens a missing or empty (0-byte) file as a new, empty database, and `CREATE TABLE IF NOT EXISTS` then
fills it with empty tables: a store lost or truncated on disk would come back empty without a word, and with it
a node's inbox records or a broker's delivery queues. Callers check first, where they know what should be there.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from valise.errors import StoreError


def is_blank(path: Path) -> bool:
    """Whether `path` is missing or empty: SQLite would silently start a new database there."""
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def closing_on_error(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Close `conn` if the block raises: a store refused while it is being opened leaves no connection behind."""
    try:
        yield conn
    except BaseException:
        conn.close()
        raise


def check_tables(conn: sqlite3.Connection, path: Path, required: Iterable[str]) -> None:
    """Refuse a database that lacks any of the tables every version of its store has had."""
    have = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = sorted(set(required) - have)
    if missing:
        raise StoreError(
            f"{path} has no table {', '.join(missing)}: it is damaged, or not this kind of store",
            hint="restore it from a backup",
        )


class Guarded:
    """An SQLite connection whose failures say which store failed: a full or failing disk surfaces as a
    StoreError ("the node store … could not be written: database or disk is full"), which callers treat as a
    local fault to report and retry, not as a bug that ends the process."""

    def __init__(self, conn: sqlite3.Connection, what: str) -> None:
        self.conn = conn
        self.what = what  # e.g. "the node store /srv/node-fra/node.db"

    def execute(self, sql: str, args: Sequence[object] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, args)
        except sqlite3.Error as exc:
            raise self.failure(exc) from None

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> sqlite3.Cursor:
        try:
            return self.conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise self.failure(exc) from None

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def close(self) -> None:
        self.conn.close()

    def failure(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"{self.what} failed: {exc}", hint=failure_hint(exc), cause=str(exc))


def failure_hint(exc: BaseException) -> str | None:
    """What to check, for the failures a full or failing disk causes (SQLite says "disk I/O error" for a file
    size limit, and the OS "File too large")."""
    text = str(exc).lower()
    if any(s in text for s in ("full", "disk i/o", "too large", "no space", "quota")):
        return "is its disk full, over a quota or failing? it retries once there is room"
    return None
