"""The node daemon (`valise node run`): holds the unlocked identity, talks to the broker, serves the CLI.

Tasks (one nursery): the connection loop (connect over mutual TLS, hello/welcome, one session at a time,
reconnect with backoff and full jitter) and the control socket server (ops.py). Durable state lives in the node
store; the verified view of the log lives in the follower (follower.py), which is the only source of the
member keys this node seals to and verifies with.

What happens to a submission's answer (specs/protocol.md, "Relaying a packet"):
- `receipt`: the signed receipt must verify under the pinned broker's identity key and agree with the frame
  and the packet (id, digest, sender, origin) → `receipted`; later, once a verified checkpoint covers its index,
  the entry there must be this packet's `pkt` record (else an alarm);
- `deny`: the policy refused it → `denied` with the reason per recipient;
- `error` with a final code (outbox.FINAL_CODES) → `denied` with the code and message; any other code → retried
  later with backoff and jitter. A packet whose `expires` passes in the outbox is marked `expired`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable

import trio

from valise import gctune, identity, packet, records, stopsignals, tls
from valise.broker import fds
from valise.crypto import sign
from valise.daemonlock import DaemonLock
from valise.errors import (
    CheckpointError,
    Error,
    KeyFileError,
    NoteError,
    PacketError,
    RemoteError,
    SignatureError,
    StoreError,
    UsageError,
)
from valise.node import outbox, resealing, signers
from valise.node.control import listen, socket_path
from valise.node.follower import AwaitingQuorum, Committed, Follower, ForgedCosignature, ForkError, LogMismatchError
from valise.node.home import NodeHome
from valise.node.session import Disconnected, Reply, Session
from valise.node.store import AlarmRow, NodeStore, OutboxRow
from valise.packet.format import HEADER_DOMAIN, Header
from valise.policy import records as policy_records
from valise.tlog import checkpoint, cosignature
from valise.tlsstream import TLSSocketStream
from valise.wire import codes
from valise.wire import events as ev
from valise.wire.connection import NEED_DATA, READ_SIZE, Connection, Signal
from valise.wire.limits import SUPPORTED_VERSIONS
from valise.wire.state import Role

log = logging.getLogger("valise.node")

HANDSHAKE_TIMEOUT = 10.0
ALARM_TEXT = 1000  # characters of an alarm's message kept
# How long after a receipt the log may still fall short of its index (checkpoints come every second or so;
# this leaves room for clock skew and a broker that was briefly down).
RECEIPT_GRACE = 300
# How long the broker's published checkpoint may stay older than the tree this node verified (routine for the
# moment between a cosigning request and the cosigned note's publication) before it is an alarm.
BEHIND_GRACE = 300.0
POLL_INTERVAL = 5.0
SHUTDOWN_GRACE = 3.0
IDLE_CHECK = 1.0  # how often the submitter looks for packets whose retry time has come

Connector = Callable[[], Awaitable[trio.abc.Stream]]
Random = Callable[[int], bytes]


# What ends a connection without ending the daemon: the loop reconnects after a backoff.
CONNECTION_ERRORS = (OSError, Error, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)

# Replaced by another connection as this member this many times within the window: not a network blip but a second
# node running with this identity. The two would take turns for ever, each getting part of the deliveries.
SENT_STATEMENTS = 1000  # statements remembered until the verified log shows them (a member makes a few a day)
REPLACED_TIMES = 3
SIGNED_WITH = "outbox-signed-with"  # kv: the identity key the queued packets were last checked against
STOPPED_CLEANLY = "stopped-cleanly"  # kv: 1 once a run ended with every upload accounted for, 0 while one runs
REPLACED_WINDOW = 300.0
REPLACED_BACKOFF = 60.0


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class _Superseded(Exception):
    """A cosigning request for a tree smaller than the verified one (NodeDaemon.witness)."""


class NodeDaemon:
    def __init__(
        self,
        home: NodeHome,
        me: identity.Identity,
        *,
        passphrase: bytes | None = None,
        connector: Connector | None = None,
        random: Random = os.urandom,
        wall: Callable[[], int] = lambda: int(time.time()),
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.home = home
        self.config = home.config()
        if me.member_id != self.config.member_id:
            raise UsageError(f"the identity is {me.member_id}, the node directory is for {self.config.member_id}")
        self.identity = me
        self.member = me.member_id
        self.broker = home.broker_bundle()
        self.store = NodeStore.open(home.root)
        self.quorum = home.witness_policy()
        self.follower = self._load_follower()
        # Why the verified log is not (all) in use yet, with a quorum policy: e.g. "cosigned by 1 of ...".
        self.quorum_wait: str | None = None
        self._replaced: list[float] = []  # when another connection as this member replaced ours (recent ones)
        self._behind_since: float | None = None  # since when the broker's checkpoint is older than ours (quorum)
        # Statements this daemon sent and the broker logged, until its verified log shows them (ops.py: duplicate
        # checks and revoking by prefix must not wait a checkpoint, or a witness quorum, for them).
        self.sent_statements: dict[bytes, policy_records.Record] = {}
        self._passphrase = passphrase
        self._connector = connector or self._tls_connect
        # Built once, now: a damaged certificate or key file stops the daemon at start with the file's name, instead
        # of failing every connection attempt, for ever, with OpenSSL's "PEM lib".
        self._tls_context = self._make_tls_context() if connector is None else None
        self.random = random
        self.wall = wall
        self.poll_interval = poll_interval
        self.session: Session | None = None
        self.last_error: str | None = None
        self.storage_failures = 0  # connections ended in a row because this node, or the broker, could not store
        self._session_began = 0.0
        # After a `bad-signature` refusal of our own packet that the log does not explain (yet): the size then
        # followed, and the broker's words (_check_bad_signature).
        self._bad_signature: tuple[int, str, float] | None = None
        self._sync_lock = trio.Lock()
        self._outbox_wake = trio.Event()
        self._outcome = trio.Event()  # set (and replaced) whenever an outbox row leaves `queued`
        self._alarmed: set[tuple[str, str]] = {(a.kind, a.message) for a in self.store.alarms()}
        self._sign_queued_again()
        self.log_advanced = trio.Event()  # set (and replaced) whenever the verified or trusted log moves on
        caught_up = self.follower.catch_up()  # a policy was removed: what it held back is trusted now
        if caught_up is not None:
            self._persist(caught_up)
        self.connected_event = trio.Event()  # for tests and `send`: set while a session is open
        self.submitting: set[bytes] = set()  # packet ids whose submission is under way (the outbox sender's)
        # Packet ids sent to the broker in this run whose "tried" mark or outcome the store has not taken yet (a
        # full disk): they may be in the broker's log, so `retract` must not cancel them here, and a stop is not
        # clean while any is left.
        self.unrecorded: set[bytes] = set()
        self._reseals: dict[bytes, int] = {}  # packet id → times sealed afresh in this run (resealing.MAX_RESEALS)

    def _load_follower(self) -> Follower:
        """The verified log as the store holds it."""
        state, kept = self.store.follower_load()
        follower = Follower.restore(
            self.config.log_vkey, self.member, self.broker.member_id, state, kept, self.broker.sign_key,
            quorum=self.quorum, pending=self.store.follower_pending(),
        )  # fmt: skip
        follower.known_ack = lambda ack: self.store.acks_for(ack.packet_id).get(ack.recipient) == ack.raw
        follower.in_inbox = self.store.inbox_has
        follower.retraction_wanted = self.store.retraction_wanted
        return follower

    def _tried(self, packet_id: bytes) -> None:
        """Record that a submission of a queued packet went out; if the store cannot take even that, the packet
        stays in `unrecorded` for this run (and the run will not count as a clean stop)."""
        try:
            self.store.outbox_tried(packet_id)
        except StoreError as exc:
            log.error("packet %s was sent, and the store cannot record it: %s", packet_id.hex(), exc)
            return
        self.unrecorded.discard(packet_id)

    def _sign_queued_again(self) -> None:
        """After `valise node move --identity` to the member's new keys (policy.md, "Moving a member to new keys"):
        packets still queued were signed with the replaced key, which the broker no longer takes from this member;
        they are signed again with the new one. Their files are local and were sealed by this member."""
        key = self.identity.bundle.sign_key
        replaced = self.store.get(SIGNED_WITH)
        if replaced == key:
            return

        def resign(header: bytes, signature: bytes) -> bytes | None:
            try:
                sign.verify(key, HEADER_DOMAIN, header, signature, what="queued packet header")
            except SignatureError:
                pass
            else:
                return None
            # Only what this member signed before is signed again (a crypto review: any header put in the outbox
            # was signed, whoever wrote the file): from this member, under the key it replaced, where known.
            if Header.parse(header).core.sender != self.member:
                raise PacketError(f"the queued packet is not from {self.member}")
            if replaced is not None:
                sign.verify(replaced, HEADER_DOMAIN, header, signature, what="queued packet header (replaced key)")
            return self.identity.signing.sign(HEADER_DOMAIN, header)

        changed, problems = self.store.outbox_resign(resign)
        if changed:
            log.info("signed %d queued packet(s) again with %s's new identity key", changed, self.member)
        for problem in problems:  # the rest are signed again; this one fails when it is sent, as it would have
            self.alarm("outbox", f"a queued packet could not be signed again with the new identity key: {problem}")
        self.store.put(SIGNED_WITH, key)

    # --- small helpers --------------------------------------------------------------------------------------

    def now(self) -> int:
        return self.wall()

    def alarm(self, kind: str, message: str, evidence: bytes | None = None) -> None:
        """Record an alarm (once per run for the same text). A store that cannot take it (a full disk) must not
        stop what raised it: the alarm is logged, and recorded when it is next raised."""
        row = self._alarm_row(kind, message, evidence)
        if row is None:
            return
        try:
            self.store.alarm_add(*row)
        except StoreError as exc:
            self._alarmed.discard((row[1], row[2]))
            log.error("could not record the alarm above: %s", exc)

    def _alarm_row(self, kind: str, message: str, evidence: bytes | None) -> AlarmRow | None:
        """The alarm to store, or None for one raised already. Much of an alarm's text comes from the broker or a
        sender: bounded here, so a hostile one cannot make alarms that fill the disk or a status answer."""
        if len(message) > ALARM_TEXT:
            message = message[:ALARM_TEXT] + f"… ({len(message)} characters)"
        if (kind, message) in self._alarmed:
            return None
        self._alarmed.add((kind, message))
        log.error("ALARM (%s): %s", kind, message)
        return (self.now(), kind, message, evidence)

    def remember_statement(self, record: policy_records.Record) -> None:
        policy = self.follower.policy
        if policy is not None:  # drop those the verified log shows by now: they are in the policy itself
            for sid in [i for i in self.sent_statements if i in policy.statements]:
                del self.sent_statements[sid]
        if len(self.sent_statements) < SENT_STATEMENTS:
            self.sent_statements[record.id] = record

    def ack_problem(self, ack: records.Ack) -> str | None:
        """Why a recipient-signed acknowledgement `ack` (addressed to us) does not belong to a packet we sent, or
        None. Its signature proves who signed it, not that it answers anything: another member could sign one for
        a packet it never got, or for our packet id with another digest, and it would shadow the real one."""
        row = self.store.outbox_get(ack.packet_id)
        what = f"acknowledgement by {ack.recipient} of packet {ack.packet_id.hex()}"
        if row is None:
            return f"{what}, which this node did not send"
        if ack.digest != row.digest:
            return f"{what} names header digest {ack.digest.hex()[:16]}…, not the packet's {row.digest.hex()[:16]}…"
        if ack.recipient not in row.recipients:
            return f"{what}, which was not addressed to {ack.recipient}"
        return None

    def wake_outbox(self) -> None:
        self._outbox_wake.set()

    def _refused_checkpoint(self, exc: NoteError | CheckpointError, note: bytes) -> None:
        """protocol.md, "Nodes": a refused checkpoint is kept as evidence and raised as an alarm that `status`
        shows (a node pinned to the wrong log key otherwise looked healthy, with a log of size 0)."""
        log.warning("checkpoint refused: %s", exc.what)
        # One alarm per cause, in words of ours: the refusal's text quotes what the broker sent (signer names, a
        # size), and a broker sending a new note at every poll would otherwise add an alarm and its evidence
        # (up to 64 KiB) each time. The first note of each cause is kept; the daemon's log has every one.
        if "no verifiable signature" in exc.what or "not signed by" in exc.what:
            cause = "no signature by the pinned log key (is the node's --log-key the broker's log.vkey?)"
        elif "quorum" in exc.what:
            cause = "its witnesses' cosignatures do not meet the node's quorum policy"
        elif isinstance(exc, NoteError):
            cause = "the note is malformed or a known key's signature does not verify"
        else:
            cause = "the checkpoint is malformed, names another log, or does not extend the verified one"
        self.alarm("checkpoint", f"checkpoint refused: {cause}; the first such note is kept as evidence", note)

    def settled(self) -> None:
        """A queued packet left `queued` (receipted, denied, expired or cancelled): wake whoever waits for one."""
        self._outcome.set()
        self._outcome = trio.Event()

    async def wait_outcome(self, packet_id: bytes, seconds: float) -> OutboxRow | None:
        """Wait up to `seconds` for a queued packet to be receipted, denied or expired."""
        with trio.move_on_after(seconds):
            while True:
                row = self.store.outbox_get(packet_id)
                if row is None or row.state != "queued":
                    return row
                await self._outcome.wait()
        return self.store.outbox_get(packet_id)

    # --- running --------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._after_unclean_stop()
        listener = await listen(socket_path(self.home.root))
        from valise.node.ops import serve_control  # ops imports this module's types

        cancelled = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_control, self, listener)
                nursery.start_soon(self.connection_loop)
                task_status.started()
        except BaseException as exc:
            cancelled = _only_cancelled(exc)
            raise
        finally:
            socket_path(self.home.root).unlink(missing_ok=True)
            with trio.CancelScope(shield=True):  # we are usually here because of a cancellation
                await listener.aclose()
            # Stopped, not crashed: every upload has ended, one cut off counted as tried (unless the store could
            # not record that: then the next run counts every queued packet as tried).
            if cancelled and not self.unrecorded:
                try:
                    self.store.put(STOPPED_CLEANLY, b"\x01")
                except StoreError as exc:  # a store that fails now must not hide how the run ended
                    log.error("could not record a clean stop: %s", exc)

    def _after_unclean_stop(self) -> None:
        """A daemon that did not stop cleanly (killed, crashed, or its machine lost power) may have been sending a
        packet, which the broker may have logged with its receipt lost: every packet still queued counts as tried,
        so that `retract` does not cancel it here (it is retracted at the broker once its receipt comes)."""
        last = self.store.get(STOPPED_CLEANLY)
        self.store.put(STOPPED_CLEANLY, b"\x00")
        if last == b"\x01" or not (n := self.store.outbox_all_tried()):
            return
        if last is None:  # a store from before this record: how its last run ended is not known
            log.warning("how the last run stopped is not recorded: %d queued packet(s) count as sent once", n)
        else:
            log.warning("the last run did not stop cleanly: %d queued packet(s) may have reached the broker", n)

    async def goodbye(self) -> None:
        session = self.session
        if session is not None:
            with trio.move_on_after(SHUTDOWN_GRACE):
                with contextlib.suppress(Error, trio.BrokenResourceError, trio.ClosedResourceError):
                    await session.send(ev.Goodbye("node shutting down"))

    async def connection_loop(self) -> None:
        attempt = 0
        while True:
            pause = 0.0
            try:
                stream, conn = await self._open()
                attempt = 0
                self._session_began = trio.current_time()
                await self._serve(stream, conn)
            except CONNECTION_ERRORS as exc:
                pause = self._lost(exc)
            except BaseExceptionGroup as group:  # from the session's nursery
                expected, rest = group.split(CONNECTION_ERRORS)
                if rest is not None:  # cancelled (the daemon is stopping) or a bug; a lost connection is neither
                    raise rest  # noqa: B904 - the group's own tracebacks go with it
                assert expected is not None
                stored, _ = expected.split(StoreError)  # the cause to report, when a write failed here
                pause = self._lost(_first(stored or expected))
            finally:
                self.session = None
                if self.connected_event.is_set():
                    self.connected_event = trio.Event()
            await trio.sleep(max(pause, outbox.RECONNECT.delay(attempt, self.random)))
            attempt += 1

    def _storage_pause(self) -> float:
        return outbox.RECONNECT.ceiling(self.storage_failures)

    def _lost(self, exc: BaseException) -> float:
        """Note why the connection ended; return the least time to wait before the next (0: the usual backoff)."""
        broker_failed = isinstance(exc, RemoteError) and exc.code == codes.INTERNAL
        if isinstance(exc, StoreError) or broker_failed:
            if trio.current_time() - self._session_began > outbox.RECONNECT.cap:
                self.storage_failures = 0  # after a session that went well for a while: not in a row
            # This node (or the broker, which ended the connection with `internal`: its disk, say) could not
            # store what the connection carried: nothing was acknowledged or cosigned that is not stored, and the
            # broker offers it again on the next connection. Connecting at once would only fail the same way
            # again: wait longer each time until a connection ends for another reason.
            self.storage_failures += 1
            self.last_error = f"the broker failed: {exc}" if broker_failed else f"this node's storage failed: {exc}"
            log.error("%s; connecting again in %.0f s", self.last_error, self._storage_pause())
            return self._storage_pause()
        self.storage_failures = 0
        self.last_error = tls.explain_failure(str(exc) or type(exc).__name__)
        log.warning("broker connection: %s", self.last_error)
        if not (isinstance(exc, RemoteError) and exc.code == codes.REPLACED):
            return 0.0
        now = trio.current_time()
        self._replaced = [t for t in self._replaced if now - t < REPLACED_WINDOW] + [now]
        if len(self._replaced) < REPLACED_TIMES:
            return 0.0
        self.alarm(
            "identity",
            f"the broker keeps replacing this node's connection by another connection as {self.member} "
            f"({REPLACED_TIMES} times within {REPLACED_WINDOW:g} s): is a second node running with this identity? "
            f"Stop one of them; this one now waits {REPLACED_BACKOFF:g} s between connections",
        )
        return REPLACED_BACKOFF

    def _make_tls_context(self) -> ssl.SSLContext:
        crt = self.config.identity_dir / f"{self.member}.tls.crt"
        key = self.config.identity_dir / f"{self.member}.tls.key"
        try:
            return tls.client_context(crt, key, self.broker.cert_der, password=self._passphrase)
        except ssl.SSLError as exc:
            raise KeyFileError(
                f"the TLS certificate {crt} or its key {key} cannot be used: {exc.reason or exc}",
                hint="restore them from a backup of the identity (valise keygen made them)",
            ) from None
        except OSError as exc:
            raise KeyFileError(f"cannot read the TLS certificate {crt} or its key {key}: {exc.strerror}") from None

    async def _tls_connect(self) -> trio.abc.Stream:
        cfg = self.config
        ctx = self._tls_context or self._make_tls_context()
        tcp = await trio.open_tcp_stream(cfg.broker_host, cfg.broker_port)
        # OpenSSL on the socket, as the broker does (valise.tlsstream): less CPU per record than trio.SSLStream.
        stream = TLSSocketStream.wrap(tcp, ctx, server_side=False)
        try:
            await stream.do_handshake()
            tls.check_pinned(tls.peer_certificate(stream), self.broker.cert_der, who="broker")
            tls.check_alpn(stream.selected_alpn_protocol(), who="the broker")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _open(self) -> tuple[trio.abc.Stream, Connection]:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            stream = await self._connector()
            try:
                conn = Connection(Role.CLIENT)
                hello = ev.Hello(SUPPORTED_VERSIONS, self.member, "node", self.follower.size, conn.limits)
                await stream.send_all(conn.send(hello))
                while True:
                    data = await stream.receive_some(READ_SIZE)
                    conn.receive_data(data)
                    event = conn.next_event()
                    if isinstance(event, Signal):
                        assert event is NEED_DATA
                        continue
                    if isinstance(event, ev.Welcome):
                        break
                    if isinstance(event, ev.ErrorMessage):
                        raise RemoteError(event.code, f"the broker refused the connection: {event.message}")
                    raise Disconnected(f"the broker closed the connection during the handshake ({event})")
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        if event.broker != self.broker.member_id:
            await trio.aclose_forcefully(stream)
            raise Disconnected(f"the broker says it is {event.broker!r}, the pinned broker is {self.broker.member_id}")
        skew = event.time - self.now()
        if abs(skew) > 60:
            log.warning("the broker's clock differs from ours by %d s", skew)
        return stream, conn

    async def _serve(self, stream: trio.abc.Stream, conn: Connection) -> None:
        session = Session(self, stream, conn)
        self.session = session
        # A recovery is said at the level its loss was (a warning), so an operator tailing the log sees both.
        if self.last_error is not None:
            log.warning(
                "reconnected to broker %s (the connection had ended: %s)", self.broker.member_id, self.last_error
            )
        else:
            log.info("connected to broker %s", self.broker.member_id)
        self.last_error = None
        self.connected_event.set()
        try:
            async with trio.open_nursery() as nursery:
                session.scope = nursery.cancel_scope
                nursery.start_soon(session.reader)
                nursery.start_soon(session.worker)
                nursery.start_soon(session.watchdog)
                nursery.start_soon(session.releaser)
                nursery.start_soon(self._submitter, session)
                nursery.start_soon(self._poller, session)
        finally:
            session.lose_replies(f"the connection to broker {self.broker.member_id} ended; try again")
            # Close properly (a TLS close_notify after our goodbye), even when cancelled, but never wait long.
            with trio.move_on_after(1) as scope:
                scope.shield = True
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.aclose()

    # --- following the log and witnessing -------------------------------------------------------------------

    async def _poller(self, session: Session) -> None:
        while True:
            await self.try_sync(session)
            await trio.sleep(self.poll_interval)

    async def try_sync(self, session: Session) -> bool:
        """`sync`, for callers that carry on whatever the log says (a refusal is logged and maybe an alarm)."""
        try:
            return await self.sync(session)
        except StoreError as exc:
            if exc.cause is None:
                log.warning("not following the log: %s", exc)
                return False
            raise  # this node cannot record the log: what needs it fails with that, and the connection ends
        except Error as exc:
            log.warning("not following the log: %s", exc)
            return False

    async def sync(
        self, session: Session, note: bytes | None = None, proof: tuple[int, tuple[bytes, ...]] | None = None
    ) -> bool:
        """Follow the log to `note` (default: the broker's latest checkpoint). True if the follower is at it.

        With a witness policy, the note is then also offered for use (`_trust`): it is used only if it meets the
        quorum, and the verified entries wait until some checkpoint does."""
        async with self._sync_lock:
            if note is None:
                answer = await session.request(ev.GetCheckpoint)
                if not isinstance(answer, ev.Checkpoint):
                    log.info("no checkpoint from the broker: %s", answer)
                    return False
                note = answer.checkpoint
            if self.quorum is not None and proof is None:
                try:
                    older = self.follower.open(note).size < self.follower.size
                except (NoteError, CheckpointError) as exc:
                    self._refused_checkpoint(exc, note)
                    raise
                if older:  # e.g. the cosigned note of a tree this node already went past: no entries to fetch
                    self._behind(note)
                    await self._trust(session, note)
                    return True
                self._behind_since = None
            if proof is not None and self.follower.open(note).size < self.follower.size:
                raise _Superseded  # a cosigning request overtaken by a newer tree while we waited for the lock
            try:
                update = self.follower.begin(note, proof)
            except ForkError as exc:
                self.alarm("fork", exc.what, exc.evidence)
                raise
            except (NoteError, CheckpointError) as exc:
                self._refused_checkpoint(exc, note)
                raise
            if update is not None:
                while (want := update.wanted()) is not None:
                    start, end = want
                    answer = await session.request(functools.partial(_get_entries, start=start, end=end))
                    if not isinstance(answer, ev.Entries):
                        raise LogMismatchError(f"the broker did not serve entries {start}..{end}: {answer}")
                    try:
                        update.add(answer.start, answer.entries, answer.hashed, answer.levels)
                    except LogMismatchError as exc:
                        self.alarm("log", exc.what)
                        raise
                try:
                    done = self.follower.commit(update)
                except LogMismatchError as exc:
                    self.alarm("log", exc.what)
                    raise
                self._persist(done)
                log.info("verified checkpoint of size %d", done.size)
            if self.quorum is not None:
                await self._trust(session, note)
            self.check_overdue_receipts()
            self._judge_bad_signature()
            return True

    def _behind(self, note: bytes) -> None:
        """The broker serves a checkpoint older than the tree this node verified. For a moment that is routine (the
        cosigned note of a tree the node already went past); for longer, the broker has lost entries it signed,
        restored from an old backup say, and would otherwise be caught only once its log passed this size again.
        Without a quorum policy such a checkpoint is refused as a fork at once."""
        now = trio.current_time()
        if self._behind_since is None:
            self._behind_since = now
        elif now - self._behind_since >= BEHIND_GRACE:
            self._behind_since = math.inf  # one alarm for the episode, not one per poll as the broker's log grows
            served, verified = self.follower.open(note).size, self.follower.size
            self.alarm(
                "log",
                f"for over {BEHIND_GRACE:g} s the broker has served a checkpoint of size {served}, older than the "
                f"size {verified} this node verified: was it restored from an old backup? It has lost entries it "
                "signed",
                note,
            )

    async def _trust(self, session: Session, note: bytes) -> None:
        """Use `note` if its cosignatures meet the quorum (a fork is raised; a shortfall is only remembered)."""
        f = self.follower
        cp = f.open(note)
        proof: tuple[bytes, ...] | None = None
        if f.trust_needs_proof(cp):
            answer = await session.request(lambda rid: ev.GetConsistency(rid, cp.size, f.size))
            if not isinstance(answer, ev.Consistency):
                log.info("no consistency proof from %d to %d: %s", cp.size, f.size, answer)
                return
            proof = answer.proof
        try:
            done = f.trust(note, proof)
        except ForkError as exc:
            self.alarm("fork", exc.what, exc.evidence)
            raise
        except ForgedCosignature as exc:
            self.alarm("cosignature", exc.what, note)
            self.quorum_wait = exc.what
            return
        except AwaitingQuorum as exc:
            if f.awaiting:
                log.info("awaiting quorum: %s", exc.what)
                self.quorum_wait = exc.what
            return
        if done is not None:
            self._persist(done)
            log.info("checkpoint of size %d meets the witness quorum: in use", done.trusted)
        self.quorum_wait = f"no cosigned checkpoint of size {f.size} meets the quorum yet" if f.awaiting else None

    def _persist(self, done: Committed) -> None:
        """Store an accepted checkpoint's changes, with the alarms they raise, in one transaction: an alarm about
        an entry must not be lost to a crash, as that entry is never folded again."""
        alarms = [self._alarm_row("log", problem, entry) for problem, entry in done.problems]
        acks = []
        for ack in done.acks:
            problem = self.ack_problem(ack)
            if problem is None:
                acks.append((ack.packet_id, ack.recipient, ack.raw))
            else:
                alarms.append(self._alarm_row("ack", f"the log holds an {problem}", ack.raw))
        retracted = [(r.digest, r.sender, r.reason or "retracted") for r in done.retractions]
        rows = [a for a in alarms if a is not None]
        try:
            new_acks = self.store.follower_commit(
                done.state, done.keep, done.mine, done.pending, done.trusted, acks, rows, done.received, retracted,
                self.now(),
            )  # fmt: skip
        except BaseException:
            # The follower moved on in memory and the store did not (a full disk, say): back to what the store
            # holds. Otherwise the node would cosign and announce a tree it never recorded, and the next commit
            # would skip the entries in between (its policy records, this member's packets) for good.
            self._alarmed.difference_update((kind, message) for _, kind, message, _ in rows)
            self.follower = self._load_follower()
            raise
        if new_acks:  # the broker logged them but had not forwarded them (yet, or at all)
            log.info("%d acknowledgement(s) of packets sent taken from the verified log", new_acks)
        if retracted:  # the same for retractions of packets in the inbox
            log.info("%d retraction(s) of packets received taken from the verified log", len(retracted))
        self.check_receipts()
        # Deliveries held for a sender the log did not show may be taken now (Session.releaser).
        self.log_advanced.set()
        self.log_advanced = trio.Event()

    def holding(self) -> int:
        """Deliveries waiting for the verified log to show their sender (Session.held)."""
        return len(self.session.held) if self.session is not None else 0

    async def witness(self, session: Session, note: bytes, old: int, proof: tuple[bytes, ...]) -> bytes:
        """Follow the log to `note` (it must extend everything verified), then cosign it as this member."""
        cp = self.follower.open(note)
        try:
            # Checked again inside sync, under its lock: the poller may move the node past `cp` meanwhile, and
            # following a tree smaller than the verified one is (rightly) a fork alarm there.
            if cp.size < self.follower.size:
                raise _Superseded
            await self.sync(session, note, (old, proof))
        except _Superseded:
            await self._check_superseded(session, note, cp)
            raise CheckpointError(
                f"checkpoint of size {cp.size} is older than the verified size {self.follower.size}: not cosigned"
            ) from None
        cp = self.follower.open(note)
        if (cp.size, cp.root) != (self.follower.size, self.follower.root):
            raise CheckpointError(f"checkpoint of size {cp.size} is not the one this node verified")
        cosigner = cosignature.Cosigner(self.member, self.identity.signing)
        return (
            cosigner.cosign(checkpoint.Checkpoint(cp.origin, cp.size, cp.root, cp.extensions), self.now())
            .line()
            .encode()
        )

    async def _check_superseded(self, session: Session, note: bytes, cp: checkpoint.Checkpoint) -> None:
        """A cosigning request for a tree smaller than the one this node verified since. Usually a race, not a
        fork: an honest broker asks about each checkpoint as it signs it, and the request may wait behind a
        delivery while the node follows a newer one. A witness cosigns only its latest tree (C2SP
        tlog-witness answers such a request with a conflict), so it is refused either way; it is an alarm only
        if a consistency proof shows it does not fit the verified tree."""
        f = self.follower
        answer = await session.request(lambda rid: ev.GetConsistency(rid, cp.size, f.size))
        if not isinstance(answer, ev.Consistency):
            log.info("no consistency proof from %d to %d: %s", cp.size, f.size, answer)
            return
        ours = checkpoint.Checkpoint(f.origin, f.size, f.root)
        try:
            checkpoint.check_newer(checkpoint.Checkpoint(cp.origin, cp.size, cp.root), ours, answer.proof)
        except CheckpointError as exc:
            self.alarm("fork", f"checkpoint of size {cp.size} does not fit the verified log: {exc.what}", note)

    def check_overdue_receipts(self) -> None:
        """A receipt promises that the next checkpoint at or past its index + 1 holds the entry, and the broker
        signs one every few seconds. A checkpoint followed RECEIPT_GRACE seconds after this node had a receipt that
        still falls short of it shows the promise broken (a receipt for an index the log never reaches would
        otherwise leave its packet out of the outbox and never checked): an alarm, once per receipt.

        The grace runs on this node's clock alone, from when it had the receipt (kept in the store, so a daemon
        restarted more often than the grace still raises it). Measured from the receipt's `at`, the broker's
        clock, a node 400 s fast raised the alarm seconds after an honest receipt, and a node behind raised a true
        one that much later."""
        size, now = self.follower.size, self.now()
        for row in self.store.outbox_receipted_beyond(size):
            since = row.receipted_at
            if since is None:  # receipted under an older store: the grace starts now
                self.store.outbox_receipt_seen(row.packet_id, now)
                continue
            if now - since <= RECEIPT_GRACE:
                continue
            assert row.receipt is not None
            self.alarm(
                "receipt",
                f"receipt for packet {row.packet_id.hex()} promised log index {row.log_index}, but the broker's "
                f"checkpoints more than {RECEIPT_GRACE} s after this node had it still fall short of that index",
                row.receipt,
            )

    def check_receipts(self) -> None:
        """Receipts covered by the trusted log: the entry at the receipt's index must be this very packet."""
        for row in self.store.outbox_unchecked(self.follower.trusted_size):
            assert row.log_index is not None
            digest = self.store.my_entry_digest(row.log_index)
            if digest == row.digest:
                self.store.outbox_in_log(row.packet_id, 1)
            else:
                self.store.outbox_in_log(row.packet_id, -1)
                self.alarm(
                    "receipt",
                    f"receipt for packet {row.packet_id.hex()} promised log index {row.log_index}, "
                    "but the verified log holds another entry there",
                    row.receipt,
                )

    # --- the outbox -----------------------------------------------------------------------------------------

    async def _submitter(self, session: Session) -> None:
        """Send due packets in order, several in flight: each upload holds one of the broker's request slots until
        its answer comes, and the next upload starts as soon as the previous one is sent, so a backlog is not
        paced by one broker round trip per packet."""
        in_flight = self.submitting
        async with trio.open_nursery() as nursery:
            while True:
                due = self.store.outbox_due(self.now(), horizon=outbox.SEND_RETRY.cap)
                rows = [r for r in due if r.packet_id not in in_flight]
                if not rows:
                    self._outbox_wake = trio.Event()
                    with trio.move_on_after(IDLE_CHECK):
                        await self._outbox_wake.wait()
                    continue
                for row in rows:
                    if row.expires <= self.now():
                        self.store.outbox_expired(row.packet_id)
                        self.unrecorded.discard(row.packet_id)  # not queued any more: nothing left to cancel
                        self.settled()
                        continue
                    await session.requests.acquire()
                    current = self.store.outbox_get(row.packet_id)
                    if current is None or current.state != "queued":  # cancelled while we waited for a slot
                        session.requests.release()
                        continue
                    in_flight.add(row.packet_id)
                    self.unrecorded.add(row.packet_id)
                    sent_at = self.now()
                    try:
                        rid, reply = await self._upload(session, row)
                    except BaseException:
                        session.requests.release()
                        in_flight.discard(row.packet_id)
                        self._tried(row.packet_id)  # it may have reached the broker: no cancelling
                        raise
                    nursery.start_soon(self._await_answer, session, row, rid, reply, in_flight, sent_at)

    async def _upload(self, session: Session, row: OutboxRow) -> tuple[int, Reply]:
        """Stream one packet (head, chunks within the window, end); its answer is awaited by the caller."""
        conn = session.conn
        path = self.store.outbox_path(row.packet_id)
        with open(path, "rb") as f:  # noqa: ASYNC230 - a local file read in chunks between sends
            head = packet.read_head(f)
            f.seek(0)
            head_bytes = f.read(head.head_size)
            size = head.header.ct_len
            rid = conn.new_rid()
            reply = session.open_request(rid)
            try:
                await session.send(ev.SubmitBegin(rid, head_bytes, size))
                sent = 0
                chunk = conn.peer_limits.chunk if conn.peer_limits else 65536
                while sent < size and not reply.done.is_set():
                    room = min(conn.send_window, chunk, size - sent)
                    if room == 0:
                        await session.changed()
                        continue
                    data = f.read(room)
                    await session.send(ev.SubmitChunk(rid, data))
                    sent += len(data)
                # An early answer (a denial right after submit-begin) ends the upload: cancel the rest.
                await session.send(
                    ev.SubmitEnd(rid) if sent == size and not reply.done.is_set() else ev.SubmitCancel(rid)
                )
            except BaseException:
                session.close_request(rid)
                raise
        return rid, reply

    async def _await_answer(
        self, session: Session, row: OutboxRow, rid: int, reply: Reply, in_flight: set[bytes], sent_at: int
    ) -> None:
        try:
            await session.answer(reply, "a submission")
        except BaseException:
            self._tried(row.packet_id)  # sent, and unanswered: it may be in the broker's log
            raise
        finally:
            session.close_request(rid)
            session.requests.release()
            in_flight.discard(row.packet_id)
        assert reply.answer is not None
        now, reseals = self.now(), self._reseals.get(row.packet_id, 0)
        if resealing.wanted(self.store, row, reply.answer, sent_at, now, reseals):
            assert isinstance(reply.answer, ev.ErrorMessage)
            # Held as in flight meanwhile (the submitter must not send the old file again, nor `retract` cancel
            # it): added before anything awaits, so the submitter cannot have picked it up in between.
            in_flight.add(row.packet_id)
            self._reseals[row.packet_id] = reseals + 1
            try:
                await resealing.reseal(self, row, reply.answer)
            finally:
                in_flight.discard(row.packet_id)
            self.unrecorded.discard(row.packet_id)
            self.wake_outbox()
            return
        answer = resealing.explained(reply.answer, sent_at, now, reseals)
        try:
            self._answered(row, answer)
        except BaseException:  # a receipt that could not be recorded: the broker has it logged
            self._tried(row.packet_id)
            raise
        self.unrecorded.discard(row.packet_id)
        if isinstance(reply.answer, ev.ErrorMessage) and reply.answer.code == codes.BAD_SIGNATURE:
            await self._check_bad_signature(session, row, reply.answer)

    async def _check_bad_signature(self, session: Session, row: OutboxRow, answer: ev.ErrorMessage) -> None:
        """Start checking whether the broker refuses as badly signed a packet its own log says is well signed.

        The honest reason for such an answer is a rekey of this member that the node has not followed yet (the
        packet stays queued, _answered). The node follows the broker's latest checkpoint now; if that shows no
        rekey of it, the broker may still have applied one that it has not checkpointed yet (operator commands
        append between checkpoints). Any larger checkpoint is signed after this refusal, so shows what the
        broker had applied: the node judges by the first one it follows (_judge_bad_signature)."""
        if not self._signed_by_us(row) or not await self.try_sync(session):
            return
        if self._bad_signature is None and self._log_shows_own_key():
            self._bad_signature = (self.follower.size, answer.message, trio.current_time())

    def _log_shows_own_key(self) -> bool:
        """Whether the trusted log shows this node's identity key as its member's, with no rekey of it pending."""
        ours = self.identity.bundle.sign_key
        return self.follower.member_key(self.member) == ours and not self.follower.pending_keys(self.member)

    def _judge_bad_signature(self) -> None:
        """Once the node follows a checkpoint past the one it followed after a `bad-signature` refusal of its own
        packet: an alarm if even that one shows no rekey of this member."""
        waiting = self._bad_signature
        if waiting is None:
            return
        size, words, since = waiting
        if self.follower.size > size:
            when = "in a checkpoint signed after it refused them"
        elif trio.current_time() - since >= BEHIND_GRACE:
            # A broker that applied a rekey checkpoints it within its checkpoint interval: one whose log does not
            # grow for this long while it refuses does so with no rekey to explain it.
            when = f"for {BEHIND_GRACE:g} s after it refused them, with no newer checkpoint"
        else:
            return
        self._bad_signature = None
        if self._log_shows_own_key():
            self.alarm(
                "broker",
                f"the broker refuses {self.member}'s packets as badly signed, though its log, {when}, shows the key "
                f"that signed them as {self.member}'s",
                words.encode(),  # one alarm for them all: the first refusal's words are its evidence
            )

    def _answered(self, row: OutboxRow, answer: ev.Message) -> None:
        pid = row.packet_id.hex()
        if isinstance(answer, ev.Receipt):
            try:
                receipt = records.Receipt.verified_for(
                    answer.receipt, self.broker.sign_key, origin=self.follower.origin, index=answer.index,
                    digest=row.digest, packet_id=row.packet_id, sender=self.member,
                )  # fmt: skip
                if (answer.id, answer.digest) != (row.packet_id, row.digest):
                    raise Error("the receipt does not match the packet it answers")
            except Error as exc:
                self.alarm("receipt", f"bad receipt for packet {pid}: {exc.what}", answer.receipt)
                self._retry(row, f"bad receipt: {exc.what}")
                return
            self.store.outbox_receipted(row.packet_id, answer.receipt, receipt.index, self.now())
            log.info("packet %s receipted at log index %d", pid, receipt.index)
            self.check_receipts()
        elif isinstance(answer, ev.Deny):
            self.store.outbox_denied(row.packet_id, {r.to: r.reason for r in answer.reasons})
            log.info("packet %s denied: %s", pid, "; ".join(f"{r.to}: {r.reason}" for r in answer.reasons))
        elif isinstance(answer, ev.ErrorMessage) and answer.code == codes.BAD_SIGNATURE and self._signed_by_us(row):
            # Signed with this member's key as this node holds it, yet refused: the broker holds another key for
            # this member, which moved to new keys before its node did. Kept queued: the node signs it again once
            # pointed at the new keys (_sign_queued_again), and it goes then.
            self._retry(
                row,
                f"{answer.code}: {answer.message} (if {self.member} moved to new keys, point this node at them: "
                f"valise node move --dir {self.home.root} --identity DIR)",
            )
            return
        elif isinstance(answer, ev.ErrorMessage) and outbox.is_final(answer.code):
            self.store.outbox_failed(row.packet_id, answer.code, answer.message)
            log.info("packet %s refused (%s): %s", pid, answer.code, answer.message)
        else:
            what = f"{answer.code}: {answer.message}" if isinstance(answer, ev.ErrorMessage) else answer.TYPE
            self._retry(row, what)
            return
        self.settled()

    def _signed_by_us(self, row: OutboxRow) -> bool:
        """Whether the queued packet's header verifies under this node's identity key."""
        try:
            with open(self.store.outbox_path(row.packet_id), "rb") as f:
                head = packet.read_head(f)
            signers.check_header(head, self.identity.bundle.sign_key)
        except (OSError, Error):
            return False
        return True

    def _retry(self, row: OutboxRow, error: str) -> None:
        delay = outbox.SEND_RETRY.delay(row.attempts, self.random)
        self.store.outbox_retry_later(row.packet_id, self.now() + delay, error)
        log.info("packet %s: %s; retrying in %.1f s", row.packet_id.hex(), error, delay)


def _only_cancelled(exc: BaseException) -> bool:
    """Whether `exc` is a cancellation (the daemon told to stop), not a crash, alone or in a group."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return False


def _get_entries(rid: int, *, start: int, end: int) -> ev.Message:
    return ev.GetEntries(rid, start, end)


async def run_node(home: NodeHome, me: identity.Identity, passphrase: bytes | None) -> None:
    """`valise node run`: lock the directory, run until SIGINT/SIGTERM, then stop within a grace period."""
    with DaemonLock(home.lock_path, "node daemon"):
        daemon = NodeDaemon(home, me, passphrase=passphrase)
        fds.raise_soft_limit()  # a burst of local clients holds descriptors too (control.serve waits when out)
        # The receiver is open until the daemon has stopped and closed its store (stopsignals.py).
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        stopsignals.stop_when_signalled, signals, daemon.goodbye, nursery.cancel_scope, "node"
                    )
                    await nursery.start(daemon.run)
                    gctune.settle_for_serving()
                    cfg = daemon.config
                    print(
                        f"valise node: {daemon.member} running in {home.root}, broker "
                        f"{cfg.broker_host}:{cfg.broker_port} (valise status --node {home.root})",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                daemon.store.close()
            await stopsignals.drop_pending(signals, "node")
