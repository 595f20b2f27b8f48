"""The broker daemon: mutual-TLS listener, per-member sessions, group commit, checkpoints, tiles over HTTP.

Structure (trio): one nursery for the daemon's own tasks (committer, checkpointer, purger, policy watcher, the
TLS and HTTP listeners), and one nursery per connection (its reader, its pusher). All state lives in this
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
import io
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import trio

from valise import encoding, gctune, keyfiles, records, tls
from valise.broker import fds, http, policyfold, relay
from valise.broker.fds import listen_tcp
from valise.broker.home import BrokerConfig, BrokerHome
from valise.broker.mailbox import Mailboxes, MailItem, PacketRow
from valise.broker.readers import readers_of
from valise.broker.spool import InlineUpload, Spool, Upload
from valise.crypto import sign
from valise.daemonlock import DaemonLock
from valise.errors import (
    AccessError,
    Error,
    KeyFileError,
    LimitError,
    PolicyError,
    ProtocolError,
    StatementError,
    StatementSignatureError,
    StoreError,
    StoreMoved,
)
from valise.genesis import Genesis
from valise.identity import PublicBundle
from valise.logservice import DEFAULT_MAX_PENDING, LogService
from valise.packet import Head
from valise.packet.format import PREFIX_SIZE, SIGNATURE_SIZE, Header, parse_prefix
from valise.policy import records as policy_records
from valise.policy.state import ACTIVE, PolicyState
from valise.store import sqlfile
from valise.store.base import MAX_ENTRY_SIZE
from valise.store.sqlite import SqliteLog
from valise.tlog import cosignature, merkle, note
from valise.tlsstream import TLSSocketStream
from valise.wire import codes, liveness
from valise.wire import events as ev
from valise.wire.connection import NEED_DATA, READ_SIZE, Connection, Signal
from valise.wire.limits import MAX_ENTRIES, MIN_FRAME, SUPPORTED_VERSIONS, choose_version
from valise.wire.state import Role

log = logging.getLogger("valise.broker")

HANDSHAKE_TIMEOUT = 10.0
COSIGN_TIMEOUT = 3.0
# Witnesses are asked in waves, not all at once: a round asks up to 99, and each costs the broker ~0.25 ms (a
# request, an answer, a signature to verify). All at once, they held up every packet in flight for ~15 ms once a
# second, which set the broker's p99 latency; 10 every 10 ms still made a backlog that a broker near its core's
# capacity took a few hundred ms to drain. 10 every 40 ms spreads a full round over ~0.4 s (at most half the
# checkpoint interval, so a round's cosigned note is out before the next checkpoint replaces it).
COSIGN_WAVE = 10
COSIGN_PACE = 0.04
SHUTDOWN_GRACE = 5.0
FLUSH_AT = 256 * 1024  # write queued frames once this many bytes wait (a few TLS records' worth)
# Items a session keeps in memory for its pusher (Session.offer); a member that lets more than this wait unconfirmed
# is served from the mailbox store again, so an idle member's session holds no more than this.
FRESH_MAX = 1024
# After a refused handshake, how long the peer may take to read the TLS alert that says why before the close.
REFUSAL_LINGER = 1.0
WRITE_TIMEOUT = 10.0  # a member that accepts no bytes for this long is disconnected (it reconnects and resumes)
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
    serve_entries: bool = False  # entry bundles over HTTP (every record in full): for an auditors-only address
    rebuild_mailboxes: bool = False  # start with a missing mailbox.db although the log holds traffic (see below)
    clock: Callable[[], float] = time.time


@dataclass(frozen=True, slots=True)
class CosignRound:
    """One request to witnesses: the same note and consistency proof for each of them, made once per round (a
    proof reads the tree from the store; a round asks up to 99 witnesses)."""

    signed_note: bytes
    text: bytes  # the note's text, which each cosignature signs
    old: int
    proof: tuple[bytes, ...]

    @classmethod
    def make(cls, log: LogService, signed_note: bytes, old: int) -> CosignRound:
        text = note.parse_note(signed_note).text.encode()
        return cls(signed_note, text, old, tuple(log.consistency_proof(old)))


@dataclass(slots=True)
class _Waiter:
    entry: bytes
    on_commit: Callable[[int], None] | None
    on_error: Callable[[BaseException], None] | None = None
    traffic: bool = False
    on_durable: Callable[[int], None] | None = None  # after the batch's mailbox transaction has committed too
    readers: tuple[str, ...] | None = None  # who may read the entry in full (readers.py); None: parsed at commit
    # Decides again whether the entry may be logged, against the policy as it stands where the entry will land;
    # an Error refuses it (the callback has answered the member). Asked only if the policy changed since
    # `decided_at` (the broker's count of applied policy records when the entry was first decided on).
    recheck: Callable[[], Error | None] | None = None
    decided_at: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    index: int = -1
    error: BaseException | None = None

    async def result(self) -> int:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.index


class Refused(Error):
    """A queued entry that was decided on again before its commit (the policy had changed) and refused."""

    def __init__(self, what: str, answer: Callable[[int], ev.Message]) -> None:
        super().__init__(what)
        self.answer = answer  # the frame that says so, for a request id

    @classmethod
    def of(cls, outcome: relay.Reject | relay.Denied, packet_id: bytes) -> Refused:
        if isinstance(outcome, relay.Reject):
            return cls(outcome.message, lambda rid: ev.ErrorMessage(rid, outcome.code, outcome.message))
        reasons = tuple(ev.DenyReason(to, r) for to, r in outcome.reasons)
        return cls(f"packet {packet_id.hex()} denied", lambda rid: ev.Deny(rid, packet_id, reasons))


# What a peer can cause by going away or by speaking broken TLS: routine, logged at info level.
DISCONNECTS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, tls.TLSPeerError)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc.__cause__ or exc


def wave_pace(witnesses: int, checkpoint_interval: float) -> float:
    """The pause between two waves of a cosigning round: COSIGN_PACE, or less if the round's waves would not
    all be asked within half the checkpoint interval (whose next checkpoint would replace the note first)."""
    waves = -(-witnesses // COSIGN_WAVE)
    if waves <= 1:
        return 0.0
    return min(COSIGN_PACE, checkpoint_interval / 2 / (waves - 1))


def _is_packet(entry: bytes) -> bool:
    try:
        return records.entry_type(entry)[0] == "pkt"
    except Error:
        return False


def pick_witnesses(names: list[str], turn: int, limit: int) -> list[str]:
    """The witnesses to ask on cosigning `turn`: all of `names` if they fit in `limit`, else a window of `limit`
    names (in sorted order, wrapping) that moves on by `limit` each turn, so every witness cosigns in turn."""
    ordered = sorted(names)
    if len(ordered) <= limit:
        return ordered
    start = (turn * limit) % len(ordered)
    return [ordered[(start + i) % len(ordered)] for i in range(max(limit, 0))]


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
        self.spool = Spool(home.root / "spool")
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
        # (sender, packet id) → (index, digest, at) of packets logged whose body a crash lost (see _replay_packet).
        self.orphans: dict[tuple[str, bytes], tuple[int, bytes, int]] = {}
        # A crash between the log's commit and the mailboxes' leaves the last batch's mailbox changes undone: they
        # are redone from the log, from the mark the mailboxes keep (`applied_size`), before anyone connects.
        applied = self.mail.applied_size()
        with self.mail.batch():
            # A mailbox database from before the mark: only packets after the newest it knows can be missing.
            self._catch_up(self.store.size(), effects_from=applied if applied is not None else self._legacy_mark())
        self._unlink_released()
        if swept := self.spool.sweep(self.mail):
            log.warning("removed %d spool file(s) that no mailbox item refers to", swept)
        self.orphans.update(self.mail.orphans())  # and those of earlier crashes
        self.sessions: dict[str, Session] = {}  # each member's node connection (role "node"): at most one
        # Connections with role "auditor" (wire.md): a member's monitoring script reading the log beside its node.
        # Pushed nothing and replacing no node; at most AUDITORS_PER_MEMBER per member (the oldest goes).
        self.auditors: dict[str, list[Session]] = {}
        self.mail.on_posted = self._offer  # from here on, committed items go to their members' sessions too
        self._waiters: list[_Waiter] = []
        self._confirmations: list[tuple[str, str, bytes]] = []
        self.batches = 0  # commit batches so far (a log entry's group commit shares one with the others queued)
        self.recorded = 0  # bumped whenever packets may have been recorded in the mailboxes since
        self._cosign_turn = 0  # checkpoints sent out for cosigning (see pick_witnesses)
        self.acks_pending: set[tuple[str, bytes]] = set()  # (recipient, digest): acknowledgements being logged
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
                retraction = records.Retraction.parse(m["notice"])[0]
                recipients = self._recipients_of(retraction.digest)
                if recipients is not None:
                    self.retract_effects(retraction, recipients, index)
            elif kind == "purge":
                self.purge_effects(m["recipient"], m["digest"])
            else:
                return
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

    def purge_effects(self, member: str, digest: bytes) -> None:
        self.mail.remove(member, "packet", digest)
        self.release([digest])

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
            await trio.to_thread.run_sync(fcntl.flock, self._policy_lock_file, fcntl.LOCK_EX)
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
    ) -> _Waiter:
        """Queue `entry` for the next batch; `on_commit(index)` runs in the batch's mailbox transaction,
        `on_durable(index)` once that has committed too, `on_error(exc)` if the batch fails. `traffic`: a
        packet, acknowledgement, retraction or purge record, which the policy does not fold (so it is not
        parsed again after the commit). `readers`: who may read the entry in full, if the caller knows (else the
        batch parses it). `recheck`: see _Waiter; the caller has just decided against the current policy."""
        if len(entry) > MAX_ENTRY_SIZE:
            raise LimitError(f"log entry is {len(entry)} bytes, over the limit of {MAX_ENTRY_SIZE}")
        if len(self._waiters) >= DEFAULT_MAX_PENDING:
            raise LimitError(f"{len(self._waiters)} log entries are waiting for a flush", hint="retry later")
        waiter = _Waiter(entry, on_commit, on_error, traffic, on_durable, readers, recheck, self.policy_changes)
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
        if confirmations:
            with self.mail.batch():
                for member, kind, digest in confirmations:
                    self.mail.remove(member, kind, digest)

    def _admitted(self, group: list[_Waiter]) -> list[_Waiter]:
        """The entries of `group` that may still be logged where they will land: policy records that other
        writers (operator commands) or earlier groups appended since an entry was decided on are in force."""
        kept = []
        for w in group:
            if w.recheck is not None and w.decided_at != self.policy_changes:
                try:
                    refusal = w.recheck()
                except Exception as exc:  # a bug in a check must not stop the committer: refuse the one entry
                    log.exception("deciding again on a queued log entry")
                    refusal = StoreError(f"the broker could not decide on the entry again: {exc}")
                if refusal is not None:
                    w.error = refusal
                    w.done.set()
                    continue
                w.decided_at = self.policy_changes
            kept.append(w)
        return kept

    def _commit_group(self, group: list[_Waiter], confirmations: list[tuple[str, str, bytes]]) -> bool:
        """Append `group` (decided on again where the policy moved) in one transaction, then make its mailbox
        changes; False if the log could not take it (every waiter told)."""
        while True:
            group = self._admitted(group)
            if not group:
                if confirmations:
                    with self.mail.batch():
                        for member, kind, digest in confirmations:
                            self.mail.remove(member, kind, digest)
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
        with self.mail.batch():
            self._catch_up(indexes.start)  # entries other writers appended before this batch
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
        self._unlink_released()
        for w in group:
            w.done.set()
            if w.on_durable is not None:
                try:
                    w.on_durable(w.index)
                except Exception:
                    log.exception("handling a durable log entry")
        return True

    @staticmethod
    def _fail(waiters: list[_Waiter], exc: BaseException) -> None:
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
            with self.mail.batch():  # what operator commands appended since the last batch, before anyone reads it
                self._catch_up(self.store.size())
            signed = self.log.sign()
        except Error:
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
        pace = wave_pace(len(witnesses), self.settings.checkpoint_interval)
        with trio.move_on_after(COSIGN_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i, s in enumerate(witnesses):
                    if i and i % COSIGN_WAVE == 0:
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

    async def shutdown(self, nursery: trio.Nursery) -> None:
        """Graceful stop: say goodbye to every session, give them a grace period, then cancel."""
        for s in self.all_sessions():
            s.close_soon(codes.SHUTTING_DOWN, "the broker is stopping")
        with trio.move_on_after(SHUTDOWN_GRACE):
            while self.sessions or self.auditors:
                self._sessions_changed = trio.Event()
                await self._sessions_changed.wait()
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

            def done(_index: int, member: str = member, digest: bytes = row.digest) -> None:
                self.withdrawals += 1
                self.purge_effects(member, digest)

            # Dated when it is appended, not when the sweep began: a long sweep (after downtime) runs alongside
            # packets logged with the current time, and the log's times must not go back (audit.md, log-time).
            # Never before its expiry, though: the clock may have stepped back since the packet was picked.
            entry = records.purge_entry(row.digest, member, max(self.now(), row.expires))
            await self.append(entry, done, traffic=True, readers=(member,))
        await self._purge_orphans()

    async def _purge_orphans(self) -> None:
        """An orphan whose sender never sent it again (a node wiped after a crash) expires like any packet: each
        recipient's copy is purged in the log, so the log does not show it relayed and never settled. The purges
        of one orphan go in one batch, whose mailbox transaction also forgets the orphan."""
        for (sender, packet_id), (index, digest, _) in list(self.orphans.items()):
            core = self.logged_header(index).core
            now = self.now()  # per orphan, for the reason purge_expired gives
            if core.expires > now:
                continue

            def done(_index: int, sender: str = sender, packet_id: bytes = packet_id) -> None:
                self.withdrawals += 1
                self.mail.remove_orphan(sender, packet_id)

            # Out of the orphans at once: a retry racing the purge is then decided as new, and refused as expired.
            del self.orphans[(sender, packet_id)]
            waiters = [
                self.enqueue(records.purge_entry(digest, r, now), done, traffic=True, readers=(r,))
                for r in core.recipients
            ]
            for w in waiters:
                await w.result()

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
                member = self._tls_members.get(tls.peer_certificate(ssl_stream))
                if member is None:  # a certificate removed from the directory since the context was built
                    return
                session = Session(self, ssl_stream, member)
                await session.run(deadline, lambda: self._unauthenticated.pop(handshaking, None))
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


class Session:
    """One authenticated member connection: a reader task and a pusher task in one nursery."""

    def __init__(self, daemon: BrokerDaemon, stream: TLSSocketStream, member: str) -> None:
        self.d = daemon
        self.stream = stream
        self.member = member
        self.conn = Connection(Role.SERVER)
        self.ready = False
        self.auditor = False  # the hello's role was "auditor"
        self._send_lock = trio.Lock()
        self._out: list[bytes] = []  # encoded frames not yet written
        self._out_bytes = 0
        self._queued = 0  # frames queued since the connection began (tickets)
        self._written = 0  # frames written to the stream
        self._write_failed: BaseException | None = None
        self._wake = trio.Event()
        self._room_full = False  # the pusher waits for the member to confirm items (then confirmations wake it)
        self._credit = trio.Event()
        self._flush_wanted = trio.Event()  # frames were queued outside any task (a batch's callbacks)
        # rid → the upload being received (None: refused, its chunks are discarded)
        self._uploads: dict[int, Upload | InlineUpload | None] = {}
        self._unknown_at: dict[int, int] = {}  # rid → `recorded` when submit-begin found its packet id unused
        self._pushed: dict[int, MailItem] = {}  # seq → item pushed and awaiting confirmation
        # Items committed to this member's mailbox since the pusher last found it had read everything there, each
        # with the broker's withdrawal count when it was committed; None while the pusher must query the store.
        self._fresh: deque[tuple[MailItem, int]] | None = None
        self._inflight: dict[tuple[str, bytes], tuple[bytes, _Waiter, int]] = {}  # (sender, id) → (digest, waiter, at)
        self._last_seq = 0
        self._cosigns: dict[int, tuple[CosignRound, list[note.Signature], trio.Event]] = {}
        self._nursery: trio.Nursery | None = None
        self._said_last_word = False
        self._liveness = liveness.Liveness.starting(trio.current_time())
        self._pings = 0
        self._upload_moved: dict[int, float] = {}  # rid → when an accepted upload last got data (or began)

    # --- plumbing -------------------------------------------------------------------------------------------

    def queue(self, msg: ev.Message) -> int:
        """Encode `msg` into the output buffer and return its ticket; it goes out with the next `flush`.

        Frames are written in batches: each write is a TLS record and a system call, which cost more than most
        frames' own handling, so the frames that tasks queue while a write is under way go out together."""
        if self._said_last_word:
            return self._queued  # goodbye or a fatal error went out: the other tasks' frames are moot now
        data = self.conn.send(msg)
        if isinstance(msg, ev.Goodbye) or (isinstance(msg, ev.ErrorMessage) and msg.rid is None):
            self._said_last_word = True
        self._out.append(data)
        self._out_bytes += len(data)
        self._queued += 1
        return self._queued

    async def flush(self, ticket: int | None = None) -> None:
        """Return once every frame queued up to `ticket` (default: all) is written to the stream."""
        ticket = self._queued if ticket is None else ticket
        # (`async with` passes through the scheduler even when the lock is free; taking it without that made the
        # writes smaller, as the frames other tasks queue meanwhile no longer joined them: more CPU, not less.)
        async with self._send_lock:
            if self._written >= ticket:
                return  # the write of another task carried it
            if self._write_failed is not None:
                raise trio.BrokenResourceError(f"an earlier write failed: {self._write_failed}")
            data = b"".join(self._out)
            self._out.clear()
            self._out_bytes = 0
            upto = self._queued
            try:
                # The writer may be carrying other tasks' frames: its own deadline (a cosigning round's, say) must
                # not cut the write short, which would break the stream for everyone. A peer that does not read
                # for WRITE_TIMEOUT ends its session instead.
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + WRITE_TIMEOUT
                    await self.stream.send_all(data)
                if scope.cancelled_caught:
                    raise trio.BrokenResourceError(f"the member read nothing for {WRITE_TIMEOUT:g} s")
            except BaseException as exc:
                self._write_failed = exc  # the frames in `data` are lost; so is the stream, for everyone
                self._end()
                raise
            self._written = upto

    async def send(self, msg: ev.Message) -> None:
        await self.flush(self.queue(msg))

    def send_soon(self, msg: ev.Message) -> None:
        """Queue `msg` from synchronous code (a commit callback); the session's flusher writes it. Nothing to do
        once the session has ended (its answers are moot: the member reconnects and asks again)."""
        if self._nursery is None:
            return
        try:
            self.queue(msg)
        except Error as exc:  # our side broke the protocol: that ends this connection, as it would in a task
            log.error("%s: cannot send %s: %s", self.member, msg.TYPE, exc)
            self._end()
            return
        self._flush_wanted.set()

    async def _flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            await self.flush()

    def wake(self) -> None:
        self._wake.set()

    def close_soon(self, code: str, message: str) -> None:
        """Say `code` to the member and close the connection; nothing to do if the session has already ended."""
        if self._nursery is not None:
            self._nursery.start_soon(self._close_with, code, message)

    def _end(self) -> None:
        """Cancel the session's tasks, which closes the connection (a no-op once the session has ended)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _close_with(self, code: str, message: str) -> None:
        try:
            with trio.move_on_after(1.0):
                await self.send(
                    ev.Goodbye(message) if code == codes.SHUTTING_DOWN else ev.ErrorMessage(None, code, message)
                )
        except (Error, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _fatal(self, code: str, message: str) -> None:
        await self._last_word(ev.ErrorMessage(None, code, message))

    async def _last_word(self, msg: ev.Goodbye | ev.ErrorMessage) -> None:
        """Send the session's last frame, if the peer still reads within a second; nothing goes out after it."""
        try:
            with trio.move_on_after(1.0):
                await self.send(msg)
        except (Error, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def run(self, deadline: float, authenticated: Callable[[], object]) -> None:
        """Handshake by `deadline` (trio time), call `authenticated()`, then serve until the connection ends."""
        with trio.move_on_at(deadline) as scope:
            hello = await self._handshake()
        if scope.cancelled_caught:
            await self._fatal(codes.TIMEOUT, f"no hello within {HANDSHAKE_TIMEOUT:g} s of connecting")
            return
        if hello is None:
            return
        authenticated()
        self.auditor = hello.role == "auditor"
        self.d.register(self)
        self.ready = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if not self.auditor:  # an auditor reads and witnesses: nothing is pushed to it
                    nursery.start_soon(self._pusher)
                nursery.start_soon(self._flusher)
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._cosign_on_connect, hello.seen)
                try:
                    await self._reader()
                finally:
                    # Before the nursery closes to new tasks (as its block ends), not after: a close_soon from a
                    # shutdown or a replacing connection while the session's tasks wind down would start a task in
                    # a closed nursery, and that error would stop the broker.
                    self._nursery = None
                    nursery.cancel_scope.cancel()
        finally:
            self.ready = False
            self.d.unregister(self)
            for upload in self._uploads.values():
                if upload is not None:
                    upload.discard()

    async def _receive_event(self) -> ev.Event:
        while True:
            event = self.conn.next_event()
            if not isinstance(event, Signal):
                return event
            # PAUSED only happens before our welcome, which _handshake sends before the reader starts.
            if self._out:
                await self.flush()  # the answers to everything read so far go out in one write
            self.conn.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
            self._liveness.heard(trio.current_time())

    async def _handshake(self) -> ev.Hello | None:
        try:
            self.conn.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
            while self.conn.next_event() is NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
        except ProtocolError as exc:
            await self._fatal(exc.code, exc.what)
            return None
        hello = self.conn.hello
        if hello is None:
            return None
        version = choose_version(hello.versions)
        member = self.d.policy.members.get(self.member)
        if version is None:
            await self._fatal(codes.UNSUPPORTED_VERSION, f"versions {list(hello.versions)} not in {SUPPORTED_VERSIONS}")
            return None
        if hello.member != self.member:
            await self._fatal(codes.UNAUTHENTICATED, f"hello says {hello.member}, the certificate is {self.member}'s")
            return None
        if member is None:  # removed from the directory since its certificate was let through
            await self._fatal(codes.UNKNOWN_MEMBER, f"{self.member} is not in the directory")
            return None
        if member.status != ACTIVE:
            await self._fatal(codes.SUSPENDED, f"{self.member} is not an active member ({member.status})")
            return None
        await self.send(ev.Welcome(version, self.d.broker_id, self.d.now(), self.conn.limits))
        return hello

    async def _reader(self) -> None:
        while True:
            try:
                event = await self._receive_event()
            except ProtocolError as exc:
                log.info("%s: protocol error: %s", self.member, exc)
                await self._fatal(exc.code, exc.what)
                return
            if isinstance(event, ev.ConnectionClosed):
                return
            if isinstance(event, ev.Goodbye):  # its last frame: answer in kind (wire.md rule 19), then close
                log.info("%s said goodbye: %s", self.member, event.message)
                await self._last_word(ev.Goodbye(""))
                return
            try:
                await self._dispatch(event)
            except ProtocolError as exc:
                log.warning("%s: %s", self.member, exc)
                await self._fatal(exc.code, exc.what)
                return

    async def _dispatch(self, event: ev.Message) -> None:
        if isinstance(event, ev.SubmitBegin):
            await self._submit_begin(event)
        elif isinstance(event, ev.SubmitChunk):
            await self._submit_chunk(event)
        elif isinstance(event, ev.SubmitEnd):
            await self._submit_end(event)
        elif isinstance(event, ev.SubmitCancel):
            upload = self._uploads.pop(event.rid, None)
            self._unknown_at.pop(event.rid, None)
            self._upload_moved.pop(event.rid, None)
            if upload is not None:
                upload.discard()
                await self.send(ev.ErrorMessage(event.rid, codes.CANCELLED, "upload cancelled"))
        elif isinstance(event, ev.Credit):
            self._credit.set()
        elif isinstance(event, ev.Ack):
            await self._ack(event)
        elif isinstance(event, ev.Seen):
            item = self._pushed.pop(event.seq, None)
            if item is not None:
                self.d.confirm_later(self.member, item.kind, item.digest)
            self._room_freed()
        elif isinstance(event, ev.Refuse):
            # The member will not take the item: its push slot is free again, the item stays in the mailbox (the
            # pusher moves on past its seq; a later connection, or the purge at its expiry, settles it).
            item = self._pushed.pop(event.seq, None)
            what = f"{item.kind} {item.digest.hex()[:16]}" if item is not None else "an item"
            log.warning("%s refused %s (seq %d): %s: %r", self.member, what, event.seq, event.code, event.message)
            self.d.refusals += 1
            self._room_freed()
        elif isinstance(event, ev.Retract):
            await self._retract(event)
        elif isinstance(event, ev.Statement):
            await self._statement(event)
        elif isinstance(event, ev.GetCheckpoint):
            await self.send(ev.Checkpoint(event.rid, self.d.published))
        elif isinstance(event, ev.GetInclusion):
            await self._proof(event.rid, lambda: self.d.log.inclusion_proof(event.index, event.size), ev.Inclusion)
        elif isinstance(event, ev.GetConsistency):
            await self._proof(event.rid, lambda: self.d.log.consistency_proof(event.old, event.new), ev.Consistency)
        elif isinstance(event, ev.GetEntries):
            await self._entries(event)
        elif isinstance(event, ev.CosignResponse):
            self._cosign_response(event)
        elif isinstance(event, ev.ErrorMessage) and event.rid is not None and event.rid in self._cosigns:
            log.warning("%s refused to cosign: %s %s", self.member, event.code, event.message)
            self._cosigns[event.rid][2].set()
        elif isinstance(event, ev.Ping):
            await self.send(ev.Pong(event.n))

    # --- submissions ----------------------------------------------------------------------------------------

    async def _submit_begin(self, msg: ev.SubmitBegin) -> None:
        head = relay.parse_submitted_head(msg.head, msg.size)
        if isinstance(head, relay.Reject):
            self._uploads[msg.rid] = None
            await self.send(ev.ErrorMessage(msg.rid, head.code, head.message))
            return
        # An orphan (logged, its body lost in a crash) is known too: its retry is a duplicate, not decided again.
        known = self.d.mail.packet_by_id(self.member, head.core.packet_id) or self.d.orphan_row(
            self.member, head.core.packet_id
        )
        outcome = relay.admit(self.d.policy, self.member, head, known, self.d.now(), self.d.settings.window)
        if isinstance(outcome, relay.Reject):
            self._uploads[msg.rid] = None
            await self.send(ev.ErrorMessage(msg.rid, outcome.code, outcome.message))
        elif isinstance(outcome, relay.Denied):
            self._uploads[msg.rid] = None
            reasons = tuple(ev.DenyReason(to, reason) for to, reason in outcome.reasons)
            await self.send(ev.Deny(msg.rid, head.core.packet_id, reasons))
        else:
            # Admitted or a duplicate: receive the ciphertext either way (the grammar needs the upload to end);
            # a duplicate is checked again against what was spooled and answered with its existing receipt.
            signed_by = self.d.policy.members[self.member].sign_key  # admit checked the signature with it
            self._uploads[msg.rid] = self.d.spool.begin(head, msg.head, signed_by)
            self._upload_moved[msg.rid] = trio.current_time()
            if known is None:
                self._unknown_at[msg.rid] = self.d.recorded

    async def _submit_chunk(self, msg: ev.SubmitChunk) -> None:
        upload = self._uploads.get(msg.rid)
        if upload is not None:
            self._upload_moved[msg.rid] = trio.current_time()
            try:
                upload.write(msg.data)
            except Error as exc:
                upload.discard()
                self._uploads[msg.rid] = None
                await self.send(ev.ErrorMessage(msg.rid, codes.HASH_MISMATCH, str(exc)))
        # The data is on disk (or discarded): give the window back once half of it is used up, as nodes do. One
        # credit per half window, not one per chunk, spares a frame and often a write per small packet, and the
        # client always has half a window to send meanwhile (specs/wire.md, rule 16).
        window = self.conn.limits.window
        if self.conn.receive_window <= window // 2:
            await self.send(ev.Credit(window - self.conn.receive_window))

    async def _submit_end(self, msg: ev.SubmitEnd) -> None:
        upload = self._uploads.pop(msg.rid, None)
        unknown_at = self._unknown_at.pop(msg.rid, None)
        self._upload_moved.pop(msg.rid, None)
        if upload is None:
            return  # already answered (refused, failed or abandoned)
        try:
            stored = upload.finish()  # the verified bytes (small packets) or the spool file
        except Error as exc:
            await self.send(ev.ErrorMessage(msg.rid, codes.HASH_MISMATCH, str(exc)))
            return
        head = upload.head
        core = head.core
        # Unused at submit-begin and nothing recorded since: still unused (a query per packet saved).
        known = None if unknown_at == self.d.recorded else self.d.mail.packet_by_id(self.member, core.packet_id)
        if known is None:
            orphan = self.d.orphans.get((self.member, core.packet_id))
            if orphan is not None and orphan[1] != head.digest:
                what = f"packet id {core.packet_id.hex()} was already logged by {self.member} for another packet"
                await self._refuse_stored(msg.rid, head, what)
                return
            if orphan is None:
                # Policy may have changed while the ciphertext streamed in: decide again, as of now (the signature
                # was checked at submit-begin, and is checked again only if the sender's key changed meanwhile).
                outcome = relay.admit(
                    self.d.policy,
                    self.member,
                    head,
                    None,
                    self.d.now(),
                    self.d.settings.window,
                    signature_checked_with=upload.signed_by,
                )
                if isinstance(outcome, relay.Reject | relay.Denied):
                    self.d.spool.drop_unreferenced(self.d.mail, [head.digest])
                    if isinstance(outcome, relay.Reject):
                        await self.send(ev.ErrorMessage(msg.rid, outcome.code, outcome.message))
                    else:
                        reasons = tuple(ev.DenyReason(to, r) for to, r in outcome.reasons)
                        await self.send(ev.Deny(msg.rid, core.packet_id, reasons))
                    return
            body = stored if isinstance(stored, bytes) else None
            size = len(stored) if isinstance(stored, bytes) else stored.stat().st_size
            if orphan is not None:
                # Logged, so admitted, before a crash that lost its small body: queued at its existing index, with
                # nothing logged again and nothing decided again (the time window or the policy may have moved on
                # since; refusing now would contradict the log, which says the packet was relayed).
                del self.d.orphans[(self.member, core.packet_id)]
                index, at = orphan[0], orphan[2]
                row = PacketRow(head.digest, self.member, core.packet_id, index, core.expires, size, at)
                with self.d.mail.batch():
                    self.d.mail.record_packet(row, core.recipients, body)
                    self.d.mail.remove_orphan(self.member, core.packet_id)
                self.d.recorded += 1
            else:
                key = (self.member, core.packet_id)
                inflight = self._inflight.get(key)
                if inflight is not None and inflight[0] != head.digest:
                    what = f"packet id {core.packet_id.hex()} is in flight from {self.member} for another packet"
                    await self._refuse_stored(msg.rid, head, what)
                    return
                if inflight is None:
                    # The reader goes on with the next frames while the batch commits: one connection can then
                    # have many packets in one batch instead of one per commit cycle (the wire's request limit
                    # bounds it). The receipt goes out from the batch's callback: no task per packet.
                    self._enqueue_packet(msg.rid, head, key, size, body, upload.signed_by)
                else:
                    # The same packet again while its batch commits (a retry that overtook its receipt).
                    assert self._nursery is not None
                    self._nursery.start_soon(self._receipt_after_commit, msg.rid, head, key, inflight)
                return
        elif known.digest != head.digest:
            # Logged since this upload began, under the same id, for another packet (two uploads of one id in
            # flight at once): a receipt here would promise a digest the log does not hold at that index.
            what = f"packet id {core.packet_id.hex()} was already used by {self.member} for another packet"
            await self._refuse_stored(msg.rid, head, what)
            return
        else:
            # The same packet again (a retry after a lost receipt). Its mailbox rows were made in the same
            # transaction as its packet row, so there is nothing to queue: only the receipt was lost. The body
            # just received replaced the spooled one (same verified bytes); if every copy was already delivered
            # and acknowledged, nothing refers to it any more.
            index, at = known.log_index, known.received
            self.d.spool.drop_unreferenced(self.d.mail, [head.digest])
        await self.send(self._packet_receipt(msg.rid, head, index, at))

    async def _refuse_stored(self, rid: int, head: Head, what: str) -> None:
        """Refuse a completed upload as a replay. Its bytes are already in place (a large packet's spool file has
        its final name): nothing refers to them, so they go now, or each refusal would leave a file for good."""
        self.d.spool.drop_unreferenced(self.d.mail, [head.digest])
        await self.send(ev.ErrorMessage(rid, codes.REPLAY, what))

    def _enqueue_packet(
        self, rid: int, head: Head, key: tuple[str, bytes], size: int, body: bytes | None, signed_by: bytes | None
    ) -> None:
        core = head.core
        at = self.d.now()

        def recheck() -> Error | None:
            # A policy record landed ahead of the packet after it was decided on (protocol.md: policy as of the
            # packet's log position): decide again, at the time its entry carries, as an auditor's replay will.
            outcome = relay.admit(
                self.d.policy, self.member, head, None, at, self.d.settings.window, signature_checked_with=signed_by
            )
            if not isinstance(outcome, relay.Reject | relay.Denied):
                return None
            self._inflight.pop(key, None)
            self.d.spool.drop_unreferenced(self.d.mail, [head.digest])
            refused = Refused.of(outcome, core.packet_id)
            self.send_soon(refused.answer(rid))
            return refused

        def queue(index: int) -> None:
            row = PacketRow(head.digest, self.member, core.packet_id, index, core.expires, size, at)
            self.d.mail.record_packet(row, core.recipients, body)

        def durable(index: int) -> None:
            self._inflight.pop(key, None)
            self.send_soon(self._packet_receipt(rid, head, index, at))

        def failed(exc: BaseException) -> None:
            self._inflight.pop(key, None)
            self.send_soon(ev.ErrorMessage(rid, codes.INTERNAL, f"the log could not take the packet: {exc}"))

        entry = records.packet_entry(head.header.raw, head.signature, at)
        readers = (self.member, *core.recipients)
        waiter = self.d.enqueue(
            entry, queue, failed, traffic=True, on_durable=durable, readers=readers, recheck=recheck
        )
        self._inflight[key] = (head.digest, waiter, at)

    async def _receipt_after_commit(
        self, rid: int, head: Head, key: tuple[str, bytes], inflight: tuple[bytes, _Waiter, int]
    ) -> None:
        _, waiter, at = inflight
        try:
            index = await waiter.result()
        except Refused as refused:  # decided on again at its commit, and refused: the same answer
            await self.send(refused.answer(rid))
            return
        except Error as exc:
            await self.send(ev.ErrorMessage(rid, codes.INTERNAL, f"the log could not take the packet: {exc}"))
            return
        finally:
            if self._inflight.get(key) is inflight:
                del self._inflight[key]
        await self.send(self._packet_receipt(rid, head, index, at))

    def _packet_receipt(self, rid: int, head: Head, index: int, at: int) -> ev.Receipt:
        """The packet is durable at `index`: wake its recipients' pushers, and sign the sender's receipt."""
        core = head.core
        for r in core.recipients:
            self.d.wake(r)
        receipt = records.Receipt.make(
            self.d.identity.signing, self.d.origin, index, head.digest, core.packet_id, self.member, at
        )
        return ev.Receipt(rid, core.packet_id, index, head.digest, receipt.raw)

    # --- confirmations, retractions, statements ------------------------------------------------------------

    async def _ack(self, msg: ev.Ack) -> None:
        item = self._pushed.pop(msg.seq, None)
        self._room_freed()
        member = self.d.policy.members.get(self.member)
        if item is None or member is None:
            return
        try:
            ack, body, sig = records.Ack.parse(msg.ack)
        except Error as exc:
            raise ProtocolError(f"acknowledgement of seq {msg.seq} refused: {exc}", code=codes.BAD_PACKET) from None
        # Every field the log and the sender will read must be the packet's own: the frame's `id` and the ack's
        # `packet_id` are the client's to choose, so they are checked against the mailbox's record, as the
        # auditor does (an ack naming another sender would be logged and shown to that member).
        if (
            ack.recipient != self.member
            or ack.digest != item.digest
            or ack.sender != item.sender
            or ack.packet_id != item.packet_id
            or msg.id != item.packet_id
        ):
            raise ProtocolError(
                f"acknowledgement of seq {msg.seq} does not match the packet: it must name recipient {self.member},"
                f" sender {item.sender} and packet id {(item.packet_id or b'').hex()}",
                code=codes.BAD_PACKET,
            )
        try:  # after the cheap checks: a mismatched ack costs no signature check
            records.Ack.check(body, sig, member.sign_key, self.member)
        except Error as exc:
            raise ProtocolError(f"acknowledgement of seq {msg.seq} refused: {exc}", code=codes.BAD_SIGNATURE) from None
        pending = (self.member, item.digest)
        if pending in self.d.acks_pending:
            # Pushed again (a reconnection) while the first acknowledgement's batch commits: that one will take the
            # item out of the mailbox; logging and forwarding a second would say the packet arrived twice.
            return
        self.d.acks_pending.add(pending)
        sender = ack.sender

        def done(index: int) -> None:
            self.d.ack_effects(ack, index)
            self.d.acks_pending.discard(pending)
            self.d.wake(sender)

        def failed(exc: BaseException) -> None:
            # The item stays in the mailbox; a new connection pushes it again.
            self.d.acks_pending.discard(pending)
            self.close_soon(codes.INTERNAL, f"the log could not take the acknowledgement: {exc}")

        # Not awaited: the reader goes on with the next frames while the batch commits, so a member's
        # acknowledgements share commits instead of taking one commit cycle each.
        self.d.enqueue(records.ack_entry(ack), done, failed, traffic=True, readers=(ack.sender, ack.recipient))

    async def _retract(self, msg: ev.Retract) -> None:
        member = self.d.policy.members.get(self.member)
        row = self.d.mail.packet_by_id(self.member, msg.id)
        if member is None or row is None:
            await self.send(
                ev.ErrorMessage(msg.rid, codes.NOT_FOUND, f"no packet {msg.id.hex()} sent by {self.member}")
            )
            return
        try:
            retraction, body, sig = records.Retraction.parse(msg.retraction)
        except Error as exc:
            await self.send(ev.ErrorMessage(msg.rid, codes.REFUSED, str(exc)))
            return
        try:
            sign.verify(member.sign_key, records.RETRACT_DOMAIN, body, sig, what=f"retraction by {self.member}")
        except Error as exc:
            await self.send(ev.ErrorMessage(msg.rid, codes.BAD_SIGNATURE, str(exc)))
            return
        if retraction.sender != self.member or retraction.packet_id != msg.id or retraction.digest != row.digest:
            await self.send(ev.ErrorMessage(msg.rid, codes.REFUSED, "the retraction names another packet"))
            return
        prior = self.d.mail.retraction(row.digest)
        if prior is not None:
            # Retracted already (a retry after a lost answer, or a second `valise retract`): the same answer, with
            # nothing logged or relayed again. The same receipt too, as its time was kept (one redone after a
            # crash, or kept by an older broker, has none: the sender never got a receipt for it, so it gets one
            # dated now).
            index, at = prior
            await self.send(self._retraction_receipt(msg, row.digest, index, self.d.now() if at is None else at))
            return
        recipients = self.d.logged_header(row.log_index).core.recipients
        at = self.d.now()

        def done(index: int) -> None:
            self.d.withdrawals += 1
            self.d.retract_effects(retraction, recipients, index, at)

        readers = (self.member, *recipients)
        index = await self.d.append(records.retract_entry(retraction), done, traffic=True, readers=readers)
        for r in recipients:
            self.d.wake(r)
        await self.send(self._retraction_receipt(msg, row.digest, index, at))

    def _retraction_receipt(self, msg: ev.Retract, digest: bytes, index: int, at: int) -> ev.RetractResult:
        receipt = records.Receipt.make(self.d.identity.signing, self.d.origin, index, digest, msg.id, self.member, at)
        return ev.RetractResult(msg.rid, index, receipt.raw)

    async def _statement(self, msg: ev.Statement) -> None:
        try:
            record = policy_records.parse_policy(msg.statement)
            if record.type != policy_records.STMT:
                raise StatementError("members may submit only grant, accept and revoke statements")
            if record.body.get("author") != self.member:
                raise StatementError(f"the statement's author is not {self.member}")
        except Error as exc:
            await self.send(ev.ErrorMessage(msg.rid, codes.REFUSED, str(exc)))
            return
        statement = msg.statement

        def recheck() -> Refused | None:
            try:
                self.d.policy.check(statement)
            except Error as exc:
                what = str(exc)
                # wire.md: a signature that does not verify has its own code, whatever it signs.
                code = codes.BAD_SIGNATURE if isinstance(exc, StatementSignatureError) else codes.REFUSED
                return Refused(what, lambda rid: ev.ErrorMessage(rid, code, what))
            return None

        async with self.d.policy_writer():
            refused = recheck()
            if refused is None:
                # Operator commands wait for the lock, and records of our own come one at a time, so the check
                # holds where the statement lands; the committer checks again if the policy changed all the same.
                try:
                    index = await self.d.enqueue(statement, recheck=recheck).result()
                except Refused as exc:
                    refused = exc
        if refused is not None:
            await self.send(refused.answer(msg.rid))
            return
        receipt = records.Receipt.make(
            self.d.identity.signing, self.d.origin, index, record.id, bytes(16), self.member, self.d.now()
        )
        await self.send(ev.StatementResult(msg.rid, index, receipt.raw))

    async def _proof(self, rid: int, make: Callable[[], list[bytes]], answer: Any) -> None:
        try:
            proof = make()
        except Error as exc:
            await self.send(ev.ErrorMessage(rid, codes.NOT_FOUND, str(exc)))
            return
        await self.send(answer(rid, tuple(proof)))

    async def _entries(self, msg: ev.GetEntries) -> None:
        latest = self.d.log.latest
        limit = latest.size if latest else 0
        if not 0 <= msg.start < msg.end <= limit:
            what = f"entries {msg.start}..{msg.end} are not within the signed tree of {limit}"
            await self.send(ev.ErrorMessage(msg.rid, codes.NOT_FOUND, what))
            return
        # What this member may read in full, and for each run in between the stored roots of the complete subtrees
        # that cover it: the cost follows what the member may read, not the size of the range.
        readable = self.d.mail.readable(self.member, msg.start, msg.end, MAX_ENTRIES)
        plan = merkle.covering(msg.start, msg.end, readable, MAX_ENTRIES)
        full = [at for at, level in plan if level is None]
        entries = dict(zip(full, self.d.store.entries_at(full), strict=True))
        subtrees = iter(
            self.d.store.read_hashes(
                [merkle.stored_hash_index(level, at >> level) for at, level in plan if level is not None]
            )
        )
        # Fill the answer up to the peer's frame limit (at least one item: one entry always fits a frame).
        budget = (self.conn.peer_limits.frame if self.conn.peer_limits else MIN_FRAME) - 8192
        items: list[bytes] = []
        hashed: list[int] = []
        levels: list[int] = []
        for at, level in plan:
            item = entries[at] if level is None else next(subtrees)
            budget -= len(item) + 8
            if items and budget < 0:
                break
            if level is not None:
                hashed.append(len(items))
                levels.append(level)
            items.append(item)
        await self.send(ev.Entries(msg.rid, msg.start, tuple(items), tuple(hashed), tuple(levels)))

    # --- liveness -----------------------------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Ping a quiet member and give it up if nothing comes back; abandon uploads that stopped getting data
        (specs/wire.md, "Timeouts"). Otherwise a vanished peer would hold its uploads' files and its mailbox slot
        until the operating system noticed, which can take hours."""
        while True:
            await trio.sleep(liveness.CHECK_EVERY)
            now = trio.current_time()
            step = self._liveness.step(now)
            if step is liveness.Step.DEAD:
                log.info("%s: %s", self.member, self._liveness.silence(now))
                await self._close_with(codes.TIMEOUT, self._liveness.silence(now))
                return
            if step is liveness.Step.PING and not self.conn.outstanding_pings:
                self._pings += 1
                self.send_soon(ev.Ping(self._pings))
            for rid, moved in list(self._upload_moved.items()):
                if now - moved >= liveness.STALL:
                    self._abandon_upload(rid)

    def _abandon_upload(self, rid: int) -> None:
        """Give up an upload that got no data for liveness.STALL seconds: its file goes, its later chunks are
        discarded, and the member is told (it may submit the packet again)."""
        del self._upload_moved[rid]
        self._unknown_at.pop(rid, None)
        upload = self._uploads.get(rid)
        if upload is not None:
            upload.discard()
            self._uploads[rid] = None
            self.send_soon(ev.ErrorMessage(rid, codes.TIMEOUT, f"no data for this upload for {liveness.STALL:g} s"))

    # --- pushing mailbox items ---------------------------------------------------------------------------------

    async def _pusher(self) -> None:
        while True:
            # Made before the query, so whatever is queued after the query sets this event: when the query
            # returns fewer items than there was room for, it got everything, and no second query is needed to
            # learn that the mailbox is empty before waiting.
            self._wake = trio.Event()
            room = self.conn.push_room
            self._room_full = not room
            items = self._next_items(room) if room else []
            if not items:
                await self._wake.wait()
                continue
            for item, withdrawals in items:
                self._last_seq = item.seq
                # Recorded before the first frame goes out: the member may confirm the moment the last frame
                # arrives, and its confirmation must find the item (a confirmation for nothing is dropped).
                self._pushed[item.seq] = item
                if item.kind == "packet":
                    # The items came with their bytes; one retracted or purged since (while earlier items went
                    # out) must not go out after all. Rare: a query only when some packet was withdrawn.
                    gone = self.d.withdrawals != withdrawals and not self.d.mail.has_item(
                        self.member, "packet", item.digest
                    )
                    if gone or not await self._push_packet(item):
                        del self._pushed[item.seq]
                    continue
                # Our own record, written canonically by post(): decoding is enough.
                body = encoding.decode(item.body or b"", what="notice", max_size=records.NOTICE_MAX + 64)
                notice = body["notice"]
                if item.kind == "ack":
                    if "id" in body:
                        pid, by = body["id"], body["by"]
                    else:  # recorded before the fields were kept beside the notice
                        ack, _, _ = records.Ack.parse(notice)
                        pid, by = ack.packet_id, ack.recipient
                    self.queue(ev.AckForward(item.seq, pid, by, body["index"], notice))
                else:
                    by = records.Retraction.parse(notice)[0].sender
                    row = self.d.mail.packet(item.digest)
                    pid = row.packet_id if row else bytes(16)
                    self.queue(ev.RetractForward(item.seq, pid, by, body["index"], notice))
                if self._out_bytes >= FLUSH_AT:
                    await self.flush()
            await self.flush()  # the whole batch of items in as few writes as it takes
            if len(items) < room:
                await self._wake.wait()

    def _next_items(self, room: int) -> list[tuple[MailItem, int]]:
        """Up to `room` items to push next, each with the withdrawal count as of when it was read."""
        fresh = self._fresh
        if fresh is not None:
            return [fresh.popleft() for _ in range(min(room, len(fresh)))]
        withdrawals = self.d.withdrawals
        items = self.d.mail.pending(self.member, self._last_seq, limit=room)
        if len(items) < room:
            # Everything in the mailbox is read: from here on, what commits for this member is handed over
            # (offer), and nothing is committed between this query and this line (both are in this one step).
            self._fresh = deque()
        return [(item, withdrawals) for item in items]

    def offer(self, item: MailItem) -> None:
        """An item just committed to this member's mailbox. Kept for the pusher if it has read everything before
        it; past FRESH_MAX waiting (a member that does not confirm), the pusher goes back to querying."""
        fresh = self._fresh
        if fresh is not None:
            if len(fresh) < FRESH_MAX:
                fresh.append((item, self.d.withdrawals))
            else:
                self._fresh = None
        self._wake.set()

    def _room_freed(self) -> None:
        """A confirmation frees room in the push window: wake the pusher only if it is waiting for room (waking
        it otherwise costs a mailbox query that finds nothing new, twice per packet)."""
        if self._room_full:
            self._wake.set()

    async def _push_packet(self, item: MailItem) -> bool:
        body = item.body
        try:
            f: BinaryIO = io.BytesIO(body) if body is not None else self.d.spool.path(item.digest).open("rb")
        except OSError:
            # An item handed over at its commit says where its bytes were then; kept in the store is the other
            # place they can be (the query would have found them there).
            body = self.d.mail.body(item.digest)
            if body is None:
                log.error("spooled packet %s for %s is missing", item.digest.hex(), self.member)
                return False
            f = io.BytesIO(body)
        with f:
            prefix = f.read(PREFIX_SIZE)
            head_size = PREFIX_SIZE + parse_prefix(prefix) + SIGNATURE_SIZE
            head = prefix + f.read(head_size - PREFIX_SIZE)
            size = (len(body) if body is not None else os.fstat(f.fileno()).st_size) - head_size
            self.queue(ev.DeliverBegin(item.seq, head, size))
            chunk_limit = self.conn.peer_limits.chunk if self.conn.peer_limits else 65536
            remaining = size
            while remaining:
                while self.conn.send_window == 0:
                    # Armed before the flush: the member grants credit only for what it has received, and its
                    # credit may arrive while the flush is still writing.
                    self._credit = trio.Event()
                    await self.flush()
                    with trio.move_on_after(liveness.STALL) as stalled:
                        await self._credit.wait()
                    if stalled.cancelled_caught:
                        # The item stays in the mailbox for the next connection; this one ends here.
                        what = f"no credit for {liveness.STALL:g} s while delivering seq {item.seq}"
                        await self._close_with(codes.TIMEOUT, what)
                        await trio.sleep_forever()  # the close cancelled this session's tasks
                n = min(chunk_limit, self.conn.send_window, remaining)
                data = f.read(n)
                self.queue(ev.DeliverChunk(item.seq, data))
                remaining -= len(data)
                if self._out_bytes >= FLUSH_AT:
                    await self.flush()
            self.queue(ev.DeliverEnd(item.seq))
        return True

    # --- witnessing ---------------------------------------------------------------------------------------------

    async def request_cosignature(self, round_: CosignRound, got: list[note.Signature]) -> None:
        if self.d.policy.members.get(self.member) is None or not self.ready:
            return
        if self.conn.request_room == 0:
            # The member has left as many of our requests unanswered as it allows: it is skipped as a witness
            # (asking anyway would break our own side of the protocol and cut off its deliveries).
            log.info(
                "%s has %d requests unanswered; not asking it to cosign", self.member, len(self.conn.pending_requests)
            )
            return
        rid = self.conn.new_rid()
        done = trio.Event()
        self._cosigns[rid] = (round_, [], done)
        try:
            await self.send(ev.CosignRequest(rid, round_.old, round_.proof, round_.signed_note))
            await done.wait()  # bounded by the caller's cosigning deadline
            got.extend(self._cosigns[rid][1])
        except (Error, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("cosign request to %s failed: %s", self.member, exc)
        finally:
            self._cosigns.pop(rid, None)

    async def _cosign_on_connect(self, seen: int) -> None:
        """Ask a witness that just connected to cosign the current checkpoint, consistent with the size it says
        it verified. Checkpoints are otherwise cosigned only when the log grows; on a quiet log a node that
        requires a quorum would wait for one forever."""
        latest = self.d.log.latest
        if latest is None or seen > latest.size:
            return
        got: list[note.Signature] = []
        try:
            round_ = CosignRound.make(self.d.log, latest.note, seen)
        except Error as exc:
            log.info("not asking %s to cosign: %s", self.member, exc)
            return
        with trio.move_on_after(COSIGN_TIMEOUT):
            await self.request_cosignature(round_, got)
        current = self.d.log.latest
        if not got or current is None or current.size != latest.size:
            return
        try:
            if len(note.parse_note(self.d.published).signatures) < note.MAX_SIGNATURES:
                self.d.publish(cosignature.add_cosignatures(self.d.published, got))
        except Error as exc:  # already cosigned by this witness (a reconnect): keep the note as it is
            log.info("not adding %s's cosignature again: %s", self.member, exc)

    def _cosign_response(self, msg: ev.CosignResponse) -> None:
        pending = self._cosigns.get(msg.rid)
        member = self.d.policy.members.get(self.member)
        if pending is None or member is None:
            return
        round_, got, done = pending
        text = round_.text
        try:
            line = msg.cosignature if msg.cosignature.endswith(b"\n") else msg.cosignature + b"\n"
            sigs = note.parse_note(text + b"\n" + line).signatures
            verifier = cosignature.CosignatureVerifier(self.member, member.sign_key)
            for s in sigs:
                if (s.name, s.key_id) != (verifier.name, verifier.key_id):
                    raise Error(f"cosignature names {s.name}, not {self.member}")
                verifier.verify(text, s.sig)
            got.extend(sigs)
        except Error as exc:
            log.warning("cosignature from %s refused: %s", self.member, exc)
        finally:
            done.set()


def serve_forever(home: BrokerHome, settings: Settings, passphrase: bytes | None = None) -> None:
    """Run the daemon until SIGINT/SIGTERM; then stop gracefully within a deadline. One per directory."""
    fds.raise_soft_limit()
    with DaemonLock(home.serve_lock_path, "broker"):
        trio.run(_serve, home, settings, passphrase)


async def _serve(home: BrokerHome, settings: Settings, passphrase: bytes | None) -> None:
    import signal

    daemon = BrokerDaemon(home, settings, passphrase)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        gctune.settle_for_serving()
        print(
            f"broker {daemon.broker_id} listening on {settings.listen[0]}:{daemon.port}"
            + (f", tiles on http://{settings.http[0]}:{daemon.http_port}/" if settings.http else ""),
            flush=True,
        )
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                await daemon.shutdown(nursery)
                break
