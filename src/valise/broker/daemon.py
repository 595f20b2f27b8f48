"""The broker daemon: mutual-TLS listener, per-member sessions, group commit, checkpoints, tiles over HTTP.

Structure (trio): one nursery for the daemon's own tasks (committer, checkpointer, purger, policy watcher, the
TLS and HTTP listeners), and one nursery per connection (its reader, its pusher: session.py). Entries wait for
the committer as queued.Waiter; witnesses are asked as cosign.py says. All state lives in this
process's memory or in SQLite; every mutation of the log goes through the committer, which appends a batch in
one transaction (group commit), folds it into the policy state, applies the mailbox changes of the batch in one
more transaction, and only then wakes the tasks waiting on it. So a receipt is never sent for a packet that is
not durable in both the log and the recipients' mailboxes.

Order of checks for a packet: specs/protocol.md, "Relaying a packet" (relay.py holds the pure part).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from valise import encoding, gctune, keyfiles, records, stopsignals, tls
from valise.broker import cosign, fairshare, fds, http, policyfold, ratelimit, relay, spool
from valise.broker.cosign import COSIGN_TIMEOUT, CosignRound, pick_witnesses
from valise.broker.fds import listen_tcp
from valise.broker.home import BrokerConfig, BrokerHome
from valise.broker.mailbox import Mailboxes, MailItem, PacketRow
from valise.broker.queued import NotQueued, Waiter
from valise.broker.readers import readers_of
from valise.broker.session import Session
from valise.broker.spool import Spool
from valise.daemonlock import DaemonLock
from valise.errors import (
    AccessError,
    Error,
    KeyFileError,
    LimitError,
    PolicyError,
    StoreError,
    StoreMoved,
)
from valise.genesis import Genesis
from valise.identity import PublicBundle
from valise.logservice import DEFAULT_MAX_PENDING
from valise.packet.format import Header
from valise.policy.state import ACTIVE, PolicyState
from valise.store import sqlfile
from valise.store.base import MAX_ENTRY_SIZE
from valise.store.sqlite import SqliteLog
from valise.tlog import cosignature, note
from valise.tlsstream import TLSSocketStream
from valise.wire import codes

log = logging.getLogger("valise.broker")

HANDSHAKE_TIMEOUT = 10.0  # TLS and hello, from the connection's start
SHUTDOWN_GRACE = 5.0
POLICY_LOCK_POLL = 0.05  # seconds between two tries of the lock operator commands hold while they append
# After a refused handshake, how long the peer may take to read the TLS alert that says why before the close.
REFUSAL_LINGER = 1.0
AUDITORS_PER_MEMBER = 4  # auditor connections one member may have open at once (BrokerDaemon.register)
# Connections that have not yet completed TLS and hello (see BrokerDaemon._handle).
MAX_UNAUTHENTICATED = 1024


@dataclass(slots=True)
class Settings:
    listen: tuple[str, int] = ("127.0.0.1", 7443)
    http: tuple[str, int] | None = None
    flush_interval: float = 0.002  # group commit: how long the committer gathers entries before a flush
    checkpoint_interval: float = 1.0
    purge_interval: float = 5.0
    policy_poll: float = 1.0
    window: int = relay.DEFAULT_WINDOW
    spool_reserve: int = spool.RESERVE  # free disk uploads never eat into (spool.py)
    # An upload to a file that averages less than this many bytes a second once it has run for `upload_grace`
    # seconds is given up: its disk room is promised to it, and a byte now and then (which beats the stall
    # timeout) would otherwise hold that room for good. 16 KiB/s is 128 kbit/s: far below any link a member uses.
    upload_floor: int = 16 * 1024
    upload_grace: float = 60.0
    serve_entries: bool = False  # entry bundles over HTTP (every record in full): for an auditors-only address
    rebuild_mailboxes: bool = False  # start with a missing mailbox.db although the log holds traffic (see below)
    clock: Callable[[], float] = time.time


# What a peer can cause by going away or by speaking broken TLS: routine, logged at info level.
DISCONNECTS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, tls.TLSPeerError)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc.__cause__ or exc


def _purge_nonce() -> bytes:
    return secrets.token_bytes(records.PURGE_NONCE_SIZE)


def _is_packet(entry: bytes) -> bool:
    try:
        return records.entry_type(entry)[0] == "pkt"
    except Error:
        return False


class BrokerDaemon:
    def __init__(self, home: BrokerHome, settings: Settings | None = None, passphrase: bytes | None = None) -> None:
        """`passphrase`: of the broker's identity and log keys, if `broker init` sealed them."""
        self.home = home
        self.settings = settings or Settings()
        cfg = home.config()
        self.origin = cfg.origin
        self.broker_id = cfg.broker_id
        self.identity = home.broker_identity(passphrase)
        self._tls_password = passphrase  # the TLS key file is sealed with the same passphrase (keyfiles.py)
        self.store = SqliteLog.open(home.db_path)
        try:
            self._open(home, cfg, passphrase)
        except BaseException:  # refused at start (a damaged store, a key file): close what is open, then say why
            self._close_opened()
            raise

    def _open(self, home: BrokerHome, cfg: BrokerConfig, passphrase: bytes | None) -> None:
        # One transaction per flush (max_batch = max_pending): a batch is in the log whole or not at all, which the
        # committer's bookkeeping (every waiter told the same outcome) relies on.
        self.log = home.log_service(
            self.store,
            passphrase,
            signing=True,
            interval=self.settings.checkpoint_interval,
            max_batch=DEFAULT_MAX_PENDING,
            max_pending=DEFAULT_MAX_PENDING,
        )
        self._check_mailboxes_expected()
        self.mail = Mailboxes.open(home.mailbox_path)
        self.spool = Spool(home.root / "spool", self.settings.spool_reserve)
        self.genesis = Genesis.parse(self.store.entries(0, 1)[0], origin=cfg.origin)
        # Entries in our own store were verified when they were appended; re-folding them skips the signatures, and
        # reads only the entries recorded as public where the mailboxes recorded readers (broker/policyfold.py).
        self.policy = PolicyState(cfg.origin, self.genesis.operator_key, verify_signatures=False)
        self.policy_changes = 0  # policy records applied so far: a decision taken before the last one is re-taken
        index = policyfold.read_public_index(home.mailbox_path, self.store)
        if index.mismatch is not None:
            # Mailboxes that describe another log than this one would deliver, and fold, by the wrong entries.
            raise StoreError(
                f"{home.mailbox_path.name} does not match the log in {home.db_path.name}: {index.mismatch}",
                hint="were they restored from different backups? restore both from the same one",
            )
        policyfold.fold(self.policy, self.store, self.store.size(), index, self._refused)
        self.policy.verify_signatures = True
        self._unlinks: list[Path] = []  # spool files of bodies dropped in the open batch: unlinked after it commits
        # In-memory changes that go with the open mailbox batch's changes, made once it commits: a COMMIT that
        # fails (a full disk) must not leave the broker believing what the store does not hold (see effects()).
        self._at_commit: list[Callable[[], object]] = []
        self._in_effects = False
        # (sender, packet id) → (index, digest, at) of packets logged whose body a crash lost (see _replay_packet).
        self.statement_budget = ratelimit.MemberBuckets(ratelimit.BURST, ratelimit.RATE)  # statements over the wire
        # The log lines each member's frames may cause: its refusals of pushed items, and apart, its cosigning
        # (a witness's conflict is the operator's sign of a fork; a member refusing what others send it, or
        # sending it what it must refuse, must not use up the room for that).
        self.log_budget = ratelimit.LogBudget()
        self.shares = fairshare.CpuShares()  # each member's recent use of this thread (session.py charges it)
        self.thread_busy = 0.0  # the share of this thread the broker used lately (_load_meter)
        self.cosign_log_budget = ratelimit.LogBudget()
        self.orphans: dict[tuple[str, bytes], tuple[int, bytes, int]] = {}
        self.acks_pending: set[tuple[str, bytes]] = set()  # (recipient, digest): acknowledgements being logged
        self.purging: set[tuple[str, bytes]] = set()  # (recipient, digest): purges logged, not applied (NotQueued)
        self.retracting: dict[bytes, tuple[Waiter, int]] = {}  # digest → the retraction being logged, its receipt time
        # A crash between the log's commit and the mailboxes' leaves the last batch's mailbox changes undone: they
        # are redone from the log, from the mark the mailboxes keep (`applied_size`), before anyone connects.
        applied = self.mail.applied_size()
        self._check_mailboxes_current(applied)
        with self.effects():
            # A mailbox database from before the mark: only packets after the newest it knows can be missing.
            self._catch_up(self.store.size(), effects_from=applied if applied is not None else self._legacy_mark())
        if swept := self.spool.sweep(self.mail):
            log.warning("removed %d spool file(s) that no mailbox item refers to", swept)
        self.orphans.update(self.mail.orphans())  # and those of earlier crashes
        self.ahead: set[str] = set()  # members that said they verified more than we signed (member_is_ahead)
        self.sessions: dict[str, Session] = {}  # each member's node connection (role "node"): at most one
        # Connections with role "auditor" (wire.md): a member's monitoring script reading the log beside its node.
        # Pushed nothing and replacing no node; at most AUDITORS_PER_MEMBER per member (the oldest goes).
        self.auditors: dict[str, list[Session]] = {}
        self.mail.on_posted = self._offer  # from here on, committed items go to their members' sessions too
        self._waiters: list[Waiter] = []
        self._confirmations: list[tuple[str, str, bytes]] = []
        self.batches = 0  # commit batches so far (a log entry's group commit shares one with the others queued)
        self.recorded = 0  # bumped whenever packets may have been recorded in the mailboxes since
        self._cosign_turn = 0  # checkpoints sent out for cosigning (see pick_witnesses)
        self.withdrawals = 0  # packets taken out of mailboxes undelivered (retracted, purged) so far
        self.refusals = 0  # pushed items members refused (`refuse`): they stay in the mailboxes
        self._wake_committer = trio.Event()
        self._policy_lock = trio.Lock()
        self._policy_lock_file = open(home.policy_lock_path, "a+b")  # noqa: SIM115 - held for the daemon's life
        self.published: bytes = self.log.latest.note if self.log.latest else self.log.sign().note
        self._bundles: dict[bytes, PublicBundle] = {}
        self._tls_members: dict[bytes, str] = {}
        self._tls_failed_for: dict[bytes, str] | None = None  # the member list a TLS context could not be made for
        self._tls_context: ssl.SSLContext | None = None
        self._refresh_tls()
        self._sessions_changed = trio.Event()
        self._unauthenticated: dict[trio.CancelScope, None] = {}  # insertion-ordered: oldest first
        self._max_unauthenticated = MAX_UNAUTHENTICATED  # lowered to the descriptor budget in serve()
        self.connections = 0
        self.port = 0
        self.http_port = 0

    def _close_opened(self) -> None:
        for name in ("mail", "store", "_policy_lock_file"):
            opened = getattr(self, name, None)
            if opened is not None:
                opened.close()

    # --- policy and directory ---------------------------------------------------------------------------------

    def now(self) -> int:
        return int(self.settings.clock())

    def _fold(self, upto: int) -> None:
        """Fold log entries [policy.size, upto) into the policy state, in order."""
        while self.policy.size < upto:
            self._apply(self.store.entries(self.policy.size, min(upto, self.policy.size + 4096)))

    def _apply(self, entries: list[bytes]) -> None:
        for entry in entries:
            try:
                if self.policy.apply(entry) is not None:
                    self.policy_changes += 1
            except (PolicyError, Error) as exc:
                self._refused(self.policy.size, exc)
                self.policy.skip_to(self.policy.size + 1)

    @staticmethod
    def _refused(index: int, exc: Error) -> None:
        # An entry the policy refuses (appended by another writer that raced us) stays in the log with no effect;
        # an auditor's replay reports it the same way.
        log.error("log entry %d has no policy effect: %s", index, exc)

    def _check_mailboxes_expected(self) -> None:
        """Refuse to start on a missing or empty mailbox.db when the log holds traffic: it was lost or truncated,
        and SQLite would start a new, empty one without a word.

        Started anyway (`--rebuild-mailboxes`), the broker replays the whole log into the new store, as after any
        crash: unacknowledged packets are queued again, but the bodies of small packets lived in the lost file,
        so those become orphans that expire unless their senders send them again."""
        path = self.home.mailbox_path
        if not sqlfile.is_blank(path) or self.settings.rebuild_mailboxes:
            return
        size = self.store.size()
        for start in range(1, size, 4096):
            for entry in self.store.entries(start, min(size, start + 4096)):
                if _is_packet(entry):
                    raise StoreError(
                        f"{path} is missing or empty, but the log holds relayed packets: the delivery queues are lost",
                        hint="restore mailbox.db from the backup of broker.db; or rebuild it from the log with "
                        "valise broker serve --rebuild-mailboxes (small packets not yet delivered are then lost)",
                    )

    def _check_mailboxes_current(self, applied: int | None) -> None:
        """Refuse to start on a mailbox.db older than its log (restored from an older backup, or copied file by file
        from a running broker): the packets receipted since would be lost without a word.

        The broker signs a checkpoint only after the mailboxes hold the changes of every entry below it, and a
        crash between its two commits leaves at most the last batch undone, which it never signed, and operator
        commands do not sign over traffic the mailboxes have not taken either (cli/policy.py, _append). So traffic
        records below the saved checkpoint but past the mailboxes' mark mean receipts were given for changes this
        mailbox.db does not have."""
        saved = self.store.load_checkpoint()
        if applied is None or saved is None or saved[0] <= applied or self.settings.rebuild_mailboxes:
            return
        missing = 0
        for start in range(applied, saved[0], 4096):
            missing += sum(records.is_traffic(e) for e in self.store.entries(start, min(saved[0], start + 4096)))
        if missing:
            raise StoreError(
                f"{self.home.mailbox_path} is older than the log: it holds the delivery changes of log entries up to "
                f"{applied}, but the broker signed a checkpoint of {saved[0]} after those of {missing} more traffic "
                "record(s) (packets, acknowledgements, retractions, purges) were made: their deliveries would be lost",
                hint="restore mailbox.db from the same backup as broker.db (stop the broker, or use SQLite's online "
                "backup, to copy both); or move it aside and rebuild it from the log with valise broker serve "
                "--rebuild-mailboxes (small packets not yet delivered are then lost)",
            )

    def _legacy_mark(self) -> int:
        return max(1, self.mail.last_log_index() + 1)

    def _catch_up(self, upto: int, effects_from: int | None = None) -> None:
        """Within a mailbox batch: apply the mailbox changes of log entries [applied_size, upto) and record their
        readers, moving the mark past them. Normally these are only records other writers appended (operator
        commands: no mailbox changes); after a crash, also the last batch's traffic, whose mailbox transaction the
        crash lost (specs/protocol.md, "Store and forward")."""
        start = self.mail.applied_size() or 0
        effects_from = start if effects_from is None else effects_from
        while start < upto:
            entries = self.store.entries(start, min(upto, start + 4096))
            for offset, entry in enumerate(entries):
                if start + offset >= effects_from:
                    self._replay(start + offset, entry)
            self.mail.record_readers(start, [self._readers(e) for e in entries], entries[-1])
            start += len(entries)

    def _replay(self, index: int, entry: bytes) -> None:
        """Redo the mailbox changes of a logged traffic record (each is idempotent)."""
        try:
            kind, m = records.entry_type(entry)
            if kind == "pkt":
                self._replay_packet(index, m)
            elif kind == "ack":
                self.ack_effects(records.Ack.parse(m["notice"])[0], index)
            elif kind == "retract":
                retraction = records.Retraction.parse(m["notice"], logged=True)[0]
                recipients = self._recipients_of(retraction.digest)
                if recipients is not None:
                    self.retract_effects(retraction, recipients, index)
            elif kind == "purge":
                self.purge_effects(m["recipient"], m["digest"])
            else:
                return
        except StoreError:
            raise  # the store failed, not the entry: the batch must not commit, nor its mark move past it
        except (Error, KeyError) as exc:
            log.error("log entry %d: its mailbox changes cannot be redone: %s", index, exc)
            return
        log.warning("redid the mailbox changes of log entry %d (%s) after an interrupted commit", index, kind)

    def _replay_packet(self, index: int, m: dict[str, Any]) -> None:
        header = Header.parse(m["header"])
        digest = hashlib.sha256(header.raw).digest()
        if self.mail.packet(digest) is not None:
            return
        core = header.core
        path = self.spool.path(digest)
        if path.exists():  # a large packet is spooled and fsynced before its entry is appended
            row = PacketRow(digest, core.sender, core.packet_id, index, core.expires, path.stat().st_size, m["at"])
            self.mail.record_packet(row, core.recipients)
            key = (core.sender, core.packet_id)
            self.at_commit(lambda: self.orphans.pop(key, None))  # counted as one while its batch had failed
        else:
            # A small packet's body travels in the mailbox transaction that the crash lost. Its sender got no
            # receipt and will resubmit; that resubmission is queued at this index instead of logged again. Kept
            # in the database: a second crash before the resubmission must not forget it.
            self.mail.add_orphan(core.sender, core.packet_id, index, digest, m["at"])
            self.orphans[(core.sender, core.packet_id)] = (index, digest, m["at"])

    def orphan_row(self, sender: str, packet_id: bytes) -> PacketRow | None:
        """An orphan as the packet row its resubmission will get (expiry and size unknown until then)."""
        orphan = self.orphans.get((sender, packet_id))
        if orphan is None:
            return None
        index, digest, at = orphan
        return PacketRow(digest, sender, packet_id, index, 0, 0, at)

    # --- the mailbox changes of each kind of traffic record (in the batch's transaction, or replayed) -----------

    def ack_effects(self, ack: records.Ack, index: int) -> None:
        """The packet leaves the recipient's mailbox; the acknowledgement enters the sender's."""
        self.mail.remove(ack.recipient, "packet", ack.digest)
        # A notice's mailbox key is the hash of the signed notice: one packet to several recipients brings its
        # sender one acknowledgement from each, not one in all. With the packet id and the recipient beside it:
        # pushing it then needs no second parse of the ack.
        record = {"index": index, "notice": ack.raw, "id": ack.packet_id, "by": ack.recipient}
        self.mail.post(ack.sender, "ack", hashlib.sha256(ack.raw).digest(), encoding.pack(record))
        self.release([ack.digest])
        pending = (ack.recipient, ack.digest)
        self.at_commit(lambda: self.acks_pending.discard(pending))  # one whose batch failed: applied now

    def retract_effects(
        self, retraction: records.Retraction, recipients: Sequence[str], index: int, at: int | None = None
    ) -> None:
        """A copy not yet delivered is withdrawn; every recipient is told (a delivered copy must be discarded).
        `at`: the time the sender's receipt carries (None when redone after a crash: the sender got none)."""
        body = encoding.pack({"index": index, "notice": retraction.raw})
        for r in recipients:
            self.mail.remove(r, "packet", retraction.digest)
            self.mail.post(r, "retract", retraction.digest, body)
        self.mail.record_retraction(retraction.digest, index, at)
        self.release([retraction.digest])
        digest = retraction.digest
        self.at_commit(lambda: self.retracting.pop(digest, None))  # one whose batch failed: applied now

    def purge_effects(self, member: str, digest: bytes) -> None:
        self.mail.remove(member, "packet", digest)
        self.release([digest])
        # An orphan is purged for good by any of its purges (_purge_orphans), redone from the log or not.
        self.mail.remove_orphans_of(digest)
        self.at_commit(lambda: self._purged(member, digest))

    def _purged(self, member: str, digest: bytes) -> None:
        self.purging.discard((member, digest))  # one whose batch failed: applied now
        for key, (_, orphan_digest, _) in list(self.orphans.items()):
            if orphan_digest == digest:
                del self.orphans[key]

    @contextmanager
    def effects(self) -> Iterator[None]:
        """A mailbox batch whose in-memory bookkeeping (`at_commit`) follows it: made if it commits, dropped with
        it if it does not, as the bodies it released are (their files stay)."""
        if self._in_effects:
            raise RuntimeError("effects() does not nest: its changes would be made before the outer batch commits")
        self._in_effects, self._at_commit = True, []
        try:
            with self.mail.batch():
                yield
        except BaseException:
            self._at_commit = []
            self._unlinks.clear()
            raise
        finally:
            self._in_effects = False
        changes, self._at_commit = self._at_commit, []
        for change in changes:
            change()
        self._unlink_released()

    def at_commit(self, change: Callable[[], object]) -> None:
        """Within `effects()`: make `change` to the broker's memory once the batch has committed."""
        self._at_commit.append(change)

    def release(self, digests: Sequence[bytes]) -> None:
        """Within a mailbox batch: drop the bodies nothing refers to any more; their files go after the commit."""
        self._unlinks += self.spool.release(self.mail, digests)

    def _unlink_released(self) -> None:
        unlinks, self._unlinks = self._unlinks, []
        for path in unlinks:
            path.unlink(missing_ok=True)

    @asynccontextmanager
    async def policy_writer(self) -> AsyncIterator[None]:
        """Exclusive right to append a policy record: against our other sessions (a trio lock) and against
        operator commands in other processes (the flock they take too), with the state folded up to the log's
        current end, so that a record checked here is still valid where it lands."""
        async with self._policy_lock:
            # Polled, not a blocking flock in a thread: that could not be cancelled, so an operator command left
            # suspended while holding the lock (Ctrl-Z) held the broker's shutdown for good (a concurrency review).
            while True:
                try:
                    fcntl.flock(self._policy_lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await trio.sleep(POLICY_LOCK_POLL)
            try:
                self._fold(self.store.size())
                yield
            finally:
                fcntl.flock(self._policy_lock_file, fcntl.LOCK_UN)

    def _refresh_tls(self) -> None:
        members = {}
        for m in self.policy.members.values():
            if m.status == ACTIVE:
                try:
                    members[self._bundle(m.bundle).cert_der] = m.id
                except Error:
                    continue  # an unusable bundle cannot log in; the policy fold already reported it
        if members != self._tls_members or self._tls_context is None:
            ident = self.home.identity_dir / self.broker_id
            crt, key = ident.with_suffix(".tls.crt"), ident.with_suffix(".tls.key")
            try:
                self._tls_context = tls.server_context(crt, key, list(members), self._tls_password)
                self._tls_members = members
            except (ssl.SSLError, OSError) as exc:
                # Almost always the key or certificate file; the members' certificates were parsed when their
                # bundles were, but say they are in it too.
                what = (
                    f"cannot make the broker's TLS context from its certificate {crt}, its key {key} and "
                    f"{len(members)} member certificate(s): {exc}"
                )
                if self._tls_context is None:  # at start: stop, naming the files
                    raise KeyFileError(what, hint="restore them from a backup of the broker directory") from None
                # Running: keep serving with the context we have (a member admitted since cannot connect yet;
                # sessions of members no longer active are still closed below); tried again at each policy poll,
                # said once per member list.
                if members != self._tls_failed_for:
                    self._tls_failed_for = members
                    log.error("%s; members admitted since cannot connect until this is fixed", what)
        for session in self.all_sessions():
            current = self.policy.members.get(session.member)
            if current is None or current.status != ACTIVE:
                session.close_soon(codes.SUSPENDED, f"{session.member} is no longer an active member")
            elif self._tls_members.get(session.cert_der) != session.member:
                # Re-keyed (member-rekey): a connection on the old certificate, perhaps a thief's, ends now.
                what = f"{session.member} moved to new keys: this connection's certificate is no longer its own"
                session.close_soon(codes.UNAUTHENTICATED, what)

    def _bundle(self, raw: bytes) -> PublicBundle:
        cached = self._bundles.get(raw)
        if cached is None:
            cached = self._bundles[raw] = PublicBundle.from_bytes(raw)
        return cached

    # --- the committer: group commit ------------------------------------------------------------------------

    def enqueue(
        self,
        entry: bytes,
        on_commit: Callable[[int], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        *,
        traffic: bool = False,
        on_durable: Callable[[int], None] | None = None,
        readers: tuple[str, ...] | None = None,
        recheck: Callable[[], Error | None] | None = None,
    ) -> Waiter:
        """Queue `entry` for the next batch; `on_commit(index)` runs in the batch's mailbox transaction,
        `on_durable(index)` once that has committed too, `on_error(exc)` if the batch fails. `traffic`: a
        packet, acknowledgement, retraction or purge record, which the policy does not fold (so it is not
        parsed again after the commit). `readers`: who may read the entry in full, if the caller knows (else the
        batch parses it). `recheck`: see Waiter; the caller has just decided against the current policy."""
        if len(entry) > MAX_ENTRY_SIZE:
            raise LimitError(f"log entry is {len(entry)} bytes, over the limit of {MAX_ENTRY_SIZE}")
        if len(self._waiters) >= DEFAULT_MAX_PENDING:
            raise LimitError(f"{len(self._waiters)} log entries are waiting for a flush", hint="retry later")
        waiter = Waiter(entry, on_commit, on_error, traffic, on_durable, readers, recheck, self.policy_changes)
        self._waiters.append(waiter)
        self._wake_committer.set()
        return waiter

    async def append(
        self,
        entry: bytes,
        on_commit: Callable[[int], None] | None = None,
        *,
        traffic: bool = False,
        readers: tuple[str, ...] | None = None,
    ) -> int:
        """Append `entry` to the log durably and return its index."""
        return await self.enqueue(entry, on_commit, traffic=traffic, readers=readers).result()

    async def _committer(self) -> None:
        while True:
            await self._wake_committer.wait()
            self._wake_committer = trio.Event()
            await trio.sleep(self.settings.flush_interval)  # gather more entries into this batch
            self._commit_batch()

    def confirm_later(self, member: str, kind: str, digest: bytes) -> None:
        """Take a confirmed notice out of a mailbox in the next batch's transaction, not in one of its own.

        A confirmation lost in a crash only means the notice is pushed once more, which members ignore (they keep
        items by digest), so it need not cost an fsync of its own; batched, thousands cost one."""
        self._confirmations.append((member, kind, digest))
        self._wake_committer.set()

    def _commit_batch(self) -> None:
        waiters, self._waiters = self._waiters, []
        confirmations, self._confirmations = self._confirmations, []
        # A policy record ends a group: the entries after it are decided again with it in force (a member's
        # revoke and a packet it forbids can share a batch), so each group is appended on its own.
        while waiters:
            cut = next((i + 1 for i, w in enumerate(waiters) if not w.traffic), len(waiters))
            group, waiters = waiters[:cut], waiters[cut:]
            if not self._commit_group(group, confirmations):
                self._fail(waiters, StoreError("an earlier part of the batch could not be logged"))
                return
            confirmations = []
        self._confirm(confirmations)

    def _confirm(self, confirmations: list[tuple[str, str, bytes]]) -> None:
        """Take confirmed items out of their mailboxes. If the store cannot (a full disk), they stay: each is
        pushed again on its member's next connection and confirmed again, which changes nothing twice."""
        if not confirmations:
            return
        try:
            with self.mail.batch():
                for member, kind, digest in confirmations:
                    self.mail.remove(member, kind, digest)
        except StoreError as exc:
            log.error("%d confirmation(s) not recorded (pushed again on reconnection): %s", len(confirmations), exc)

    def _admitted(self, group: list[Waiter]) -> list[Waiter]:
        """The entries of `group` that may still be logged where they will land: policy records that other
        writers (operator commands) or earlier groups appended since an entry was decided on are in force."""
        kept = []
        for w in group:
            if w.recheck is not None and w.decided_at != self.policy_changes:
                try:
                    refusal = w.recheck()
                except Exception as exc:  # a bug in a check must not stop the committer: refuse the one entry
                    log.exception("deciding again on a queued log entry")
                    failure = StoreError(f"the broker could not decide on the entry again: {exc}")
                    self._fail([w], failure)  # its on_error answers the member, which the check did not
                    continue
                if refusal is not None:
                    w.error = refusal
                    w.done.set()
                    continue
                w.decided_at = self.policy_changes
            kept.append(w)
        return kept

    def _commit_group(self, group: list[Waiter], confirmations: list[tuple[str, str, bytes]]) -> bool:
        """Append `group` (decided on again where the policy moved) in one transaction, then make its mailbox
        changes; False if the log could not take it (every waiter told)."""
        while True:
            group = self._admitted(group)
            if not group:
                self._confirm(confirmations)
                return True
            now = trio.current_time()
            for w in group:
                self.log.add(w.entry, now)
            try:
                # Lands right after what the policy has folded, or not at all: an operator command that appended
                # meanwhile is folded first, and the group decided on again behind it.
                indexes = self.log.flush(at=self.policy.size)
            except StoreMoved as moved:
                self.log.discard_pending()
                self._fold(moved.size)
                continue
            except Exception as exc:  # a store failure: nothing of the group is in the log (one transaction)
                log.exception("log flush failed")
                self.log.discard_pending()  # every waiter is told, so its entries must not go out with the next
                self._fail(group, exc)
                return False
            break
        self.batches += 1
        self.recorded += 1
        if indexes.start == self.policy.size:
            # The usual case: nobody else appended in between, and the batch's bytes are at hand; reading them
            # back from the store would cost a query per batch on the hot path for nothing.
            for w in group:
                if w.traffic:
                    self.policy.skip_to(self.policy.size + 1)
                else:
                    self._apply([w.entry])
        self._fold(indexes.stop)
        try:
            with self.effects():
                self._catch_up(indexes.start)  # entries other writers appended (or a failed batch) before this one
                self.mail.record_readers(
                    indexes.start,
                    [w.readers if w.readers is not None else self._readers(w.entry) for w in group],
                    group[-1].entry,
                )
                for member, kind, digest in confirmations:
                    self.mail.remove(member, kind, digest)
                for w, index in zip(group, indexes, strict=True):
                    w.index = index
                    if w.on_commit is not None:
                        w.on_commit(index)
        except StoreError as exc:
            self._not_queued(group, indexes, exc)
            return False
        for w in group:
            w.done.set()
            if w.on_durable is not None:
                try:
                    w.on_durable(w.index)
                except Exception:
                    log.exception("handling a durable log entry")
        return True

    def _not_queued(self, group: list[Waiter], indexes: range, exc: StoreError) -> None:
        """The log took `group` and the mailboxes did not (a full disk): the state a crash between the two commits
        leaves, handled as a restart handles it. The next batch or checkpoint redoes the changes from the log
        (_catch_up: until then no checkpoint is signed over them); meanwhile each logged packet counts as an
        orphan, so that its sender's retry is queued at its index instead of logged again, and the callbacks keep
        what they hold for acknowledgements and retractions (NotQueued) so that none is logged twice."""
        log.error("log entries %d..%d are logged, but the mailboxes could not take them: %s", indexes.start,
                  indexes.stop - 1, exc)  # fmt: skip
        self.recorded += 1
        for w, index in zip(group, indexes, strict=True):
            w.index = index
            traffic = w.traffic and records.entry_type(w.entry)
            if traffic and traffic[0] == "pkt":
                core = Header.parse(traffic[1]["header"]).core
                digest = hashlib.sha256(traffic[1]["header"]).digest()
                self.orphans.setdefault((core.sender, core.packet_id), (index, digest, traffic[1]["at"]))
            self._fail([w], NotQueued(f"logged, but not queued: {exc.what}", index, hint=exc.hint, cause=exc.cause))

    @staticmethod
    def _fail(waiters: list[Waiter], exc: BaseException) -> None:
        for w in waiters:
            w.error = exc
            w.done.set()
        for w in waiters:
            if w.on_error is not None:
                try:
                    w.on_error(exc)
                except Exception:
                    log.exception("handling a failed log entry")

    # --- who may read which entry (readers.py) -------------------------------------------------------------

    def _readers(self, entry: bytes) -> tuple[str, ...]:
        return readers_of(entry, self._recipients_of)

    def _recipients_of(self, digest: bytes) -> Sequence[str] | None:
        row = self.mail.packet(digest)
        return None if row is None else self.logged_header(row.log_index).core.recipients

    def logged_header(self, index: int) -> Header:
        """The header of the packet logged at `index` (the broker's own entry: it parses, or the log is damaged)."""
        kind, m = records.entry_type(self.store.entries(index, index + 1)[0])
        if kind != "pkt":
            raise Error(f"log entry {index} is a {kind!r} record, not a packet")
        return Header.parse(m["header"])

    # --- checkpoints and witnesses --------------------------------------------------------------------------

    async def _checkpointer(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(self.settings.checkpoint_interval)
                # Each round runs on its own, so waiting for cosignatures never holds up the next checkpoint.
                nursery.start_soon(self.publish_checkpoint)

    async def publish_checkpoint(self) -> None:
        """Sign a checkpoint of the durable tree, publish it at once, then again with the witnesses' cosignatures.

        Publishing first keeps a slow or absent witness from delaying proofs for everyone; the cosigned note
        replaces it as soon as the witnesses have answered (or the cosigning deadline has passed).
        """
        latest = self.log.latest
        if latest is not None and self.store.size() == latest.size:
            return
        previous = latest.size if latest else 0
        try:
            with self.effects():  # what operator commands appended since the last batch, before anyone reads it
                self._catch_up(self.store.size())
            signed = self.log.sign()
        except Error as exc:
            if isinstance(exc, StoreError) and exc.cause is not None:
                # The mailboxes cannot take the log's last entries (a full disk): nothing is signed over them.
                log.error("no checkpoint signed, as the broker's storage failed: %s", exc)
                return
            # The store no longer matches what was signed (altered, or restored from an old backup): refuse to
            # sign, keep serving the last checkpoint, and say so loudly. Never crash the daemon over it.
            log.exception("refusing to sign a checkpoint")
            return
        self.published = signed.note
        cosigs = await self._gather_cosignatures(signed.note, previous)
        if cosigs and self.log.latest is not None and self.log.latest.size == signed.size:
            self.publish(self._with_cosignatures(signed.note, cosigs))

    def publish(self, cosigned: bytes) -> None:
        """Serve `cosigned` as the checkpoint, and keep it for `valise log export` (an auditor's offline copy
        must carry the cosignatures its witness quorum checks). Not fsynced: it is redone at each checkpoint."""
        self.published = cosigned
        try:
            keyfiles.write_public(self.home.cosigned_path, cosigned)
        except OSError as exc:
            log.warning("cannot keep the cosigned checkpoint for exports: %s", exc)

    @staticmethod
    def _with_cosignatures(signed_note: bytes, cosigs: list[note.Signature]) -> bytes:
        """The note with as many cosignatures as a note may carry: the log's line plus at most
        MAX_SIGNATURES - 1 (Go's sumdb/note limit, which tlog clients everywhere enforce), in member-id order."""
        room = note.MAX_SIGNATURES - len(note.parse_note(signed_note).signatures)
        chosen = sorted(cosigs, key=lambda s: s.name)[: max(room, 0)]
        return cosignature.add_cosignatures(signed_note, chosen)

    async def _gather_cosignatures(self, signed_note: bytes, old: int) -> list[note.Signature]:
        ready = {s.member: s for s in self.sessions.values() if s.ready}
        room = note.MAX_SIGNATURES - len(note.parse_note(signed_note).signatures)
        # A note carries at most `room` cosignatures: asking more witnesses than that would cost them and us a
        # signature, a proof and a verification each for nothing. They take turns instead.
        witnesses = [ready[m] for m in pick_witnesses(list(ready), self._cosign_turn, room)]
        self._cosign_turn += 1
        if not witnesses:
            return []
        try:
            round_ = CosignRound.make(self.log, signed_note, old)
        except Error as exc:
            log.warning("no cosigning round for checkpoint: %s", exc)
            return []
        got: list[note.Signature] = []
        pace = cosign.wave_pace(len(witnesses), self.settings.checkpoint_interval)
        with trio.move_on_after(COSIGN_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i, s in enumerate(witnesses):
                    if i and i % cosign.COSIGN_WAVE == 0:
                        await trio.sleep(pace)
                    nursery.start_soon(s.request_cosignature, round_, got)
        return got

    # --- the daemon -------------------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = self.settings.listen
        # Below the descriptor limit, or eviction never starts: the process runs out first (see fds.py).
        self._max_unauthenticated = fds.unauthenticated_share(fds.soft_limit(), MAX_UNAUTHENTICATED)
        try:
            listeners = await listen_tcp(host, port, "--listen")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._committer)
                nursery.start_soon(self._checkpointer)
                nursery.start_soon(self._purger)
                nursery.start_soon(self._policy_watcher)
                nursery.start_soon(self._load_meter)
                if self.settings.http is not None:
                    h, p = self.settings.http
                    cap = fds.unauthenticated_share(fds.soft_limit(), http.MAX_CONNECTIONS)
                    serve_http = functools.partial(http.serve, self._resolve, h, p, max_connections=cap)
                    self.http_port = await nursery.start(serve_http)
                nursery.start_soon(trio.serve_listeners, self._handle, listeners)
                log.info("broker %s serving on %s:%d", self.broker_id, host, self.port)
                task_status.started()
        finally:
            # Plain calls, no awaits: this runs to the end even when we are being cancelled.
            self._commit_batch()  # entries already queued are made durable before we stop
            for w in self._waiters:
                w.error = Error("the broker is shutting down")
                w.done.set()
            self.mail.close()
            self.store.close()
            self._policy_lock_file.close()

    async def _load_meter(self) -> None:
        """How busy the broker's thread is (its process's CPU time over wall time, smoothed): members are held to
        their share of it only when it is busy (fairshare.py)."""
        cpu, wall = time.process_time(), time.perf_counter()
        while True:
            await trio.sleep(fairshare.METER_INTERVAL)
            now_cpu, now_wall = time.process_time(), time.perf_counter()
            busy = (now_cpu - cpu) / max(now_wall - wall, 1e-6)
            self.thread_busy = fairshare.smoothed(self.thread_busy, busy)
            self.shares.forget(trio.current_time())
            cpu, wall = now_cpu, now_wall

    async def shutdown(self, nursery: trio.Nursery) -> None:
        """Graceful stop: say goodbye to every session, give them a grace period, then cancel."""
        log.info("stopping: closing %d session(s), %g s at most", len(self.all_sessions()), SHUTDOWN_GRACE)
        for s in self.all_sessions():
            s.close_soon(codes.SHUTTING_DOWN, "the broker is stopping")
        try:
            with trio.move_on_after(SHUTDOWN_GRACE):
                while self.sessions or self.auditors:
                    self._sessions_changed = trio.Event()
                    await self._sessions_changed.wait()
        finally:  # the grace is over, or a second signal cut it short
            for s in self.all_sessions():
                s.abandon_write()
            nursery.cancel_scope.cancel()

    async def _policy_watcher(self) -> None:
        """Pick up records that operator commands append directly to the store while we run."""
        while True:
            await trio.sleep(self.settings.policy_poll)
            try:
                size = self.store.size()
            except Error:
                log.exception("reading the log size failed")
                continue
            if size > self.policy.size and not self._waiters:
                self._fold(size)
                self._refresh_tls()
            elif size == self.policy.size:
                self._refresh_tls()

    async def _purger(self) -> None:
        while True:
            await trio.sleep(self.settings.purge_interval)
            try:
                await self.purge_expired()
            except Error:  # e.g. the store is busy or full: try again next round, keep serving meanwhile
                log.exception("purging expired packets failed")

    async def purge_expired(self) -> None:
        for member, row in self.mail.expired_packets(self.now()):
            copy = (member, row.digest)
            if copy in self.purging or copy in self.acks_pending or row.digest in self.retracting:
                # Logged already (a purge), or an acknowledgement or a retraction of the copy is (NotQueued): its
                # mailbox change waits for the store, and a purge now would say it was dropped undelivered.
                continue

            def done(_index: int, member: str = member, digest: bytes = row.digest) -> None:
                self.withdrawals += 1
                self.purge_effects(member, digest)

            # Dated when it is appended, not when the sweep began: a long sweep (after downtime) runs alongside
            # packets logged with the current time, and the log's times must not go back (audit.md, log-time).
            # Never before its expiry, though: the clock may have stepped back since the packet was picked.
            entry = records.purge_entry(row.digest, member, max(self.now(), row.expires), _purge_nonce())
            try:
                await self.append(entry, done, traffic=True, readers=(member,))
            except NotQueued:
                self.purging.add((member, row.digest))
                raise
        await self._purge_orphans()

    async def _purge_orphans(self) -> None:
        """An orphan whose sender never sent it again (a node wiped after a crash) expires like any packet: each
        recipient's copy is purged in the log, so the log does not show it relayed and never settled. The purges
        of one orphan go in one batch, whose mailbox transaction also forgets the orphan."""
        for (sender, packet_id), (index, digest, _) in list(self.orphans.items()):
            core = self.logged_header(index).core
            now = self.now()  # per orphan, for the reason purge_expired gives
            if core.expires > now or any((r, digest) in self.purging for r in core.recipients):
                continue  # not expired, or its purges are logged and wait for the store (NotQueued)

            def done(_index: int, sender: str = sender, packet_id: bytes = packet_id) -> None:
                self.withdrawals += 1
                self.mail.remove_orphan(sender, packet_id)

            # Out of the orphans at once: a retry racing the purge is then decided as new, and refused as expired.
            del self.orphans[(sender, packet_id)]
            waiters = [
                self.enqueue(records.purge_entry(digest, r, now, _purge_nonce()), done, traffic=True, readers=(r,))
                for r in core.recipients
            ]
            try:
                for w in waiters:
                    await w.result()
            except NotQueued:
                self.purging.update((r, digest) for r in core.recipients)
                raise

    async def _resolve(self, path: str) -> http.Response:
        if path == "/checkpoint":
            return http.Response(200, self.published, "text/plain; charset=utf-8")
        # Exactly one leading slash: "//tile/..." names no file of the layout (and once got round the gate below).
        if not path.startswith("/") or path.startswith("//"):
            return http.Response(404, b"not found\n", "text/plain; charset=utf-8")
        try:
            # Entry bundles hold every traffic record (who sent what to whom): for auditors, not for the public
            # (specs/protocol.md, "Reading the log"). Hash tiles and checkpoints stay public.
            resource = self.log.read(path[1:], entry_bundles=self.settings.serve_entries)
        except AccessError:
            return http.Response(403, b"entry bundles are not public on this broker\n", "text/plain; charset=utf-8")
        if resource is None:
            why = self.log.missing_reason(path[1:])
            return http.Response(404, f"not found: {why}\n".encode(), "text/plain; charset=utf-8")
        return http.Response(200, resource.body, resource.content_type, immutable=resource.immutable)

    # --- connections ----------------------------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection: TLS and hello within HANDSHAKE_TIMEOUT of connecting, then the member's session.

        Connections still handshaking are capped (MAX_UNAUTHENTICATED, or less: fds.py); past the cap the oldest is
        dropped, not the newcomer, so a flood of idle connections delays members by at most one round of
        eviction instead of locking them out until the idle ones time out."""
        self.connections += 1
        deadline = trio.current_time() + HANDSHAKE_TIMEOUT
        handshaking = trio.CancelScope()
        self._unauthenticated[handshaking] = None
        if len(self._unauthenticated) > self._max_unauthenticated:
            oldest = next(iter(self._unauthenticated))
            del self._unauthenticated[oldest]
            oldest.cancel()
        assert self._tls_context is not None
        ssl_stream: TLSSocketStream | None = None
        try:
            # Inside the try: a peer that resets before TLS makes wrapping fail, and that must end this
            # connection only (uncaught, it would reach the listener and stop the broker).
            ssl_stream = TLSSocketStream.wrap(stream, self._tls_context, server_side=True)
            with handshaking:
                with trio.move_on_at(deadline) as tls_scope:
                    try:
                        await ssl_stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        log.info("TLS handshake refused: %s", exc.__cause__ or exc)
                        await ssl_stream.close_after_refusal(REFUSAL_LINGER)
                        return
                if tls_scope.cancelled_caught:
                    log.info("TLS handshake timed out")
                    return
                if ssl_stream.selected_alpn_protocol() != tls.ALPN:
                    log.info("TLS client did not negotiate %s", tls.ALPN)
                    return
                cert = tls.peer_certificate(ssl_stream)
                member = self._tls_members.get(cert)
                if member is None:  # a certificate removed from the directory since the context was built
                    return
                session = Session(self, ssl_stream, member, cert)
                await session.run(deadline, HANDSHAKE_TIMEOUT, lambda: self._unauthenticated.pop(handshaking, None))
        # A session's nursery wraps what its tasks raise in exception groups. Whatever one connection raises ends
        # that connection only: the daemon keeps serving everyone else. Cancellation is not caught here.
        except* DISCONNECTS as group:
            log.info("connection closed: %s", _first(group))
        except* Exception as group:
            log.error("connection handler failed; closing that connection", exc_info=group)
        finally:
            self._unauthenticated.pop(handshaking, None)
            self.connections -= 1
            await trio.aclose_forcefully(ssl_stream if ssl_stream is not None else stream)

    def session_ended(self) -> None:
        self._sessions_changed.set()

    def member_is_ahead(self, member: str, seen: int, signed: int) -> None:
        """A member says it verified a bigger tree than this broker has signed. Either it lies (it gains nothing:
        it is refused nothing) or this broker directory was restored from a backup older than what members have
        verified, and the log it now extends is a fork of the one they hold. It cannot be proven here, so it is
        said loudly, once per member, where the operator looks (the members' nodes raise a fork alarm)."""
        if member in self.ahead:
            return
        self.ahead.add(member)
        # One member's word, which costs it nothing to give (a hostile-member review made the broker say this at
        # will): the text says what would confirm it before it says what to do.
        log.error(
            "%s says it has verified a log of %d entries, but this broker has signed only %d. One member's word "
            "proves nothing; if others say the same, or this directory was restored from a backup, the log has "
            "forked from what members verified: then stop the broker and restore the newest copy of its directory "
            "(members' nodes alarm until then)",
            member, seen, signed,
        )  # fmt: skip

    def all_sessions(self) -> list[Session]:
        return [*self.sessions.values(), *(s for group in self.auditors.values() for s in group)]

    def register(self, session: Session) -> None:
        """Make an authenticated connection the member's node session, or one of its auditor sessions."""
        member = session.member
        if session.auditor:
            group = self.auditors.setdefault(member, [])
            if len(group) >= AUDITORS_PER_MEMBER:
                group.pop(0).close_soon(
                    codes.REPLACED, f"{member} opened more than {AUDITORS_PER_MEMBER} auditor connections"
                )
            group.append(session)
            return
        old = self.sessions.get(member)
        if old is not None:
            # Routine after a node's network blip; over and over, two nodes are running with one identity and
            # take turns, each getting part of the member's deliveries. Said where an operator looks.
            log.warning("%s connected again: its previous connection is closed (replaced)", member)
            old.close_soon(codes.REPLACED, f"replaced by a newer connection of {member}")
        self.sessions[member] = session

    def members_connected(self) -> int:
        """How many members have a connection open (node or auditor): fairshare's split."""
        return len(self.sessions.keys() | self.auditors.keys())

    def unregister(self, session: Session) -> None:
        member = session.member
        if self.sessions.get(member) is session:
            del self.sessions[member]
        group = self.auditors.get(member)
        if group is not None and session in group:
            group.remove(session)
            if not group:
                del self.auditors[member]
        self.session_ended()

    def wake(self, member: str) -> None:
        session = self.sessions.get(member)
        if session is not None:
            session.wake()

    def _offer(self, items: list[MailItem]) -> None:
        """Hand committed mailbox items to their members' sessions (Mailboxes.on_posted)."""
        sessions = self.sessions
        for item in items:
            session = sessions.get(item.member)
            if session is not None:
                session.offer(item)


def serve_forever(home: BrokerHome, settings: Settings, passphrase: bytes | None = None) -> None:
    """Run the daemon until SIGINT/SIGTERM; then stop gracefully within a deadline. One per directory."""
    fds.raise_soft_limit()
    with DaemonLock(home.serve_lock_path, "broker"):
        trio.run(_serve, home, settings, passphrase)


async def _serve(home: BrokerHome, settings: Settings, passphrase: bytes | None) -> None:
    import signal

    daemon = BrokerDaemon(home, settings, passphrase)
    # The receiver is open until the daemon has stopped and closed its stores (stopsignals.py).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            stop = functools.partial(daemon.shutdown, nursery)
            nursery.start_soon(stopsignals.stop_when_signalled, signals, stop, nursery.cancel_scope, "broker")
            await nursery.start(daemon.serve)
            gctune.settle_for_serving()
            print(
                f"broker {daemon.broker_id} listening on {settings.listen[0]}:{daemon.port}"
                + (f", tiles on http://{settings.http[0]}:{daemon.http_port}/" if settings.http else ""),
                flush=True,
            )
        await stopsignals.drop_pending(signals, "broker")
