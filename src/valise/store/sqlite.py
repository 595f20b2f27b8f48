"""The SQLite log store: the embedded default (specs/log.md, "Durable store").

Durability choices, and why:
- WAL journal: readers (tile export, proofs) never block the writer, and a commit is one sequential write.
- synchronous=FULL: in WAL mode NORMAL survives a process crash but may lose the last commits on power loss.
  The log service signs a checkpoint only for a tree it believes durable; losing a signed tree's entries would
  force the log to fork from its own signature, so every commit is fsynced. Batching (one transaction per
  `append` call, group commit) pays that fsync once per batch, not per entry.
- `BEGIN IMMEDIATE` takes the write lock before reading the size, so two writers (a daemon and a CLI) cannot
  both compute hashes for the same position; the second waits (busy_timeout) and then sees the first's batch.

The tables live in the broker's database next to other tables, so they are all prefixed `log_`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from valise.errors import StoreError
from valise.store.base import LogBackend, check_checkpoint, check_range
from valise.tlog import merkle

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000
# SQLite allows 32766 host parameters per statement (3.32+); stay well below for the IN (...) reads.
_READ_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS log_entries (idx INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log_hashes (idx INTEGER PRIMARY KEY, hash BLOB NOT NULL CHECK (length(hash) = 32));
CREATE TABLE IF NOT EXISTS log_checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    size INTEGER NOT NULL CHECK (size >= 0),
    note BLOB NOT NULL
);
"""


class SqliteLog(LogBackend):
    """A log store in one SQLite database file. Safe to share between threads (one connection, one lock)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.RLock()
        self.path = path

    @classmethod
    def open(cls, path: Path) -> SqliteLog:
        """Open the log in database `path`, creating the file and the schema if absent."""
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path}: SQLite refused WAL mode (journal mode is {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO log_meta(key, value) VALUES ('log_schema', ?)", (SCHEMA_VERSION,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the log store {path}: {exc}") from None
        log = cls(conn, path)
        try:
            log._check_schema()
        except BaseException:
            conn.close()
            raise
        return log

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the log store {self.path} is closed")
        return self._conn

    def _check_schema(self) -> None:
        db = self._db()
        (version,) = db.execute("SELECT value FROM log_meta WHERE key = 'log_schema'").fetchone()
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: log schema version {version} is not supported (expected {SCHEMA_VERSION})")
        size = self._size()
        (hashes,) = db.execute("SELECT coalesce(max(idx) + 1, 0) FROM log_hashes").fetchone()
        if hashes != merkle.stored_hash_count(size):
            raise StoreError(f"{self.path} is corrupt: {size} entries but {hashes} stored hashes")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            db = self._db()
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot start a write on {self.path}: {exc}") from None
            try:
                yield
            except BaseException:
                db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise StoreError(f"commit to {self.path} failed: {exc}", cause=str(exc)) from None

    def _size(self) -> int:
        with self._lock:
            (n,) = self._db().execute("SELECT coalesce(max(idx) + 1, 0) FROM log_entries").fetchone()
            return int(n)

    def _write(self, first_entry: int, entries: Sequence[bytes], first_hash: int, hashes: Sequence[bytes]) -> None:
        db = self._db()
        try:
            db.executemany("INSERT INTO log_entries(idx, data) VALUES (?, ?)", enumerate(entries, first_entry))
            db.executemany("INSERT INTO log_hashes(idx, hash) VALUES (?, ?)", enumerate(hashes, first_hash))
        except sqlite3.Error as exc:
            raise StoreError(f"writing a batch to {self.path} failed: {exc}") from None

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        return self._by_index("log_hashes", "hash", indexes, "stored hash")

    def _by_index(self, table: str, column: str, indexes: Sequence[int], what: str) -> list[bytes]:
        """Rows of `table` at `indexes` (any order, repeats allowed), one query per _READ_CHUNK."""
        found: dict[int, bytes] = {}
        with self._lock:
            db = self._db()
            for lo in range(0, len(indexes), _READ_CHUNK):
                part = indexes[lo : lo + _READ_CHUNK]
                sql = f"SELECT idx, {column} FROM {table} WHERE idx IN ({','.join('?' * len(part))})"
                found.update(db.execute(sql, part).fetchall())
        try:
            return [found[i] for i in indexes]
        except KeyError as exc:
            raise StoreError(f"{what} {exc.args[0]} does not exist in {self.path}") from None

    def entries(self, start: int, end: int) -> list[bytes]:
        with self._lock:
            check_range(start, end, self._size())
            rows = (
                self._db()
                .execute("SELECT data FROM log_entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end))
                .fetchall()
            )
        if len(rows) != end - start:
            raise StoreError(f"{self.path} is corrupt: entries [{start}, {end}) have gaps")
        return [r[0] for r in rows]

    def entries_at(self, indexes: Sequence[int]) -> list[bytes]:
        """The entries at `indexes` (any order): what a member may read of a range is scattered through it, and a
        query per entry was most of the cost of serving the log."""
        return self._by_index("log_entries", "data", indexes, "entry")

    def load_checkpoint(self) -> tuple[int, bytes] | None:
        with self._lock:
            row = self._db().execute("SELECT size, note FROM log_checkpoint WHERE id = 1").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def save_checkpoint(self, size: int, note: bytes) -> None:
        with self._transaction():
            saved = self.load_checkpoint()
            check_checkpoint(size, note, self._size(), None if saved is None else saved[0])
            self._db().execute(
                "INSERT INTO log_checkpoint(id, size, note) VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET size = excluded.size, note = excluded.note",
                (size, bytes(note)),
            )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SqliteLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
