"""A node's durable outbox, inbox and log view (an I/O edge over SQLite and plain files).

Packets are kept as the bytes that travel (sealed, encrypted): the outbox until the broker's receipt or denial,
the inbox as received. Plaintext exists only when a member reads or exports a packet. Bodies live in files
named by their header digest (written and fsynced before the row that points to them is committed), rows in
`node.db` (WAL, synchronous=FULL): a row never points to a missing or partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from valise.errors import Error, PacketError, StoreError
from valise.packet.format import PREFIX_SIZE, SIGNATURE_SIZE, parse_prefix
from valise.store import sqlfile

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    packet_id   BLOB PRIMARY KEY,
    digest      BLOB NOT NULL,
    recipients  TEXT NOT NULL,            -- JSON list
    created     INTEGER NOT NULL,
    expires     INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'receipted', 'denied', 'expired')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_try    REAL NOT NULL DEFAULT 0,
    receipt     BLOB,                     -- the broker's signed receipt
    log_index   INTEGER,
    outcome     TEXT,                     -- JSON: denial reasons per recipient, or a last error
    in_log      INTEGER NOT NULL DEFAULT 0, -- 1 once a verified checkpoint showed the receipt's entry
    receipted_at REAL                     -- when this node had the receipt, by its own clock (the grace before an
                                          -- overdue-receipt alarm runs from it, across restarts)
);
CREATE TABLE IF NOT EXISTS acks (
    packet_id   BLOB NOT NULL,
    recipient   TEXT NOT NULL,
    notice      BLOB NOT NULL,
    PRIMARY KEY (packet_id, recipient)
);
CREATE TABLE IF NOT EXISTS inbox (
    digest      BLOB PRIMARY KEY,
    packet_id   BLOB NOT NULL,
    sender      TEXT NOT NULL,
    received    INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    labels      TEXT NOT NULL,            -- JSON, as signed by the sender
    state       TEXT NOT NULL CHECK (state IN ('new', 'read', 'retracted')),
    acked       INTEGER NOT NULL DEFAULT 0,
    retraction  TEXT,
    sign_key    BLOB,                     -- the sender's identity key its header verified under (NULL: older store)
    erased      INTEGER                   -- when its file was erased (`valise erase`); the row stays, so the packet
                                          -- is recognised, acknowledged again and never taken in again
);
CREATE UNIQUE INDEX IF NOT EXISTS inbox_by_sender_id ON inbox (sender, packet_id);
CREATE INDEX IF NOT EXISTS inbox_by_id ON inbox (packet_id);  -- `read`, `erase` by id prefix
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL);
-- The log as this node verified it: the entries a restart re-folds (genesis, policy records), and the header
-- digests of this member's own "pkt" entries (to check receipts against).
CREATE TABLE IF NOT EXISTS log_kept (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log_mine (idx INTEGER PRIMARY KEY, digest BLOB NOT NULL);
-- Where the log holds packets addressed to this member that its inbox does not hold yet: a delivery signed by a
-- key its sender has since replaced is taken only if logged while that key was in force (session.py); and a
-- retraction logged before the packet arrived, which it arrives with.
CREATE TABLE IF NOT EXISTS log_received (
    digest      BLOB PRIMARY KEY,
    idx         INTEGER NOT NULL,
    expires     INTEGER NOT NULL,
    sender      TEXT NOT NULL,
    retraction  TEXT                      -- the sender's reason, once the log shows it retracted the packet
);
-- Entries served in full that hash to a verified root but wait for a checkpoint meeting the witness quorum
-- (node/follower.py): not folded, not used, until then.
CREATE TABLE IF NOT EXISTS log_pending (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS alarms (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL,
    evidence    BLOB                      -- e.g. a validly signed checkpoint that contradicts the verified one
);
"""

FOLLOWER_KEY = "follower"


AlarmRow = tuple[int, str, str, bytes | None]  # at, kind, message, evidence


@dataclass(frozen=True, slots=True)
class OutboxRow:
    packet_id: bytes
    digest: bytes
    recipients: list[str]
    created: int
    expires: int
    size: int
    state: str
    attempts: int
    next_try: float
    receipt: bytes | None
    log_index: int | None
    outcome: str | None
    in_log: int = 0
    receipted_at: float | None = None


@dataclass(frozen=True, slots=True)
class Alarm:
    id: int
    at: int
    kind: str
    message: str
    evidence: bytes | None


@dataclass(frozen=True, slots=True)
class InboxRow:
    digest: bytes
    packet_id: bytes
    sender: str
    received: int
    size: int
    labels: dict[str, object]
    state: str
    acked: bool
    retraction: str | None
    sign_key: bytes | None = None  # the sender's identity key the header verified under when it was taken
    erased: int | None = None  # when its file was erased (the packet is known, no longer held)

    @classmethod
    def of(cls, r: Sequence[Any]) -> InboxRow:
        # A store made before sign_key or erased, opened read-only (not migrated), has fewer columns.
        key = bytes(r[9]) if len(r) > 9 and r[9] is not None else None
        erased = int(r[10]) if len(r) > 10 and r[10] is not None else None
        return cls(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], bool(r[7]), r[8], key, erased)


@contextmanager
def writing(what: str, path: Path | None = None) -> Iterator[None]:
    """File system failures (a full disk, a size limit) as a StoreError naming the file and the cause. `path`:
    the file, for errors that do not carry it (a failed write or flush names none)."""
    try:
        yield
    except OSError as exc:
        file = exc.filename or path
        where = f" ({file})" if file else ""
        cause = exc.strerror or type(exc).__name__
        raise StoreError(
            f"could not write {what}{where}: {cause}", hint=sqlfile.failure_hint(exc), cause=cause
        ) from None


def _id_prefix(prefix: str) -> tuple[str, tuple[bytes, ...]]:
    """An SQL condition on `packet_id` for ids whose hex starts with `prefix`: the range [low, high) of the ids
    that start with its digits (an odd digit counts as the high half of the last byte)."""
    prefix = prefix.lower()
    if not prefix or any(c not in "0123456789abcdef" for c in prefix) or len(prefix) > 32:
        return "0", ()  # no packet id starts with it
    pad = "0" * (len(prefix) % 2)
    low = bytes.fromhex(prefix + pad)
    after = int(prefix, 16) + 1
    if after >> (4 * len(prefix)):  # all f: no upper bound
        return "packet_id >= ?", (low,)
    return "packet_id >= ? AND packet_id < ?", (low, bytes.fromhex(f"{after:0{len(prefix)}x}" + pad))


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _move_in(src: Path, dest: Path) -> None:
    """Make a finished file durable under its final name (fsync the data, rename, fsync the directory)."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dest)
    _fsync_dir(dest.parent)


def _head_digest(path: Path) -> bytes | None:
    """SHA-256 of the header of the packet file at `path` (how the log names a packet); None if it has none."""
    try:
        with open(path, "rb") as f:
            header = f.read(parse_prefix(f.read(PREFIX_SIZE)))
    except (OSError, Error):
        return None
    return hashlib.sha256(header).digest()


def _fsync_write(path: Path, data: bytes, mode: int = 0o666) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# A queued packet sealed afresh, beside the old file until its row names it (NodeStore.outbox_resealed).
RESEALED = ".resealed"
# A queued packet's kept content key (node/resealing.py): outbox/<packet id>.<header digest>.key, while queued.
KEPT = ".key"

# The outbox row's columns, in OutboxRow's order (a development version's store has one more, unused).
OUTBOX_COLUMNS = (
    "packet_id, digest, recipients, created, expires, size, state, attempts, next_try, receipt, log_index, outcome, "
    "in_log, receipted_at"
)
# What a report reads from a store made before `receipted_at`, opened read-only (not brought up to date).
OUTBOX_COLUMNS_BEFORE_RECEIPTED_AT = OUTBOX_COLUMNS.replace("receipted_at", "NULL")

# kv: the inbox files an erase has still to remove (NodeStore.inbox_erase).
ERASING = "inbox-erasing"

# Written beside node.db once a store exists: a missing or empty node.db next to it was lost, not never made.
STORE_MADE = "node.db.made"

# Tables every version of the store has had (later ones are added by CREATE IF NOT EXISTS when a newer daemon
# opens an older store): one missing means the file is damaged, never merely old.
CORE_TABLES = ("outbox", "inbox", "acks", "kv")


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Columns added since a table was first made (CREATE TABLE IF NOT EXISTS leaves an old table as it is)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(inbox)")}
    if "sign_key" not in columns:
        conn.execute("ALTER TABLE inbox ADD COLUMN sign_key BLOB")
    if "erased" not in columns:
        conn.execute("ALTER TABLE inbox ADD COLUMN erased INTEGER")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    if "receipted_at" not in columns:  # rows receipted before it get the time a daemon first sees them overdue
        conn.execute("ALTER TABLE outbox ADD COLUMN receipted_at REAL")
    if "content_key" in columns:  # a development version kept the content keys here (they lingered in the WAL)
        conn.execute("UPDATE outbox SET content_key = NULL")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(log_received)")}
    if "sender" not in columns:  # as a development version made it: no retraction can match its rows
        conn.execute("ALTER TABLE log_received ADD COLUMN sender TEXT NOT NULL DEFAULT ''")
        conn.execute("ALTER TABLE log_received ADD COLUMN retraction TEXT")


def _refuse_lost_store(root: Path, path: Path) -> None:
    """A missing or empty node.db where a store was kept is a lost one, not a new node: say so."""
    afresh = (
        f"or, to start afresh (the node forgets its verified log, alarms and outbox, follows the log again from "
        f"the start, and alarms once for the packets it acknowledged before, which the new inbox does not hold), "
        f"move {root / 'inbox'}, {root / 'outbox'} and {root / STORE_MADE} aside"
    )
    held = sorted(p.name for sub in ("inbox", "outbox") for p in (root / sub).glob("*.pkt"))
    if held:
        # A node that never ran has no packets: these are the files of a store that was lost or truncated.
        raise StoreError(
            f"{path} is missing or empty, but {root} holds {len(held)} packet file(s) it kept track of",
            hint=f"restore node.db from a backup of the node directory; {afresh}",
        )
    if (root / STORE_MADE).exists():
        # A store was made here: without it the node would forget its verified log (a witness would trust the
        # next checkpoint it sees, a rollback included), its alarms, and what it sent and received.
        raise StoreError(
            f"{path} is missing or empty, but this node has run with a store ({STORE_MADE} says so)",
            hint=f"restore node.db from a backup of the node directory; {afresh}",
        )


class NodeStore:
    def __init__(self, root: Path, conn: sqlite3.Connection) -> None:
        self.root = root
        self._db = sqlfile.Guarded(conn, f"the node store {root / 'node.db'}")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
        self._outbox_columns = OUTBOX_COLUMNS if "receipted_at" in columns else OUTBOX_COLUMNS_BEFORE_RECEIPTED_AT

    @classmethod
    def open(cls, root: Path) -> NodeStore:
        for sub in ("outbox", "inbox"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # Sends and deliveries cut off by a crash: nothing refers to them (a delivery is pushed again, a send was
        # never queued), and nothing else would ever delete them. Only the daemon opens the store (under its lock).
        for stale in (root / "tmp").glob("*.part"):
            stale.unlink(missing_ok=True)
        path = root / "node.db"
        made = root / STORE_MADE
        blank = sqlfile.is_blank(path)
        if blank:
            _refuse_lost_store(root, path)
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
            with sqlfile.closing_on_error(conn):
                if not blank:
                    sqlfile.check_tables(conn, path, CORE_TABLES)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                # What the store deletes is overwritten, not left in free pages (an erased packet's labels, say).
                # Many builds default to this; not all. (The write-ahead log still holds old pages for a while:
                # what must not outlive its use, a queued packet's content key, is never put here.)
                conn.execute("PRAGMA secure_delete=ON")
                conn.executescript(SCHEMA)
                _add_missing_columns(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open node store in {root}: {exc}", hint=sqlfile.failure_hint(exc)) from None
        if not made.exists():  # a new store, or one made before the marker existed
            _fsync_write(made, b"node.db was made in this directory: without it, it is a lost store\n")
        store = cls(root, conn)
        store._sweep_outbox()
        store.erase_leftovers()
        return store

    @classmethod
    def open_readonly(cls, root: Path) -> NodeStore:
        """The store of a daemon that is not running, for reports: nothing is created, swept or written.

        With no write-ahead log beside it (a daemon that stopped cleanly) the file is opened immutable: SQLite then
        creates no -wal or -shm file, and a read-only directory is fine. A daemon that crashed left a -wal holding
        its last commits, which only a (read-only) WAL reader sees; SQLite may need to create its -shm index."""
        path = (root / "node.db").resolve()
        if not path.is_file():
            _refuse_lost_store(root, path)  # the same answer as the daemon gives, not "run it once"
            raise StoreError(f"{root} has no node store yet", hint=f"run the daemon once: valise node run --dir {root}")
        wal = path.with_name(path.name + "-wal").exists()
        uri = f"{path.as_uri()}?mode=ro" + ("" if wal else "&immutable=1")
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            with sqlfile.closing_on_error(conn):
                sqlfile.check_tables(conn, path, CORE_TABLES)
        except sqlite3.Error as exc:
            hint = "the daemon stopped without closing it: a read needs to write node.db-shm there" if wal else None
            raise StoreError(f"cannot read the node store in {root}: {exc}", hint=hint) from None
        return cls(root, conn)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Read several tables as of one moment (a running daemon commits a checkpoint's changes together): each
        statement of an autocommit connection would otherwise see its own."""
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def _sweep_outbox(self) -> None:
        """A send is its file first, then its row: a crash in between left a file nothing refers to (and `send`
        reported a failure), which nothing else would ever delete. A packet sealed afresh that a crash left beside
        the old one goes in place if its row names it, else goes (outbox_resealed)."""
        digests = {bytes(r[0]).hex(): bytes(r[1]) for r in self._db.execute("SELECT packet_id, digest FROM outbox")}
        for path in (self.root / "outbox").glob(f"*{RESEALED}"):
            pid = path.name.removesuffix(RESEALED)
            if pid in digests and _head_digest(path) == digests[pid]:
                _move_in(path, self.outbox_path(bytes.fromhex(pid)))
            else:
                path.unlink(missing_ok=True)
        for path in (self.root / "outbox").glob("*.pkt"):
            if path.stem not in digests:
                path.unlink(missing_ok=True)
        for path in (self.root / "outbox").glob("*.part"):  # a write a crash cut short (_fsync_write)
            path.unlink(missing_ok=True)
        # Kept keys: only a queued packet's, under its current digest (a crash may leave one a reseal replaced,
        # or one whose packet left the queue).
        queued = {
            f"{bytes(r[0]).hex()}.{bytes(r[1]).hex()}{KEPT}"
            for r in self._db.execute("SELECT packet_id, digest FROM outbox WHERE state = 'queued'")
        }
        for path in (self.root / "outbox").glob(f"*{KEPT}"):
            if path.name not in queued:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        self._db.close()

    # --- outbox -------------------------------------------------------------------------------------

    def outbox_path(self, packet_id: bytes) -> Path:
        return self.root / "outbox" / f"{packet_id.hex()}.pkt"

    def enqueue(
        self, packet_id: bytes, digest: bytes, recipients: list[str], created: int, expires: int, packet: bytes
    ) -> None:
        """Durably queue a sealed packet for sending (file first, then the row)."""
        path = self.outbox_path(packet_id)
        with writing("the outbox", path):
            _fsync_write(path, packet)
        self._queue_row(path, (packet_id, digest, json.dumps(recipients), created, expires, len(packet)))

    def _queue_row(self, path: Path, row: tuple[object, ...]) -> None:
        """The outbox row of a packet whose file is in place; if it cannot be written, the file goes too (a file
        no row names would otherwise stay until the next start)."""
        try:
            self._db.execute(
                "INSERT INTO outbox (packet_id, digest, recipients, created, expires, size, state) "
                "VALUES (?, ?, ?, ?, ?, ?, 'queued')",
                row,
            )
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def outbox_resign(self, resign: Callable[[bytes, bytes], bytes | None]) -> tuple[int, list[str]]:
        """Give each queued packet the signature `resign(header, signature)` returns for it (None: keep it), in
        place: the header digest does not cover the signature, so the packet keeps its id and digest. For a member
        that moved to new keys (daemon.py). Returns how many changed, and what was wrong with those that could not
        be read or written (a damaged file must not stop the others, nor the daemon)."""
        changed, problems = 0, []
        for row in self._outbox("WHERE state = 'queued'", ()):
            path = self.outbox_path(row.packet_id)
            try:
                with open(path, "r+b") as f:
                    size = parse_prefix(f.read(PREFIX_SIZE))
                    header, old = f.read(size), f.read(SIGNATURE_SIZE)
                    if len(header) != size or len(old) != SIGNATURE_SIZE:
                        raise PacketError("the file ends inside the packet's head")
                    signature = resign(header, old)
                    if signature is None:
                        continue
                    f.seek(PREFIX_SIZE + len(header))
                    f.write(signature)
                    f.flush()
                    os.fsync(f.fileno())
            except (OSError, Error) as exc:
                problems.append(f"packet {row.packet_id.hex()} ({path.name}): {getattr(exc, 'what', None) or exc}")
                continue
            changed += 1
        return changed, problems

    def enqueue_file(
        self,
        packet_id: bytes,
        digest: bytes,
        recipients: list[str],
        created: int,
        expires: int,
        path: Path,
        content_key: bytes | None = None,
    ) -> None:
        """Durably queue a sealed packet already written to `path` (moved into the outbox; files first, then row),
        with its content key as resealing.keep_key sealed it (None: it cannot be sealed afresh)."""
        size = path.stat().st_size
        dest = self.outbox_path(packet_id)
        if content_key is not None:
            self._keep(packet_id, digest, content_key)
        try:
            with writing("the outbox", dest):
                _move_in(path, dest)
            self._queue_row(dest, (packet_id, digest, json.dumps(recipients), created, expires, size))
        except BaseException:
            self._kept_path(packet_id, digest).unlink(missing_ok=True)
            raise

    def _kept_path(self, packet_id: bytes, digest: bytes) -> Path:
        return self.root / "outbox" / f"{packet_id.hex()}.{digest.hex()}{KEPT}"

    def _keep(self, packet_id: bytes, digest: bytes, content_key: bytes) -> None:
        """The packet's kept content key in a file of its own, never in node.db: SQLite leaves what it overwrites
        in its write-ahead log (and, on some builds, in free pages), and a copy of a running node's directory
        would then hold the key to a packet long sent. A file removed once the packet leaves the queue is gone
        from every later copy."""
        path = self._kept_path(packet_id, digest)
        with writing("the outbox", path):
            _fsync_write(path, content_key, 0o600)

    def outbox_kept_key(self, row: OutboxRow) -> bytes | None:
        """A queued packet's kept content key (sealed to this member), or None if it has none."""
        try:
            return self._kept_path(row.packet_id, row.digest).read_bytes()
        except FileNotFoundError:
            return None

    def _drop_kept(self, packet_id: bytes) -> None:
        """The packet left the queue (receipted, denied, expired, cancelled): its kept key goes. (One a crash left
        behind goes at the next open: _sweep_outbox.)"""
        row = self._db.execute("SELECT digest FROM outbox WHERE packet_id = ?", (packet_id,)).fetchone()
        if row is not None:
            self._kept_path(packet_id, bytes(row[0])).unlink(missing_ok=True)

    def _resealed_path(self, packet_id: bytes) -> Path:
        return self.root / "outbox" / f"{packet_id.hex()}{RESEALED}"

    def outbox_resealed(
        self, packet_id: bytes, path: Path, digest: bytes, created: int, content_key: bytes, said: str
    ) -> bool:
        """Put the packet sealed afresh at `path` (packet.reseal) in place of the queued one, due now, counting
        the refusal as an attempt and `said` as its last error. False if the packet is no longer queued (then
        `path` goes).

        The new file goes in beside the old one first, then the row commits, then it replaces the old file: a
        crash between the last two leaves a `.resealed` file whose digest the row names, which the next open puts
        in place (`_sweep_outbox`); a crash before the commit, one it names not, which goes. The other orders could
        leave a row naming one packet and a file holding another: a receipt for it would not match."""
        old = self.outbox_get(packet_id)
        beside = self._resealed_path(packet_id)
        self._keep(packet_id, digest, content_key)  # named by the new digest: the old key file stays meanwhile
        with writing("the outbox", beside):
            _move_in(path, beside)
        cur = self._db.execute(
            "UPDATE outbox SET digest = ?, created = ?, size = ?, next_try = 0, outcome = ?, "
            "attempts = attempts + 1 WHERE packet_id = ? AND state = 'queued'",
            (digest, created, beside.stat().st_size, json.dumps({"error": said}), packet_id),
        )
        if not cur.rowcount or old is None:
            beside.unlink(missing_ok=True)
            self._kept_path(packet_id, digest).unlink(missing_ok=True)
            return False
        dest = self.outbox_path(packet_id)
        with writing("the outbox", dest):
            _move_in(beside, dest)
        self._kept_path(packet_id, old.digest).unlink(missing_ok=True)
        return True

    def tmp_path(self, name: str) -> Path:
        """A scratch file in the store's file system (so that moving it into place is a rename)."""
        (self.root / "tmp").mkdir(exist_ok=True)
        return self.root / "tmp" / name

    def _outbox(self, where: str, args: tuple[object, ...]) -> list[OutboxRow]:
        rows = self._db.execute(f"SELECT {self._outbox_columns} FROM outbox {where}", args).fetchall()
        return [OutboxRow(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]

    def outbox_get(self, packet_id: bytes) -> OutboxRow | None:
        rows = self._outbox("WHERE packet_id = ?", (packet_id,))
        return rows[0] if rows else None

    def outbox_due(self, now: float, limit: int = 64, *, horizon: float = math.inf) -> list[OutboxRow]:
        """Queued rows due at `now`, and those whose next try lies more than `horizon` seconds ahead: no retry is
        put off that long, so the clock stepped back since it was set (by as much as it is ahead), and the packet
        would otherwise wait that long for nothing."""
        return self._outbox(
            "WHERE state = 'queued' AND (next_try <= ? OR next_try > ?) ORDER BY created LIMIT ?",
            (now, now + horizon, limit),
        )

    def outbox_page(self, after: int, limit: int) -> list[tuple[int, OutboxRow]]:
        """Up to `limit` rows after position `after`, in the order they were queued, each with its position."""
        rows = self._db.execute(
            f"SELECT rowid, {self._outbox_columns} FROM outbox WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, limit)
        )
        return [(r[0], OutboxRow(r[1], r[2], json.loads(r[3]), *r[4:])) for r in rows]

    def outbox_all(self) -> list[OutboxRow]:
        return self._outbox("ORDER BY created", ())

    def outbox_retry_later(self, packet_id: bytes, next_try: float, error: str) -> None:
        self._db.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_try = ?, outcome = ? WHERE packet_id = ?",
            (next_try, json.dumps({"error": error}), packet_id),
        )

    def outbox_receipted(self, packet_id: bytes, receipt: bytes, log_index: int, at: float) -> None:
        """The broker's receipt, and `at`, when this node had it by its own clock."""
        self._db.execute(
            "UPDATE outbox SET state = 'receipted', receipt = ?, log_index = ?, outcome = NULL, receipted_at = ? "
            "WHERE packet_id = ?",
            (receipt, log_index, at, packet_id),
        )
        self._drop_kept(packet_id)

    def outbox_denied(self, packet_id: bytes, reasons: dict[str, str]) -> None:
        self._db.execute(
            "UPDATE outbox SET state = 'denied', outcome = ? WHERE packet_id = ?", (json.dumps(reasons), packet_id)
        )
        self._drop_kept(packet_id)

    def outbox_failed(self, packet_id: bytes, code: str, message: str) -> None:
        """The broker refused the packet for good (not a policy denial): keep its code and message."""
        self._db.execute(
            "UPDATE outbox SET state = 'denied', outcome = ? WHERE packet_id = ?",
            (json.dumps({"error": {"code": code, "message": message}}), packet_id),
        )
        self._drop_kept(packet_id)

    def outbox_tried(self, packet_id: bytes) -> None:
        """A submission of a queued packet went out, in part or whole, with no answer (the connection ended): it
        counts as an attempt, and the packet can no longer be cancelled here (the broker may have logged it)."""
        self._db.execute(
            "UPDATE outbox SET attempts = attempts + 1 WHERE packet_id = ? AND state = 'queued'", (packet_id,)
        )

    def outbox_all_tried(self) -> int:
        """Count every queued packet never tried as tried (after a daemon that did not stop cleanly: it may have
        been sending one). Returns how many."""
        cur = self._db.execute("UPDATE outbox SET attempts = 1 WHERE state = 'queued' AND attempts = 0")
        return cur.rowcount

    def outbox_cancelled(self, packet_id: bytes, reason: str) -> bool:
        """Withdraw a packet never submitted (its sender retracted it while it waited): it will not be sent. It is
        kept as denied, with the sender's reason, and its file goes. False if it was not queued and untried."""
        cur = self._db.execute(
            "UPDATE outbox SET state = 'denied', outcome = ? WHERE packet_id = ? AND state = 'queued' AND attempts = 0",
            (json.dumps({"cancelled": reason or "retracted by its sender before it was sent"}), packet_id),
        )
        if cur.rowcount:
            self.outbox_path(packet_id).unlink(missing_ok=True)
            self._drop_kept(packet_id)
        return cur.rowcount > 0

    def outbox_expired(self, packet_id: bytes) -> None:
        self._db.execute("UPDATE outbox SET state = 'expired' WHERE packet_id = ?", (packet_id,))
        self._drop_kept(packet_id)

    def outbox_unchecked(self, below: int) -> list[OutboxRow]:
        """Receipted packets whose log index is below `below` (a verified size) and not yet checked in the log."""
        return self._outbox("WHERE state = 'receipted' AND in_log = 0 AND log_index < ? ORDER BY log_index", (below,))

    def outbox_receipted_beyond(self, size: int) -> list[OutboxRow]:
        """Receipted packets whose log index a tree of `size` entries does not reach yet."""
        return self._outbox("WHERE state = 'receipted' AND in_log = 0 AND log_index >= ? ORDER BY log_index", (size,))

    def outbox_receipt_seen(self, packet_id: bytes, at: float) -> None:
        """A receipt kept by a store older than `receipted_at`: count its grace from `at`, when first looked at."""
        self._db.execute(
            "UPDATE outbox SET receipted_at = ? WHERE packet_id = ? AND receipted_at IS NULL", (at, packet_id)
        )

    def outbox_in_log(self, packet_id: bytes, value: int) -> None:
        """1: the verified log holds the receipt's entry; -1: it holds something else there (an alarm)."""
        self._db.execute("UPDATE outbox SET in_log = ? WHERE packet_id = ?", (value, packet_id))

    def record_ack(self, packet_id: bytes, recipient: str, notice: bytes) -> bool:
        cur = self._db.execute("INSERT OR IGNORE INTO acks VALUES (?, ?, ?)", (packet_id, recipient, notice))
        return cur.rowcount > 0

    def ack_count(self) -> int:
        """How many signed acknowledgements (one per packet and recipient) this member has received."""
        (n,) = self._db.execute("SELECT count(*) FROM acks").fetchone()
        return int(n)

    def acks_for(self, packet_id: bytes) -> dict[str, bytes]:
        rows = self._db.execute("SELECT recipient, notice FROM acks WHERE packet_id = ?", (packet_id,)).fetchall()
        return {r[0]: r[1] for r in rows}

    # --- inbox --------------------------------------------------------------------------------------

    def inbox_path(self, digest: bytes) -> Path:
        return self.root / "inbox" / f"{digest.hex()}.pkt"

    def open_inbox_packet(self, digest: bytes) -> BinaryIO:
        """A received packet's file, or an error that names it (not the file `read` was writing to)."""
        path = self.inbox_path(digest)
        try:
            return path.open("rb")
        except OSError as exc:
            raise StoreError(
                f"the inbox file of this packet, {path}, cannot be read: {exc.strerror}",
                hint="restore it from a backup of the node directory",
            ) from None

    def inbox_add(
        self, digest: bytes, packet_id: bytes, sender: str, received: int, labels: dict[str, object], packet: bytes
    ) -> bool:
        """Keep a delivered packet (still encrypted). False if it was already there (a redelivery)."""
        if self.inbox_get(digest) is not None:
            return False
        with writing("the inbox", self.inbox_path(digest)):
            _fsync_write(self.inbox_path(digest), packet)
        cur = self._db.execute(
            "INSERT OR IGNORE INTO inbox (digest, packet_id, sender, received, size, labels, state) "
            "VALUES (?, ?, ?, ?, ?, ?, 'new')",
            (digest, packet_id, sender, received, len(packet), json.dumps(labels)),
        )
        return cur.rowcount > 0

    def inbox_add_file(
        self,
        digest: bytes,
        packet_id: bytes,
        sender: str,
        received: int,
        labels: dict[str, object],
        path: Path,
        sign_key: bytes | None = None,
    ) -> bool:
        """Keep a delivered packet spooled at `path` (moved in), whose header verified under the sender's identity
        key `sign_key`. False if it was already there (a redelivery).

        Another packet under a packet id this sender already used is refused (PacketError) and its file removed:
        one sender's packet id names one packet (the broker refuses such a replay; this holds if it does not)."""
        if self.inbox_get(digest) is not None:
            path.unlink(missing_ok=True)
            return False
        row = self._db.execute("SELECT digest FROM inbox WHERE sender = ? AND packet_id = ?", (sender, packet_id))
        if row.fetchone() is not None:
            path.unlink(missing_ok=True)
            raise PacketError(f"packet id {packet_id.hex()} from {sender} is already in the inbox for another packet")
        size = path.stat().st_size
        dest = self.inbox_path(digest)
        with writing("the inbox", dest):
            _move_in(path, dest)
        with self._unless_kept(dest), self._tx():
            # Retracted already, if the log showed its sender's retraction before it arrived.
            found = self._db.execute(
                "SELECT retraction FROM log_received WHERE digest = ? AND sender = ?", (digest, sender)
            ).fetchone()
            retraction = None if found is None else found[0]
            cur = self._db.execute(
                "INSERT OR IGNORE INTO inbox (digest, packet_id, sender, received, size, labels, state, sign_key, "
                "retraction) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (digest, packet_id, sender, received, size, json.dumps(labels),
                 "new" if retraction is None else "retracted", sign_key, retraction),
            )  # fmt: skip
            self._db.execute("DELETE FROM log_received WHERE digest = ?", (digest,))
        return cur.rowcount > 0

    @contextmanager
    def _unless_kept(self, path: Path) -> Iterator[None]:
        """Remove the inbox file `path` if the block that records it fails: the packet was not taken (nor
        acknowledged), the broker delivers it again, and a file no row names would never be removed."""
        try:
            yield
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def received_index(self, digest: bytes) -> int | None:
        """Where the verified log holds a packet addressed to this member that the inbox does not hold yet."""
        row = self._db.execute("SELECT idx FROM log_received WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else int(row[0])

    def retraction_wanted(self, digest: bytes, sender: str) -> bool:
        """Whether a retraction of packet `digest` by `sender` would change anything: the inbox holds the packet
        from that sender, not marked retracted yet, or the log holds it, addressed to this member, still to come."""
        row = self._db.execute("SELECT sender, state FROM inbox WHERE digest = ?", (digest,)).fetchone()
        if row is not None:
            return bool(row[0] == sender and row[1] != "retracted")
        coming = self._db.execute("SELECT sender FROM log_received WHERE digest = ?", (digest,)).fetchone()
        return coming is not None and coming[0] == sender

    def _inbox(self, where: str, args: tuple[object, ...]) -> list[InboxRow]:
        rows = self._db.execute(f"SELECT * FROM inbox {where}", args).fetchall()
        return [InboxRow.of(r) for r in rows]

    def inbox_page(self, after: int, limit: int) -> list[tuple[int, InboxRow]]:
        """Up to `limit` held rows (not erased) after position `after`, in the order they arrived, each with its
        position."""
        rows = self._db.execute(
            "SELECT rowid, * FROM inbox WHERE rowid > ? AND erased IS NULL ORDER BY rowid LIMIT ?", (after, limit)
        )
        return [(r[0], InboxRow.of(r[1:])) for r in rows]

    def inbox_counts(self) -> tuple[dict[str, int], int]:
        """How many packets the inbox holds in each state, and how many it erased."""
        erased = "erased IS NULL" if self._has_erased() else "1"
        rows = self._db.execute(
            f"SELECT CASE WHEN {erased} THEN state ELSE '' END AS s, count(*) FROM inbox GROUP BY s"
        )
        counts = {str(r[0]): int(r[1]) for r in rows}
        return counts, counts.pop("", 0)

    def _has_erased(self) -> bool:
        """Whether the inbox has its `erased` column (a store not migrated yet, opened read-only, has not)."""
        return any(row[1] == "erased" for row in self._db.execute("PRAGMA table_info(inbox)"))

    def inbox_erasable(self, *, before: int | None, retracted: bool, sender: str | None = None) -> list[InboxRow]:
        """Held packets received before `before` (if given), from `sender` (if given) and, with `retracted`,
        retracted by their sender."""
        where, args = ["erased IS NULL" if self._has_erased() else "1"], list[int | str]()
        if before is not None:
            where.append("received < ?")
            args.append(before)
        if sender is not None:
            where.append("sender = ?")
            args.append(sender)
        if retracted:
            where.append("state = 'retracted'")
        return self._inbox(f"WHERE {' AND '.join(where)} ORDER BY received", tuple(args))

    def inbox_erase(self, digests: Sequence[bytes], at: int) -> int:
        """Erase held packets: their rows are marked (and kept, so that a redelivery is known and acknowledged
        again, never taken in again) and their files removed. Returns how many were erased.

        The marks commit first, with the list of files to remove: a crash before they are all gone leaves that
        list, and the next erase (or `erase_leftovers`) finishes it. The other order could leave a row that
        promises a file no longer there."""
        digests = list(dict.fromkeys(digests))
        self.erase_leftovers()  # an earlier list not finished is finished first, never overwritten
        with self._tx():
            erased = 0
            for digest in digests:
                cur = self._db.execute("UPDATE inbox SET erased = ? WHERE digest = ? AND erased IS NULL", (at, digest))
                erased += cur.rowcount
            self.put(ERASING, " ".join(d.hex() for d in digests).encode())
        self.erase_leftovers()
        return erased

    def erase_leftovers(self) -> None:
        """Remove the files an interrupted `inbox_erase` left (nothing if none)."""
        pending = self.get(ERASING)
        if pending is None:
            return
        for digest in pending.decode().split():
            self.inbox_path(bytes.fromhex(digest)).unlink(missing_ok=True)
        _fsync_dir(self.root / "inbox")
        self._db.execute("DELETE FROM kv WHERE k = ?", (ERASING,))

    def inbox_get(self, digest: bytes) -> InboxRow | None:
        rows = self._inbox("WHERE digest = ?", (digest,))
        return rows[0] if rows else None

    def inbox_has(self, digest: bytes) -> bool:
        return self._db.execute("SELECT 1 FROM inbox WHERE digest = ?", (digest,)).fetchone() is not None

    def inbox_find(self, prefix: str, sender: str | None = None) -> list[InboxRow]:
        """Inbox rows whose packet id (hex) starts with `prefix`, from `sender` if given: a range of the packet id
        index, not a scan (an inbox keeps a row per packet ever received, erased ones too)."""
        where, args = _id_prefix(prefix)
        if sender is None:
            return self._inbox(f"WHERE {where} ORDER BY received", args)
        # Two senders may use the same packet id: (sender, packet id) is the packet.
        return self._inbox(f"WHERE {where} AND sender = ? ORDER BY received", (*args, sender))

    def outbox_find(self, prefix: str) -> list[OutboxRow]:
        """Outbox rows whose packet id (hex) starts with `prefix` (a range of its primary key)."""
        where, args = _id_prefix(prefix)
        return self._outbox(f"WHERE {where} ORDER BY created", args)

    def inbox_all(self) -> list[InboxRow]:
        return self._inbox("ORDER BY received", ())

    def inbox_unacked(self) -> list[InboxRow]:
        return self._inbox("WHERE acked = 0 ORDER BY received", ())

    def inbox_mark(
        self, digest: bytes, *, state: str | None = None, acked: bool | None = None, retraction: str | None = None
    ) -> None:
        if state is not None:
            self._db.execute("UPDATE inbox SET state = ? WHERE digest = ?", (state, digest))
        if acked is not None:
            self._db.execute("UPDATE inbox SET acked = ? WHERE digest = ?", (int(acked), digest))
        if retraction is not None:
            self._db.execute("UPDATE inbox SET retraction = ? WHERE digest = ?", (retraction, digest))

    # --- the verified log and alarms ------------------------------------------------------------------

    def follower_commit(
        self,
        state: bytes,
        keep: list[tuple[int, bytes]],
        mine: list[tuple[int, bytes]],
        pending: Sequence[tuple[int, bytes]] = (),
        trusted: int | None = None,
        acks: Sequence[tuple[bytes, str, bytes]] = (),
        alarms: Sequence[AlarmRow] = (),
        received: Sequence[tuple[int, bytes, int, str]] = (),
        retracted: Sequence[tuple[bytes, str, str]] = (),
        now: int = 0,
    ) -> int:
        """Persist an accepted checkpoint and what it brought, in one transaction (all or nothing): entries to
        keep, this member's packets, entries pending a quorum, (`trusted`) the size below which no entry is
        pending any more, acknowledgements of this member's packets (packet id, recipient, signed notice) read in
        the log, where packets addressed to it are logged (index, digest, expires, sender; those expired by `now`
        go), and retractions (digest, sender, reason) of packets in its inbox or still to come. Returns how many of
        those acknowledgements were new."""
        with self._tx():
            rows = [(d, i, e, s) for i, d, e, s in received]
            # The first position stands (a broker logging a packet again moves neither it nor a retraction kept).
            self._db.executemany(
                "INSERT INTO log_received (digest, idx, expires, sender) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (digest) DO NOTHING",
                rows,
            )
            self._db.execute("DELETE FROM log_received WHERE expires <= ?", (now,))
            for table, marks in (("inbox", "state = 'retracted', retraction = ?"), ("log_received", "retraction = ?")):
                self._db.executemany(
                    f"UPDATE {table} SET {marks} WHERE digest = ? AND sender = ?", [(r, d, s) for d, s, r in retracted]
                )
            self._db.executemany("INSERT OR REPLACE INTO log_kept VALUES (?, ?)", keep)
            self._db.executemany("INSERT OR REPLACE INTO log_mine VALUES (?, ?)", mine)
            self._db.executemany("INSERT OR REPLACE INTO log_pending VALUES (?, ?)", pending)
            if trusted is not None:
                self._db.execute("DELETE FROM log_pending WHERE idx < ?", (trusted,))
            new_acks = self._db.executemany("INSERT OR IGNORE INTO acks VALUES (?, ?, ?)", acks).rowcount if acks else 0
            self._db.executemany("INSERT INTO alarms (at, kind, message, evidence) VALUES (?, ?, ?, ?)", alarms)
            self.put(FOLLOWER_KEY, state)
        return new_acks

    def follower_pending(self) -> list[tuple[int, bytes]]:
        rows = self._db.execute("SELECT idx, entry FROM log_pending ORDER BY idx").fetchall()
        return [(r[0], bytes(r[1])) for r in rows]

    def follower_load(self) -> tuple[bytes | None, list[tuple[int, bytes]]]:
        rows = self._db.execute("SELECT idx, entry FROM log_kept ORDER BY idx").fetchall()
        return self.get(FOLLOWER_KEY), [(r[0], bytes(r[1])) for r in rows]

    def my_entry_digest(self, index: int) -> bytes | None:
        row = self._db.execute("SELECT digest FROM log_mine WHERE idx = ?", (index,)).fetchone()
        return bytes(row[0]) if row else None

    def alarm_add(self, at: int, kind: str, message: str, evidence: bytes | None = None) -> None:
        self._db.execute(
            "INSERT INTO alarms (at, kind, message, evidence) VALUES (?, ?, ?, ?)", (at, kind, message, evidence)
        )

    def alarms(self, *, latest: int | None = None) -> list[Alarm]:
        """The alarms, oldest first; only the `latest` ones if given."""
        query = "SELECT id, at, kind, message, evidence FROM alarms ORDER BY id"
        if latest is not None:
            query = f"SELECT * FROM ({query} DESC LIMIT {int(latest)}) ORDER BY id"
        rows = self._db.execute(query).fetchall()
        return [Alarm(r[0], r[1], r[2], r[3], None if r[4] is None else bytes(r[4])) for r in rows]

    def alarm_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM alarms").fetchone()[0])

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # A COMMIT that failed (a full disk) may have rolled back already, and then ROLLBACK fails: harmless.
            with contextlib.suppress(StoreError):
                self._db.execute("ROLLBACK")
            raise

    # --- small durable values (last verified checkpoint, witness state) ---------------------------------

    def get(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def put(self, key: str, value: bytes) -> None:
        self._db.execute(
            "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v", (key, value)
        )
