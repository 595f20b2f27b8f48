"""The broker's durable mailboxes (an I/O edge over SQLite; specs/protocol.md, "Store and forward").

Each member has one ordered mailbox. An item is a packet addressed to the member, an acknowledgement to forward
to a sender, or a retraction to forward to a recipient. Items are pushed in `seq` order and leave the mailbox
only when the member confirms them (a signed acknowledgement for a packet, a receipt frame for a notice) or,
for packets, when they expire undelivered and are purged (which is logged).

Why idempotent inserts: the log append and the mailbox insert are two durable steps. If the broker dies between
them, the sender never got a receipt and submits again; `record_packet` then finds the packet already logged and
fills in the missing mailbox rows, so no packet that was logged is stranded and none is queued twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from valise.errors import StoreError
from valise.store import sqlfile

SCHEMA = """
CREATE TABLE IF NOT EXISTS packets (
    digest     BLOB PRIMARY KEY,   -- SHA-256 of the signed packet header
    sender     TEXT NOT NULL,
    packet_id  BLOB NOT NULL,
    log_index  INTEGER NOT NULL,
    expires    INTEGER NOT NULL,
    size       INTEGER NOT NULL,   -- bytes of the whole packet in the spool
    received   INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS packets_by_sender_id ON packets (sender, packet_id);
CREATE TABLE IF NOT EXISTS mailbox (
    member  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    kind    TEXT NOT NULL CHECK (kind IN ('packet', 'ack', 'retract')),
    digest  BLOB NOT NULL,         -- the packet (a packet or a retraction), or the hash of the signed ack
    body    BLOB,                  -- the signed notice, for 'ack' and 'retract'
    PRIMARY KEY (member, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS mailbox_unique ON mailbox (member, kind, digest);
CREATE INDEX IF NOT EXISTS mailbox_by_digest ON mailbox (digest, kind);  -- unreferenced(): no table scans
CREATE TABLE IF NOT EXISTS counters (member TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bodies (
    digest  BLOB PRIMARY KEY,      -- a small packet kept here, in the batch's transaction, not as a spool file
    data    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS readers (  -- who may read log entry idx in full ('*': everyone; readers.py)
    member  TEXT NOT NULL,
    idx     INTEGER NOT NULL,
    PRIMARY KEY (member, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS retractions (  -- a packet's retraction is logged once; asking again gets this index
    digest     BLOB PRIMARY KEY,
    log_index  INTEGER NOT NULL,
    at         INTEGER             -- the time its receipt carries (NULL: recorded by an older broker)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS orphans (  -- logged packets whose small body a crash lost: the sender's retry brings it
    sender     TEXT NOT NULL,
    packet_id  BLOB NOT NULL,
    log_index  INTEGER NOT NULL,
    digest     BLOB NOT NULL,
    received   INTEGER NOT NULL,
    PRIMARY KEY (sender, packet_id)
);
"""


@dataclass(frozen=True, slots=True)
class PacketRow:
    digest: bytes
    sender: str
    packet_id: bytes
    log_index: int
    expires: int
    size: int
    received: int


@dataclass(frozen=True, slots=True)
class MailItem:
    member: str
    seq: int
    kind: str
    digest: bytes
    body: bytes | None  # the signed notice ('ack', 'retract'); a packet's bytes if kept here (None: spooled)
    sender: str | None = None  # a packet's sender
    packet_id: bytes | None = None  # a packet's id (its acknowledgement must name this sender and id)
    expires: int | None = None  # a packet's expiry: past it, it is not pushed (the purger logs its purge)


# Tables every version of the store has had: one missing means the file is damaged, never merely old.
CORE_TABLES = ("packets", "mailbox", "counters")


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Columns added since a table was first made (CREATE TABLE IF NOT EXISTS leaves an old table as it is)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(retractions)")}
    if "at" not in columns:
        conn.execute("ALTER TABLE retractions ADD COLUMN at INTEGER")


class Mailboxes:
    """Per-member ordered mailboxes in one SQLite file (WAL; every change is one committed transaction)."""

    def __init__(self, conn: sqlite3.Connection, path: Path | None = None) -> None:
        # Failures are StoreErrors naming the store: a full disk is a fault the broker reports and rides out.
        self._db = sqlfile.Guarded(conn, f"the mailbox store {path or 'in memory'}")
        self._depth = 0
        # Next seq per member, read once and then kept here; counters changed in a transaction are written back
        # once at its commit (not at every post), and forgotten if it rolls back.
        self._seqs: dict[str, int] = {}
        self._dirty: set[str] = set()
        # Items queued by the open transaction, handed to `on_posted` once it commits: a connected member's
        # pusher takes them from there instead of querying for them (a query per push was ~4% of the broker's CPU).
        self._posted: dict[tuple[str, str, bytes], MailItem] = {}
        self.on_posted: Callable[[list[MailItem]], None] | None = None

    @classmethod
    def open(cls, path: Path) -> Mailboxes:
        """Open (or create) the store. A broker checks first that a blank one is expected (daemon.py)."""
        blank = sqlfile.is_blank(path)
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
            with sqlfile.closing_on_error(conn):
                if not blank:
                    sqlfile.check_tables(conn, path, CORE_TABLES)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # a receipt promises durability: fsync at every commit
                conn.executescript(SCHEMA)
                _add_missing_columns(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open mailbox store {path}: {exc}") from None
        return cls(conn, path)

    def close(self) -> None:
        self._db.close()

    def _next_seq(self, member: str) -> int:
        seq = self._seqs.get(member)
        if seq is None:
            row = self._db.execute("SELECT next_seq FROM counters WHERE member = ?", (member,)).fetchone()
            seq = self._seqs[member] = int(row[0]) if row else 1
        return seq

    def _write_counters(self) -> None:
        self._db.executemany(
            "INSERT INTO counters (member, next_seq) VALUES (?, ?) "
            "ON CONFLICT (member) DO UPDATE SET next_seq = excluded.next_seq",
            [(m, self._seqs[m]) for m in sorted(self._dirty)],
        )

    def record_packet(self, row: PacketRow, recipients: Iterable[str], body: bytes | None = None) -> None:
        """Record a logged packet and queue it for each recipient; filling in only what is missing.

        `body` is the whole packet when it is small enough to travel in this transaction instead of a spool file
        (one fsync per batch instead of two per packet)."""
        with self._transaction():
            if body is not None:
                self._db.execute("INSERT OR REPLACE INTO bodies VALUES (?, ?)", (row.digest, body))
            self._db.execute(
                "INSERT OR IGNORE INTO packets VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.digest, row.sender, row.packet_id, row.log_index, row.expires, row.size, row.received),
            )
            for member in sorted(set(recipients)):
                self._post_locked(member, "packet", row.digest, None, body, row.sender, row.packet_id, row.expires)

    def post(self, member: str, kind: str, digest: bytes, body: bytes) -> None:
        """Queue a signed notice (an acknowledgement for a sender, a retraction for a recipient), once."""
        with self._transaction():
            self._post_locked(member, kind, digest, body, body)

    def _post_locked(
        self,
        member: str,
        kind: str,
        digest: bytes,
        stored: bytes | None,
        body: bytes | None,
        sender: str | None = None,
        packet_id: bytes | None = None,
        expires: int | None = None,
    ) -> None:
        """Queue an item: `stored` goes in its mailbox row; `body`, `sender` and `packet_id` are what a pusher
        reads with it (a small packet's bytes travel in the `bodies` table, not in the row)."""
        seq = self._next_seq(member)
        # The unique index on (member, kind, digest) keeps an item from being queued twice; any other conflict
        # (a seq already taken: the cached counter would be wrong) raises instead of losing the item.
        cur = self._db.execute(
            "INSERT INTO mailbox VALUES (?, ?, ?, ?, ?) ON CONFLICT (member, kind, digest) DO NOTHING",
            (member, seq, kind, digest, stored),
        )
        if cur.rowcount:
            self._seqs[member] = seq + 1
            self._dirty.add(member)
            self._posted[(member, kind, digest)] = MailItem(member, seq, kind, digest, body, sender, packet_id, expires)

    def packet(self, digest: bytes) -> PacketRow | None:
        r = self._db.execute("SELECT * FROM packets WHERE digest = ?", (digest,)).fetchone()
        return PacketRow(*r) if r else None

    def packet_by_id(self, sender: str, packet_id: bytes) -> PacketRow | None:
        r = self._db.execute("SELECT * FROM packets WHERE sender = ? AND packet_id = ?", (sender, packet_id)).fetchone()
        return PacketRow(*r) if r else None

    def pending(self, member: str, after_seq: int = 0, limit: int = 100) -> list[MailItem]:
        """Items waiting for `member`, in order, after `after_seq`; a packet's with its sender, id and kept bytes
        (one query, where pushing and acknowledging each packet would otherwise cost two more)."""
        rows = self._db.execute(
            "SELECT m.member, m.seq, m.kind, m.digest, COALESCE(m.body, b.data), p.sender, p.packet_id, p.expires"
            " FROM mailbox AS m"
            " LEFT JOIN packets AS p ON m.kind = 'packet' AND p.digest = m.digest"
            " LEFT JOIN bodies AS b ON m.kind = 'packet' AND b.digest = m.digest"
            " WHERE m.member = ? AND m.seq > ? ORDER BY m.seq LIMIT ?",
            (member, after_seq, limit),
        ).fetchall()
        return [MailItem(*r) for r in rows]

    def has_item(self, member: str, kind: str, digest: bytes) -> bool:
        return (
            self._db.execute(
                "SELECT 1 FROM mailbox WHERE member = ? AND kind = ? AND digest = ?", (member, kind, digest)
            ).fetchone()
            is not None
        )

    def remove(self, member: str, kind: str, digest: bytes) -> bool:
        """Take an item out of a member's mailbox (confirmed or purged). True if it was there."""
        with self._transaction():
            cur = self._db.execute(
                "DELETE FROM mailbox WHERE member = ? AND kind = ? AND digest = ?", (member, kind, digest)
            )
            self._posted.pop((member, kind, digest), None)  # queued and taken out again before the commit
            return cur.rowcount > 0

    def expired_packets(self, now: int) -> list[tuple[str, PacketRow]]:
        """(recipient, packet) pairs still queued whose packet's `expires` has passed."""
        rows = self._db.execute(
            "SELECT m.member, p.* FROM mailbox m JOIN packets p ON p.digest = m.digest "
            "WHERE m.kind = 'packet' AND p.expires <= ? ORDER BY p.expires, m.member",
            (now,),
        ).fetchall()
        return [(r[0], PacketRow(*r[1:])) for r in rows]

    def body(self, digest: bytes) -> bytes | None:
        """The packet's bytes if it is kept here (None: it is in the spool, or gone)."""
        r = self._db.execute("SELECT data FROM bodies WHERE digest = ?", (digest,)).fetchone()
        return bytes(r[0]) if r else None

    def drop_bodies(self, digests: Sequence[bytes]) -> set[bytes]:
        """Delete the kept bodies of `digests`; return the digests that had one."""
        dropped = set()
        with self._transaction():
            for d in digests:
                if self._db.execute("DELETE FROM bodies WHERE digest = ?", (d,)).rowcount:
                    dropped.add(d)
        return dropped

    def unreferenced(self, digests: Sequence[bytes]) -> list[bytes]:
        """Of `digests`, those no mailbox item refers to any more (their spooled bodies may be deleted)."""
        return [
            d
            for d in digests
            if self._db.execute("SELECT 1 FROM mailbox WHERE digest = ? AND kind = 'packet'", (d,)).fetchone() is None
        ]

    # --- who may read which log entry (readers.py) ------------------------------------------------------------

    def applied_size(self) -> int | None:
        """Log entries [0, applied_size) have their mailbox changes and readers recorded here: the mark is written
        in the same transaction as they are, so after a crash the entries past it are the ones to catch up on.
        None: a mailbox database from before the mark was kept."""
        r = self._db.execute("SELECT value FROM meta WHERE key = 'readers_size'").fetchone()
        return int(r[0]) if r else None

    def record_readers(self, start: int, readers: Sequence[Sequence[str]], last_entry: bytes) -> None:
        """Record the readers of log entries start, start + 1, ..., and move the mark past them (in a batch: with
        the entries' mailbox changes). `last_entry` is the last of them: its hash, kept with the mark, ties this
        database to the log it describes (broker/policyfold.py checks it), so that one restored from another backup
        is noticed."""
        if start != (size := self.applied_size() or 0):
            raise StoreError(f"readers recorded up to log entry {size}, not {start}")
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO readers (member, idx) VALUES (?, ?)",
                [(m, start + i) for i, names in enumerate(readers) for m in names],
            )
            self._db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [("readers_size", start + len(readers)), ("readers_tail", hashlib.sha256(last_entry).digest())],
            )

    def readable(self, member: str, start: int, end: int, limit: int) -> list[int]:
        """The first `limit` log entries in [start, end) that `member` may read in full, ascending."""
        # One ordered index range per name, merged here: `member IN (...) ORDER BY idx` would sort every match.
        found: set[int] = set()
        for name in (member, "*"):
            rows = self._db.execute(
                "SELECT idx FROM readers WHERE member = ? AND idx >= ? AND idx < ? ORDER BY idx LIMIT ?",
                (name, start, end, limit),
            ).fetchall()
            found.update(r[0] for r in rows)
        return sorted(found)[:limit]

    def record_retraction(self, digest: bytes, index: int, at: int | None) -> None:
        with self._transaction():
            self._db.execute("INSERT OR IGNORE INTO retractions VALUES (?, ?, ?)", (digest, index, at))

    def retraction(self, digest: bytes) -> tuple[int, int | None] | None:
        """Where the packet's retraction was logged and the time its receipt carries, if it was logged."""
        r = self._db.execute("SELECT log_index, at FROM retractions WHERE digest = ?", (digest,)).fetchone()
        return (int(r[0]), r[1]) if r else None

    def add_orphan(self, sender: str, packet_id: bytes, index: int, digest: bytes, received: int) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO orphans VALUES (?, ?, ?, ?, ?)", (sender, packet_id, index, digest, received)
            )

    def orphans(self) -> dict[tuple[str, bytes], tuple[int, bytes, int]]:
        """(sender, packet id) -> (log index, header digest, received) of every orphan."""
        rows = self._db.execute("SELECT sender, packet_id, log_index, digest, received FROM orphans").fetchall()
        return {(r[0], bytes(r[1])): (r[2], bytes(r[3]), r[4]) for r in rows}

    def remove_orphan(self, sender: str, packet_id: bytes) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM orphans WHERE sender = ? AND packet_id = ?", (sender, packet_id))

    def remove_orphans_of(self, digest: bytes) -> None:
        """Forget the orphan of packet `digest` (a purge of it is logged), if there is one."""
        with self._transaction():
            self._db.execute("DELETE FROM orphans WHERE digest = ?", (digest,))

    def last_log_index(self) -> int:
        """The log index of the newest packet recorded here (0 if none)."""
        (n,) = self._db.execute("SELECT coalesce(max(log_index), 0) FROM packets").fetchone()
        return int(n)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group several changes into one durable transaction (one fsync for a whole commit batch)."""
        with self._transaction():
            yield

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # Re-entrant: only the outermost level begins and commits, so `batch()` can wrap the public methods.
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
            if self._dirty:
                self._write_counters()
            self._db.execute("COMMIT")
        except BaseException:
            self._posted.clear()
            if self._db.in_transaction:
                with contextlib.suppress(StoreError):  # a failed COMMIT may have rolled back already
                    self._db.execute("ROLLBACK")
            # Read every counter again from what is committed: a failed insert may mean a cached one was wrong
            # (another writer), and it need not be one this transaction had changed.
            self._seqs.clear()
            raise
        finally:
            self._depth = 0
            self._dirty.clear()
        posted = list(self._posted.values())
        self._posted.clear()
        if posted and self.on_posted is not None:
            self.on_posted(posted)
