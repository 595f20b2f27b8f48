"""One connection of the node daemon to the broker (an I/O edge; specs/wire.md, specs/protocol.md "Nodes").

Tasks of one session, in one nursery:
- the *reader* owns the receive side: it feeds `Connection`, resolves answers to this node's requests (by rid),
  notes credit, answers pings, and hands every pushed item (deliveries, forwarded notices, cosign requests) to
  the *worker* through a channel. The reader never awaits an answer itself, so a worker that needs the log
  (a sender's key, a checkpoint to verify) can always get it;
- the *worker* handles pushed items in order: it spools a delivery to a file while hashing it, grants credit as
  bytes reach the file, stores the packet and acknowledges it; it verifies forwarded notices; it witnesses;
- the *submitter* sends the outbox in order (daemon.py decides what happens with each answer);
- the *poller* asks for the checkpoint every few seconds and follows the log.

Every frame goes out through `send`, under one lock, so frames of different tasks never interleave.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import trio

from valise import packet, records
from valise.errors import (
    Error,
    PacketError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    SignatureError,
    StoreError,
)
from valise.node import signers
from valise.node.store import writing
from valise.packet.format import CiphertextHasher, Head, NeedMore, parse_head
from valise.utctime import utc
from valise.wire import codes, liveness
from valise.wire import events as ev
from valise.wire import limits as L
from valise.wire.connection import NEED_DATA, READ_SIZE, Connection, Signal

if TYPE_CHECKING:
    from valise.node.daemon import NodeDaemon

log = logging.getLogger("valise.node")

# Pushed items the worker may lag behind: deliveries are bounded by the pushes the broker may have in flight and
# their chunks by the flow-control window this node grants, so the channel can never need more than this.
INBOUND_SLACK = 64

# Deliveries from a sender the verified log does not show yet (specs/protocol.md, "Nodes"): the usual case is a
# member admitted after the checkpoint this node last verified, or above its trusted one under a quorum policy.
# They wait, spooled and unacknowledged, for the log to catch up; bounded, as a broker can claim any sender.
HOLD_COUNT = 64  # the pushes a broker may have unconfirmed: more can never be waiting anyway
HOLD_BYTES = 256 * 1024 * 1024  # spool space for unverified data; a larger delivery is refused until a reconnect
HOLD_TIME = 600.0  # seconds; past that, the sender is refused with an alarm (the item stays in the mailbox)
# A delivery whose packet expired less than this long ago is refused without an alarm: the broker purges by its
# own clock every few seconds, and the broker's time window (±600 s) is how far apart honest clocks may be.
EXPIRED_GRACE = 600
HOLD_RECHECK = 5.0  # seconds between checks for deliveries held too long


# What the reader hands to the worker, in the order the broker sent them.
PUSHED = (
    ev.CosignRequest,
    ev.DeliverBegin,
    ev.DeliverChunk,
    ev.DeliverEnd,
    ev.DeliverCancel,
    ev.AckForward,
    ev.RetractForward,
)


class Disconnected(Error):
    """The broker closed the connection or said goodbye."""


class Refusal(PacketError):
    """A pushed item this node will not take, with the wire code its `refuse` carries."""

    def __init__(self, code: str, what: str, *, alarm: bool = True) -> None:
        super().__init__(what)
        self.code = code
        self.alarm = alarm  # False: routine (a packet that expired a moment ago), logged but no alarm


def worth_an_alarm(exc: Error) -> bool:
    return not isinstance(exc, Refusal) or exc.alarm


def refusal_code(exc: Error) -> str:
    if isinstance(exc, Refusal):
        return exc.code
    return codes.BAD_SIGNATURE if isinstance(exc, SignatureError) else codes.BAD_PACKET


@dataclass(slots=True)
class Reply:
    """An answer slot for one request of ours."""

    done: trio.Event = field(default_factory=trio.Event)
    answer: ev.Message | None = None
    lost: Disconnected | None = None  # the connection ended first


@dataclass(slots=True)
class Incoming:
    """A delivery being spooled: where it goes, how much came, and whether it is still acceptable."""

    seq: int
    head: Head | None
    file: IO[bytes] | None
    path: Path | None
    hasher: CiphertextHasher | None
    problem: str | None = None
    code: str = codes.BAD_PACKET  # the `refuse` code that goes with `problem`
    what: str = "a delivery"  # how alarms name it
    alarm: bool = True  # whether refusing it is worth an alarm (see Refusal)
    awaiting: str | None = None  # a sender the verified log does not show yet: held at the end, not refused
    sign_key: bytes | None = None  # the sender's identity key its header verified under (signers.packet_signer)


@dataclass(slots=True)
class Held:
    """A complete delivery whose sender's key the verified log does not show yet (see HOLD_COUNT)."""

    seq: int
    head: Head
    path: Path
    since: float  # trio time
    what: str


class Session:
    def __init__(self, daemon: NodeDaemon, stream: trio.abc.Stream, conn: Connection) -> None:
        self.d = daemon
        self.stream = stream
        self.conn = conn
        self._lock = trio.Lock()
        self._replies: dict[int, Reply] = {}
        self._changed = trio.Event()  # set on credit and on any answer: submitters re-check their conditions
        limits = conn.limits
        size = limits.pushes * 4 + limits.window // 1024 + INBOUND_SLACK
        self._in_send, self._in_recv = trio.open_memory_channel[ev.Message](size)
        self._incoming: Incoming | None = None
        self.held: dict[int, Held] = {}
        peer = conn.peer_limits
        self._requests = trio.Semaphore(max(1, (peer.requests if peer else 1) - 1))
        self._liveness = liveness.Liveness.starting(trio.current_time())
        self._pings = 0
        self.scope: trio.CancelScope | None = None  # the connection's tasks (the daemon sets it): cancel to end it

    # --- sending --------------------------------------------------------------------------------------------

    async def send(self, msg: ev.Message) -> None:
        async with self._lock:
            data = self.conn.send(msg)
            await self.stream.send_all(data)

    async def request(self, make: Callable[[int], ev.Message]) -> ev.Message:
        """Send a request (`make(rid)`) and wait for its answer; an `error` answer is returned, not raised."""
        async with self._requests:
            rid = self.conn.new_rid()
            reply = self._replies[rid] = Reply()
            try:
                msg = make(rid)
                await self.send(msg)
                await self.answer(reply, msg.TYPE)
            finally:
                self._replies.pop(rid, None)
            assert reply.answer is not None
            return reply.answer

    async def answer(self, reply: Reply, what: str) -> None:
        """Wait for the answer to a request of ours, within liveness.STALL seconds (specs/wire.md, "Timeouts").
        A broker that keeps the connection alive but leaves a request unanswered would otherwise hold the
        caller for good (a control client; the log follower, and with it deliveries and cosigning): the
        connection is given up instead, and the node reconnects."""
        with trio.move_on_after(liveness.STALL):
            await reply.done.wait()
            if reply.lost is not None:
                raise reply.lost
            return
        reason = f"the broker left {what} unanswered for {liveness.STALL:g} s"
        log.warning("%s; reconnecting", reason)
        self.d.last_error = reason
        if self.scope is not None:
            self.scope.cancel()
        raise Disconnected(reason)

    def open_request(self, rid: int) -> Reply:
        """Register an answer slot for a request the caller sends itself (a streamed submission)."""
        reply = self._replies[rid] = Reply()
        return reply

    def close_request(self, rid: int) -> None:
        self._replies.pop(rid, None)

    def lose_replies(self, reason: str) -> None:
        """The connection has ended: whoever waits for an answer (a control client, the log follower) hears so
        at once, instead of after liveness.STALL with the node long reconnected."""
        for reply in self._replies.values():
            if not reply.done.is_set():
                reply.lost = Disconnected(reason)
                reply.done.set()

    async def changed(self) -> None:
        """Wait until credit arrives or some request is answered."""
        await self._changed.wait()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def requests(self) -> trio.Semaphore:
        return self._requests

    # --- the reader -----------------------------------------------------------------------------------------

    async def reader(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(READ_SIZE)
                self._liveness.heard(trio.current_time())
                self.conn.receive_data(data)
                while True:
                    event = self.conn.next_event()
                    if isinstance(event, Signal):
                        assert event is NEED_DATA
                        break
                    if isinstance(event, ev.ConnectionClosed):
                        raise Disconnected("the broker closed the connection" + ("" if event.clean else " abruptly"))
                    await self._dispatch(event)
        except RemoteProtocolError as exc:
            log.warning("broker broke the wire protocol: %s", exc)
            with trio.move_on_after(1):
                await self.send(ev.ErrorMessage(None, exc.code, exc.what[:900]))
            raise

    async def _dispatch(self, msg: ev.Message) -> None:
        rid = getattr(msg, "rid", None)
        if isinstance(msg, ev.ErrorMessage) and msg.rid is None:
            raise msg.as_exception()
        if isinstance(msg, ev.Goodbye):
            raise Disconnected(f"the broker said goodbye: {msg.message}")
        if isinstance(msg, ev.Credit):
            self._poke()
        elif isinstance(msg, ev.Ping):
            await self.send(ev.Pong(msg.n))
        elif isinstance(msg, ev.Pong):
            pass
        elif isinstance(msg, PUSHED):
            await self._in_send.send(msg)
        elif rid is not None and rid in self._replies:
            reply = self._replies[rid]
            reply.answer = msg
            reply.done.set()
            self._poke()
        else:
            log.info("ignoring %s rid %s: no request of ours is waiting for it", msg.TYPE, rid)

    async def watchdog(self) -> None:
        """Ping a quiet broker, and give the connection up if nothing comes back (specs/wire.md, "Timeouts"): a
        broker that vanished without closing the connection would otherwise leave every request of ours waiting
        for good, and the node would never reconnect."""
        while True:
            await trio.sleep(liveness.CHECK_EVERY)
            now = trio.current_time()
            step = self._liveness.step(now)
            if step is liveness.Step.DEAD:
                raise Disconnected(f"the broker is not answering: {self._liveness.silence(now)}")
            if step is liveness.Step.PING and not self.conn.outstanding_pings:
                self._pings += 1
                with trio.move_on_after(liveness.ANSWER) as scope:
                    await self.send(ev.Ping(self._pings))
                if scope.cancelled_caught:
                    raise Disconnected(f"the broker took nothing we sent for {liveness.ANSWER:g} s")

    # --- the worker -----------------------------------------------------------------------------------------

    async def worker(self) -> None:
        try:
            await self._work()
        finally:
            self._discard()  # a delivery cut off with the connection: its partial file goes (it is pushed again)

    async def _work(self) -> None:
        # Closed without a checkpoint (not `async with`): closing with one let the reader fail on the closed
        # channel first, and the nursery's cancellation then replaced what ended the worker (a StoreError, which
        # decides how long the node waits before it connects again) with a BrokenResourceError.
        try:
            await self._work_on()
        finally:
            self._in_recv.close()

    async def _work_on(self) -> None:
        async for msg in self._in_recv:
            if isinstance(msg, ev.DeliverBegin):
                await self._deliver_begin(msg)
            elif isinstance(msg, ev.DeliverChunk):
                await self._deliver_chunk(msg)
            elif isinstance(msg, ev.DeliverEnd):
                await self._deliver_end(msg)
            elif isinstance(msg, ev.DeliverCancel):
                self._discard()
            elif isinstance(msg, ev.AckForward):
                await self._ack_forward(msg)
            elif isinstance(msg, ev.RetractForward):
                await self._retract_forward(msg)
            elif isinstance(msg, ev.CosignRequest):
                await self._cosign(msg)

    async def sender_keys(self, member: str) -> list[bytes]:
        """A member's identity keys from the verified log, the current one first (PolicyState.identity_keys);
        follows the log once if the member is not known yet."""
        keys = self.d.follower.identity_keys(member)
        if not keys:
            await self.d.try_sync(self)
            keys = self.d.follower.identity_keys(member)
        return keys

    def _signer(self, head: Head) -> bytes:
        """The sender's key that signed `head`, as the verified log allows (signers.packet_signer)."""
        sender, digest = head.core.sender, head.digest
        return signers.packet_signer(
            head,
            self.d.follower.identity_keys(sender),
            in_inbox=lambda: self.d.store.inbox_has(digest),
            logged_at=lambda: self.d.store.received_index(digest),
            key_at=lambda index: self.d.follower.key_at(sender, index),
        )

    def _signer_or_wait(self, head: Head) -> bytes | None:
        """`_signer`, or None while the trusted log may not show the key yet: a sender it does not show as a
        member, or one whose rekey the node has verified but may not use yet (a witness quorum pending), and
        whose new key does sign this header: one that no key of the sender's signs is refused as forged now."""
        if not self.d.follower.identity_keys(head.core.sender):
            return None
        try:
            return self._signer(head)
        except SignatureError:
            pending = self.d.follower.pending_keys(head.core.sender)
            if signers.first_signer(pending, functools.partial(signers.check_header, head)) is not None:
                return None
            raise

    async def _signer_synced(self, head: Head) -> bytes | None:
        try:
            return self._signer_or_wait(head)
        except SignatureError:
            # The sender may have moved to new keys that the log this node verified does not show yet.
            if not await self.d.try_sync(self):
                raise
            return self._signer_or_wait(head)

    async def _deliver_begin(self, msg: ev.DeliverBegin) -> None:
        self._discard()
        inc = Incoming(msg.seq, None, None, None, None)
        self._incoming = inc
        parsed: Head | None = None
        try:
            head = parse_head(msg.head)
            if isinstance(head, NeedMore) or head.head_size != len(msg.head):
                raise PacketError("deliver-begin head is not exactly one packet head")
            parsed = head
            if head.header.ct_len != msg.size:
                raise PacketError(f"declared size {msg.size} is not the header's ciphertext length")
            core = head.core
            if self.d.member not in core.recipients:
                raise PacketError(f"packet is for {', '.join(core.recipients)}, not {self.d.member}")
            if await self.sender_keys(core.sender):
                inc.sign_key = await self._signer_synced(head)
            if inc.sign_key is None:
                self._room_to_hold(core.sender, msg.size)
                inc.awaiting = core.sender  # its signature is checked once the trusted log shows the sender's key
            self._check_expiry(head)
            # Only a packet this member can read is acknowledged: an acknowledgement is logged as the delivery.
            packet.check_readable(head, self.d.identity)
        except Error as exc:
            if isinstance(exc, StoreError):  # this node's fault, not the item's: end the connection
                raise
            inc.problem = exc.what
            inc.code = refusal_code(exc)
            inc.alarm = worth_an_alarm(exc)
            inc.what = _delivery_name(msg.head, parsed)
            log.warning("delivery seq %d refused: %s", msg.seq, exc.what)
            return
        inc.what = _delivery_name(msg.head, head)
        inc.head = head
        inc.path = self.d.store.tmp_path(f"deliver-{head.digest.hex()}.part")
        # A local spool file written chunk by chunk; closed in _discard / _deliver_end.
        with writing("a delivery's spool file", inc.path):
            inc.file = open(inc.path, "wb")  # noqa: SIM115, ASYNC230
            inc.file.write(msg.head)
        inc.hasher = CiphertextHasher(head.header)

    def _check_expiry(self, head: Head) -> None:
        """That the packet has not expired (a delivery past it is not taken, nor acknowledged: the broker purges it).

        Only one expired well before it came is worth an alarm (a broker that should have purged it long ago): the
        broker purges every few seconds, by its own clock, and a packet that expired a moment ago, or whose expiry
        this node's clock, a little ahead, says has passed, is routine."""
        core = head.core
        now = self.d.now()
        if core.expires <= now:
            raise Refusal(
                codes.STALE,
                f"packet {core.packet_id.hex()} from {core.sender} expired at {utc(core.expires)}",
                alarm=now - core.expires > EXPIRED_GRACE,
            )

    async def _deliver_chunk(self, msg: ev.DeliverChunk) -> None:
        inc = self._incoming
        if inc is not None and inc.seq == msg.seq and inc.problem is None:
            assert inc.file is not None
            assert inc.hasher is not None
            try:
                inc.hasher.update(msg.data)
                with writing("a delivery's spool file", inc.path):
                    inc.file.write(msg.data)
            except StoreError:
                raise  # this node's fault, not the delivery's: the connection ends (NodeDaemon._lost)
            except Error as exc:
                inc.problem = exc.what
                inc.code = codes.HASH_MISMATCH
        await self._grant()

    async def _grant(self) -> None:
        # The data is in the file (or dropped): open the window again once half of it is used up.
        window = self.conn.limits.window
        if self.conn.receive_window <= window // 2:
            await self.send(ev.Credit(window - self.conn.receive_window))

    async def _deliver_end(self, msg: ev.DeliverEnd) -> None:
        inc = self._incoming
        self._incoming = None
        if inc is None or inc.seq != msg.seq:
            return
        if inc.problem is None:
            assert inc.hasher is not None
            try:
                inc.hasher.finish()
            except Error as exc:
                inc.problem = exc.what
                inc.code = codes.HASH_MISMATCH
        if inc.problem is not None or inc.head is None or inc.path is None or inc.file is None:
            self._close(inc)
            await self._refuse(msg.seq, inc.code, f"refused {inc.what}: {inc.problem}", raise_alarm=inc.alarm)
            return
        try:
            with writing("a delivery's spool file", inc.path):
                inc.file.flush()
        except StoreError:
            self._close(inc)
            raise
        inc.file.close()
        if inc.awaiting is not None:
            self.held[msg.seq] = Held(msg.seq, inc.head, inc.path, trio.current_time(), inc.what)
            log.info("holding %s until the trusted log shows %s's key for it", inc.what, inc.awaiting)
            return
        await self._accept(msg.seq, inc.head, inc.path, inc.what, inc.sign_key)

    async def _accept(self, seq: int, head: Head, path: Path, what: str, sign_key: bytes | None) -> None:
        """Store a delivery, complete and verified under the sender's `sign_key`, in the inbox; acknowledge it."""
        core = head.core
        now = self.d.now()
        try:
            labels = core.labels.to_json()
            taken = self.d.store.inbox_add_file(head.digest, core.packet_id, core.sender, now, labels, path, sign_key)
        except PacketError as exc:
            await self._refuse(seq, codes.REPLAY, f"refused {what}: {exc.what}")
            return
        ack = records.Ack.make(self.d.identity.signing, core.packet_id, head.digest, core.sender, self.d.member, now)
        await self.send(ev.Ack(seq, core.packet_id, ack.raw))
        self.d.store.inbox_mark(head.digest, acked=True)
        if taken:
            log.info("received packet %s from %s", core.packet_id.hex(), core.sender)
        else:  # held (or erased) already: its acknowledgement was lost on the way, or the broker restarted
            log.info("packet %s from %s delivered again: acknowledged again", core.packet_id.hex(), core.sender)

    async def _refuse(
        self, seq: int, code: str, text: str, kind: str = "delivery", *, raise_alarm: bool = True
    ) -> None:
        """Refuse a pushed item: an alarm (unless it is routine), and a `refuse` so that it no longer holds one of
        the broker's push slots (it stays in the broker's mailbox). The alarm is named by the packet, not the seq,
        so the same refusal after each reconnection is one alarm."""
        if raise_alarm:
            self.d.alarm(kind, text)
        else:
            log.info("%s", text)
        await self.send(ev.Refuse(seq, code, _cut(text, L.MAX_TEXT)))

    # --- deliveries that wait for the log -------------------------------------------------------------------

    def _room_to_hold(self, sender: str, size: int) -> None:
        """Raise unless one more delivery of `size` bytes may wait for the trusted log to show `sender`'s key."""
        waiting = sum(h.head.header.ct_len for h in self.held.values())
        if len(self.held) >= HOLD_COUNT or waiting + size > HOLD_BYTES:
            known = self.d.follower.identity_keys(sender)
            why = (
                "its key for this packet is not in the trusted log yet"
                if known
                else "it is not a member in the verified log"
            )
            raise Refusal(
                codes.BAD_SIGNATURE if known else codes.UNKNOWN_MEMBER,
                f"sender {sender}: {why}, and {len(self.held)} deliveries ({waiting} bytes) already wait for it "
                "to catch up",
            )

    async def releaser(self) -> None:
        """Take held deliveries once the verified log shows their sender; refuse those that waited too long.
        Held files are this connection's: the broker pushes every unacknowledged item again on the next one."""
        try:
            while True:
                advanced = self.d.log_advanced
                with trio.move_on_after(HOLD_RECHECK):
                    await advanced.wait()
                await self._release(trio.current_time())
        finally:
            for held in self.held.values():
                held.path.unlink(missing_ok=True)
            self.held.clear()

    async def _release(self, now: float) -> None:
        for seq, held in list(self.held.items()):
            core = held.head.core
            try:
                key = self._signer_or_wait(held.head)
                waiting = key is None
            except Error:
                key, waiting = None, False  # refused below, with the reason
            if waiting and now - held.since < HOLD_TIME:
                continue
            del self.held[seq]
            try:
                if key is None and not self.d.follower.identity_keys(core.sender):
                    raise Refusal(
                        codes.UNKNOWN_MEMBER,
                        f"sender {core.sender} is still not a member in the verified log after {HOLD_TIME:g} s",
                    )
                if waiting:
                    # Its sender moved to new keys, and the checkpoint showing that still lacks the witness quorum.
                    # Checking it under the old key would call it forged: the alarm says what is really wrong.
                    raise Refusal(
                        codes.BAD_SIGNATURE,
                        f"sender {core.sender}'s new keys, which signed it, still wait for the witness quorum after "
                        f"{HOLD_TIME:g} s (the broker offers it again on the next connection)",
                    )
                if key is None:
                    key = self._signer(held.head)  # raises what is wrong with its signature
                self._check_expiry(held.head)
            except Error as exc:
                if isinstance(exc, StoreError):  # this node's fault, not the item's: end the connection
                    raise
                held.path.unlink(missing_ok=True)
                what = f"refused {held.what}: {exc.what}"
                await self._refuse(seq, refusal_code(exc), what, raise_alarm=worth_an_alarm(exc))
                continue
            await self._accept(seq, held.head, held.path, held.what, key)

    def _discard(self) -> None:
        if self._incoming is not None:
            self._close(self._incoming)
            self._incoming = None

    @staticmethod
    def _close(inc: Incoming) -> None:
        if inc.file is not None and not inc.file.closed:
            with contextlib.suppress(OSError):  # closing flushes, and may fail as the write before it did
                inc.file.close()
        if inc.path is not None:
            inc.path.unlink(missing_ok=True)

    async def _ack_forward(self, msg: ev.AckForward) -> None:
        try:
            keys = await self.sender_keys(msg.by)
            if not keys:
                raise SignatureError(f"{msg.by} is not a member in the verified log")
            try:
                ack = records.Ack.verified(msg.ack, keys[0])
            except SignatureError:
                verify = functools.partial(records.Ack.verified, msg.ack)
                # Signed with a replaced key, or with the new key of a rekey waiting for the quorum; else forged.
                if signers.first_signer([*keys[1:], *self.d.follower.pending_keys(msg.by)], verify) is None:
                    raise
                await self._from_the_log(msg.seq, "acknowledgement", msg.by)
                return
            if ack.recipient != msg.by or ack.sender != self.d.member or ack.packet_id != msg.id:
                raise SignatureError(f"acknowledgement by {msg.by} does not match the forwarded item")
            problem = self.d.ack_problem(ack)
            if problem is not None:
                raise PacketError(problem)
        except Error as exc:
            if isinstance(exc, StoreError):  # this node's fault, not the item's: end the connection
                raise
            await self._refuse(
                msg.seq, refusal_code(exc), f"forwarded acknowledgement seq {msg.seq} refused: {exc.what}", "ack"
            )
            return
        self.d.store.record_ack(ack.packet_id, ack.recipient, ack.raw)
        await self.send(ev.Seen(msg.seq))

    async def _retract_forward(self, msg: ev.RetractForward) -> None:
        try:
            # Forwarded, so logged: one an older broker took with a reason over today's limit is read all the same
            # (refused, it would come back at every connection and the packet would never show as retracted).
            if records.Retraction.parse(msg.retraction, logged=True)[0].sender != msg.by:
                raise SignatureError(f"retraction seq {msg.seq} is not signed by {msg.by}")
            keys = await self.sender_keys(msg.by)
            if not keys:
                raise SignatureError(f"{msg.by} is not a member in the verified log")
            try:
                retraction = records.Retraction.verified(msg.retraction, keys[0], logged=True)
            except SignatureError:
                verify = functools.partial(records.Retraction.verified, msg.retraction, logged=True)
                # Signed with a replaced key, or with the new key of a rekey waiting for the quorum; else forged.
                if signers.first_signer([*keys[1:], *self.d.follower.pending_keys(msg.by)], verify) is None:
                    raise
                await self._from_the_log(msg.seq, "retraction", msg.by)
                return
        except Error as exc:
            if isinstance(exc, StoreError):  # this node's fault, not the item's: end the connection
                raise
            await self._refuse(
                msg.seq, refusal_code(exc), f"forwarded retraction seq {msg.seq} refused: {exc.what}", "retract"
            )
            return
        row = self.d.store.inbox_get(retraction.digest)
        if row is not None and row.sender == retraction.sender:
            self.d.store.inbox_mark(retraction.digest, state="retracted", retraction=retraction.reason or "retracted")
        await self.send(ev.Seen(msg.seq))

    async def _from_the_log(self, seq: int, kind: str, by: str) -> None:
        """A forwarded notice signed with a key its signer has since replaced, or with the new key of a rekey that
        waits for the witness quorum: which key was in force where it is logged is for the log to say, so
        it is taken from there when the node folds it (follower.py), not on the broker's word; the push itself is
        done with."""
        log.info("forwarded %s seq %d by %s is not signed with its current key: taken from the log", kind, seq, by)
        await self.send(ev.Seen(seq))

    async def _cosign(self, msg: ev.CosignRequest) -> None:
        try:
            cp = await self.d.witness(self, msg.checkpoint, msg.old, msg.proof)
        except StoreError as exc:
            # This node could not record the tree (its disk): nothing is wrong with it. Said to the broker without
            # this machine's paths; then the connection ends, and the node waits before the next (NodeDaemon._lost).
            await self.send(ev.ErrorMessage(msg.rid, codes.INTERNAL, f"this node's {exc.told}"))
            raise
        except Error as exc:
            code = exc.code if isinstance(exc, ProtocolError | RemoteError) else codes.CONFLICT
            await self.send(ev.ErrorMessage(msg.rid, code, exc.what[:900]))
            return
        await self.send(ev.CosignResponse(msg.rid, cp))


def _delivery_name(head_bytes: bytes, head: Head | None = None) -> str:
    if head is not None:
        return f"packet {head.core.packet_id.hex()} from {head.core.sender} (header digest {head.digest.hex()[:16]})"
    return f"a delivery whose head does not parse (SHA-256 {hashlib.sha256(head_bytes).hexdigest()[:16]})"


def _cut(text: str, limit: int) -> str:
    """At most `limit` bytes of UTF-8, cut on a character boundary."""
    return text.encode()[:limit].decode(errors="ignore")


def digest_of(header: bytes) -> bytes:
    return hashlib.sha256(header).digest()
