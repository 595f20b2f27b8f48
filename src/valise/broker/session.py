"""One authenticated member connection at the broker: its reader, its pusher, its witness requests (wire.md).

A session reads frames and answers them, queues what it submits for the daemon's group commit (daemon.py), and
pushes the member's mailbox items in order within its flow-control window. Frames go out in batches: each write
is a TLS record and a system call, which cost more than most frames' own handling.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

import trio

from valise import encoding, records
from valise.broker import ratelimit, relay
from valise.broker.cosign import COSIGN_TIMEOUT, CosignRound
from valise.broker.mailbox import MailItem, PacketRow
from valise.broker.queued import NotQueued, Refused, Waiter
from valise.broker.ratelimit import quoted
from valise.broker.spool import CheckedUpload, InlineUpload, Upload
from valise.errors import (
    Error,
    LimitError,
    ProtocolError,
    StatementError,
    StatementSignatureError,
    StoreError,
)
from valise.packet import Head
from valise.packet.format import PREFIX_SIZE, SIGNATURE_SIZE, parse_prefix
from valise.policy import records as policy_records
from valise.policy.state import ACTIVE
from valise.tlog import cosignature, merkle, note
from valise.tlsstream import TLSSocketStream
from valise.wire import codes, liveness
from valise.wire import events as ev
from valise.wire.connection import NEED_DATA, READ_SIZE, Connection, Signal
from valise.wire.limits import MAX_ENTRIES, MAX_REQUESTS, MIN_FRAME, SUPPORTED_VERSIONS, choose_version
from valise.wire.state import Role

if TYPE_CHECKING:
    from valise.broker.daemon import BrokerDaemon


log = logging.getLogger("valise.broker")

FLUSH_AT = 256 * 1024  # write queued frames once this many bytes wait (a few TLS records' worth)
# Items a session keeps in memory for its pusher (Session.offer); a member that lets more than this wait unconfirmed
# is served from the mailbox store again, so an idle member's session holds no more than this.
FRESH_MAX = 1024
FRESH_BYTES = 4 * 1024 * 1024  # and at most this many bytes of kept packet bodies (small ones travel inline)
WRITE_TIMEOUT = 10.0  # a member that accepts no bytes for this long is disconnected (it reconnects and resumes)


class Session:
    """One authenticated member connection: a reader task and a pusher task in one nursery."""

    def __init__(self, daemon: BrokerDaemon, stream: TLSSocketStream, member: str, cert_der: bytes) -> None:
        self.d = daemon
        self.stream = stream
        self.member = member
        self.cert_der = cert_der  # the member's certificate it connected with (a rekey makes it stale)
        self.conn = Connection(Role.SERVER)
        self.ready = False
        self.auditor = False  # the hello's role was "auditor"
        self.held_back = 0  # times the reader waited for the member's share of the thread (fairshare.py)
        self._writing: trio.CancelScope | None = None  # the write under way (shielded: see flush)
        # Statements waiting for their handler: at most the requests a member may have open (wire.md, Limits).
        self._statements_in, self._statements_out = trio.open_memory_channel[ev.Statement](MAX_REQUESTS)
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
        self._uploads: dict[int, Upload | InlineUpload | CheckedUpload | None] = {}
        self._unknown_at: dict[int, int] = {}  # rid → `recorded` when submit-begin found its packet id unused
        self._pushed: dict[int, MailItem] = {}  # seq → item pushed and awaiting confirmation
        # Items committed to this member's mailbox since the pusher last found it had read everything there, each
        # with the broker's withdrawal count when it was committed; None while the pusher must query the store.
        self._fresh: deque[tuple[MailItem, int]] | None = None
        self._fresh_bytes = 0
        self._inflight: dict[tuple[str, bytes], tuple[bytes, Waiter, int]] = {}  # (sender, id) → (digest, waiter, at)
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
                    self._writing = scope
                    try:
                        await self.stream.send_all(data)
                    finally:
                        self._writing = None
                if scope.cancelled_caught:
                    raise trio.BrokenResourceError(f"the member read nothing for {WRITE_TIMEOUT:g} s")
            except BaseException as exc:
                self._write_failed = exc  # the frames in `data` are lost; so is the stream, for everyone
                self._end()
                raise
            self._written = upto

    async def send(self, msg: ev.Message) -> None:
        await self.flush(self.queue(msg))

    def abandon_write(self) -> None:
        """The broker is stopping and its grace period is over: a write to a member that reads nothing ends now,
        not WRITE_TIMEOUT later (the shield that keeps other tasks' cancellations from cutting it short kept the
        shutdown's out too, and a stop took up to twice its grace period: a concurrency review)."""
        if self._writing is not None:
            self._writing.deadline = -math.inf

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

    async def run(self, deadline: float, allowed: float, authenticated: Callable[[], object]) -> None:
        """Handshake by `deadline` (trio time: `allowed` seconds after the connection began), call
        `authenticated()`, then serve until the connection ends."""
        with trio.move_on_at(deadline) as scope:
            hello = await self._handshake()
        if scope.cancelled_caught:
            await self._fatal(codes.TIMEOUT, f"no hello within {allowed:g} s of connecting")
            return
        if hello is None:
            return
        authenticated()
        self.auditor = hello.role == "auditor"
        self.d.register(self)
        log.info("%s connected (%s)", self.member, hello.role)
        self.ready = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if not self.auditor:  # an auditor reads and witnesses: nothing is pushed to it
                    nursery.start_soon(self._pusher)
                nursery.start_soon(self._flusher)
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._cosign_on_connect, hello.seen)
                nursery.start_soon(self._statement_handler)
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
            log.info("%s disconnected (%s)", self.member, "auditor" if self.auditor else "node")
            self._say_what_was_held()
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
            wait = self.d.shares.pause(self.member, trio.current_time(), self.d.thread_busy, self.d.members_connected)
            if wait:  # this member uses more than its share of a busy thread: the others go first
                self.held_back += 1
                await trio.sleep(wait)
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
            self._warn("refused %s (seq %d): %s: %s", what, event.seq, quoted(event.code), quoted(event.message))
            self.d.refusals += 1
            self._room_freed()
        elif isinstance(event, ev.Retract):
            await self._retract(event)
        elif isinstance(event, ev.Statement):
            # Handled in order by their own task: one waits for the policy lock, which an operator command may
            # hold for a while, and the member's other frames (its pings among them) must not wait behind it (a
            # concurrency review). The wire's request limit bounds how many wait here.
            self._statements_in.send_nowait(event)
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
            self._warn("refused to cosign: %s %s", quoted(event.code), quoted(event.message), cosign=True)
            self._cosigns[event.rid][2].set()
        elif isinstance(event, ev.Ping):
            await self.send(ev.Pong(event.n))

    # --- submissions ----------------------------------------------------------------------------------------

    async def _submit_begin(self, msg: ev.SubmitBegin) -> None:
        with self._charged():
            head = relay.parse_submitted_head(msg.head, msg.size)
            if not isinstance(head, relay.Reject):
                # An orphan (logged, its body lost in a crash) is known too: its retry is a duplicate, not decided
                # again.
                held = self.d.mail.packet_by_id(self.member, head.core.packet_id)
                known = held or self.d.orphan_row(self.member, head.core.packet_id)
                outcome = relay.admit(self.d.policy, self.member, head, known, self.d.now(), self.d.settings.window)
        if isinstance(head, relay.Reject):
            self._uploads[msg.rid] = None
            await self.send(ev.ErrorMessage(msg.rid, head.code, head.message))
            return
        if isinstance(outcome, relay.Reject | relay.Denied):
            self._uploads[msg.rid] = None
            await self.send(self._refusal(outcome, head).answer(msg.rid))
        else:
            # Admitted or a duplicate: receive the ciphertext either way (the grammar needs the upload to end);
            # a duplicate is checked again against what was spooled and answered with its existing receipt.
            signed_by = self.d.policy.members[self.member].sign_key  # admit checked the signature with it
            try:
                # A packet the mailboxes hold (a retry after a lost receipt) is only checked, not kept again: its
                # mailbox items were made with its packet row. An orphan's retry brings the body the crash lost.
                keep = held is None or held.digest != head.digest
                self._uploads[msg.rid] = self.d.spool.begin(head, msg.head, signed_by, member=self.member, keep=keep)
            except StoreError as exc:  # the broker's disk, not the packet: this upload only, the session goes on
                self._uploads[msg.rid] = None
                await self.send(ev.ErrorMessage(msg.rid, codes.INTERNAL, str(exc)))
                return
            self._upload_moved[msg.rid] = began = trio.current_time()
            upload = self._uploads[msg.rid]
            if isinstance(upload, Upload):
                upload.began = began
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
                code = codes.INTERNAL if isinstance(exc, StoreError) else codes.HASH_MISMATCH
                await self.send(ev.ErrorMessage(msg.rid, code, str(exc)))
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
            # The verified bytes (small packets), or the spool file, made durable off the broker's thread.
            stored = await upload.finish_in_thread() if isinstance(upload, Upload) else upload.finish()
        except Error as exc:
            code = codes.INTERNAL if isinstance(exc, StoreError) else codes.HASH_MISMATCH
            await self.send(ev.ErrorMessage(msg.rid, code, str(exc)))
            return
        head = upload.head
        core = head.core
        # Unused at submit-begin and nothing recorded since: still unused (a query per packet saved).
        known = None if unknown_at == self.d.recorded else self.d.mail.packet_by_id(self.member, core.packet_id)
        if stored is None and (known is None or known.digest != head.digest):
            # Checked, not kept, as a packet the mailboxes held under this id and digest at submit-begin; their
            # packet rows are never deleted, so this cannot be. Not queued without its body, whatever happened.
            await self.send(
                ev.ErrorMessage(msg.rid, codes.INTERNAL, "the broker lost track of this packet: send it again")
            )
            return
        if known is None:
            assert stored is not None
            orphan = self.d.orphans.get((self.member, core.packet_id))
            if orphan is not None and orphan[1] != head.digest:
                what = f"packet id {core.packet_id.hex()} was already logged by {self.member} for another packet"
                await self._refuse_stored(msg.rid, head, what)
                return
            # One reading of the clock, for the decision and for the entry's `at`: the auditor replays the decision
            # at `at`, and two readings a second apart, on the second a grant ends, logged a relay it denies.
            now = self.d.now()
            if orphan is None:
                # Policy may have changed while the ciphertext streamed in: decide again, as of now (the signature
                # was checked at submit-begin, and is checked again only if the sender's key changed meanwhile).
                outcome = relay.admit(
                    self.d.policy,
                    self.member,
                    head,
                    None,
                    now,
                    self.d.settings.window,
                    signature_checked_with=upload.signed_by,
                )
                if isinstance(outcome, relay.Reject | relay.Denied):
                    self.d.spool.drop_unreferenced(self.d.mail, [head.digest])
                    await self.send(self._refusal(outcome, head).answer(msg.rid))
                    return
            body = stored if isinstance(stored, bytes) else None
            size = len(stored) if isinstance(stored, bytes) else stored.stat().st_size
            if orphan is not None:
                # Logged, so admitted, before a crash that lost its small body: queued at its existing index, with
                # nothing logged again and nothing decided again (the time window or the policy may have moved on
                # since; refusing now would contradict the log, which says the packet was relayed).
                index, at = orphan[0], orphan[2]
                row = PacketRow(head.digest, self.member, core.packet_id, index, core.expires, size, at)
                try:
                    with self.d.mail.batch():
                        self.d.mail.record_packet(row, core.recipients, body)
                        self.d.mail.remove_orphan(self.member, core.packet_id)
                except StoreError as exc:  # still an orphan: forgotten only once its row is in (a retry finds it)
                    what = f"the packet is logged, but the broker's {exc.told}: send it again"
                    await self.send(ev.ErrorMessage(msg.rid, codes.INTERNAL, what))
                    return
                self.d.orphans.pop((self.member, core.packet_id), None)
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
                    self._enqueue_packet(msg.rid, head, key, size, body, upload.signed_by, now)
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
        self,
        rid: int,
        head: Head,
        key: tuple[str, bytes],
        size: int,
        body: bytes | None,
        signed_by: bytes | None,
        at: int,
    ) -> None:
        """Append the packet's entry, dated `at`, the time it was decided at; queue it; receipt it once durable."""
        core = head.core

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
            refused = self._refusal(outcome, head)
            self.send_soon(refused.answer(rid))
            return refused

        def queue(index: int) -> None:
            row = PacketRow(head.digest, self.member, core.packet_id, index, core.expires, size, at)
            self.d.mail.record_packet(row, core.recipients, body)

        def durable(index: int) -> None:
            self._inflight.pop(key, None)
            log.info(
                "%s: packet %s to %s logged at %d", self.member, core.packet_id.hex(), ",".join(core.recipients), index
            )
            self.send_soon(self._packet_receipt(rid, head, index, at))

        def failed(exc: BaseException) -> None:
            self._inflight.pop(key, None)
            if isinstance(exc, NotQueued):
                # Logged: its retry is queued at its index (an orphan until then), from this spool file if large.
                what = f"the packet is logged, but the broker's {exc.told}: send it again"
                self.send_soon(ev.ErrorMessage(rid, codes.INTERNAL, what))
                return
            self.d.spool.drop_unreferenced(self.d.mail, [head.digest])  # nothing refers to it: not left behind
            self.send_soon(ev.ErrorMessage(rid, codes.INTERNAL, f"the log could not take the packet: {_told(exc)}"))

        entry = records.packet_entry(head.header.raw, head.signature, at)
        readers = (self.member, *core.recipients)
        try:
            waiter = self.d.enqueue(
                entry, queue, failed, traffic=True, on_durable=durable, readers=readers, recheck=recheck
            )
        except LimitError as exc:  # the log's queue is full (an overloaded broker): this packet, not the session
            # Nothing refers to its body: it goes now, not at the next start (a concurrency review's suspicion).
            self.d.spool.drop_unreferenced(self.d.mail, [head.digest])
            self.send_soon(ev.ErrorMessage(rid, codes.INTERNAL, f"the broker is overloaded: {exc.what}"))
            return
        self._inflight[key] = (head.digest, waiter, at)

    async def _receipt_after_commit(
        self, rid: int, head: Head, key: tuple[str, bytes], inflight: tuple[bytes, Waiter, int]
    ) -> None:
        _, waiter, at = inflight
        try:
            index = await waiter.result()
        except Refused as refused:  # decided on again at its commit, and refused: the same answer
            await self.send(refused.answer(rid))
            return
        except Error as exc:
            await self.send(ev.ErrorMessage(rid, codes.INTERNAL, f"the log could not take the packet: {_told(exc)}"))
            return
        finally:
            if self._inflight.get(key) is inflight:
                del self._inflight[key]
        await self.send(self._packet_receipt(rid, head, index, at))

    def _refusal(self, outcome: relay.Reject | relay.Denied, head: Head) -> Refused:
        """The answer to a packet refused (`-v` logs each, as it logs each packet relayed)."""
        refused = Refused.of(outcome, head.core.packet_id)
        if isinstance(outcome, relay.Denied):
            why = "; ".join(f"{to}: {reason}" for to, reason in outcome.reasons)
            log.info("%s: packet %s denied: %s", self.member, head.core.packet_id.hex(), why)
        else:
            log.info(
                "%s: packet %s refused (%s): %s", self.member, head.core.packet_id.hex(), outcome.code, outcome.message
            )
        return refused

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
            with self._charged():
                records.Ack.check(body, sig, member.sign_key, self.member)
        except Error as exc:
            raise ProtocolError(f"acknowledgement of seq {msg.seq} refused: {exc}", code=codes.BAD_SIGNATURE) from None
        pending = (self.member, item.digest)
        if pending in self.d.acks_pending:
            # Pushed again (a reconnection) while the first acknowledgement's batch commits: that one will take the
            # item out of the mailbox; logging and forwarding a second would say the packet arrived twice.
            return
        sender = ack.sender

        def done(index: int) -> None:
            self.d.ack_effects(ack, index)  # takes it out of acks_pending once the batch commits
            self.d.wake(sender)

        def failed(exc: BaseException) -> None:
            if isinstance(exc, NotQueued):
                # Logged: applied from the log once the store takes it (ack_effects drops it from acks_pending),
                # and until then one pushed again is not logged a second time.
                return
            # The item stays in the mailbox; a new connection pushes it again.
            self.d.acks_pending.discard(pending)
            self.close_soon(codes.INTERNAL, f"the log could not take the acknowledgement: {_told(exc)}")

        def recheck() -> Error | None:
            # A directory record (a rekey) landed ahead of it: it must still verify where it is logged.
            current = self.d.policy.members.get(self.member)
            try:
                records.Ack.check(body, sig, current.sign_key if current else bytes(32), self.member)
            except Error as exc:
                self.d.acks_pending.discard(pending)
                self.close_soon(codes.BAD_SIGNATURE, f"acknowledgement of seq {msg.seq} refused: {exc}")
                return exc
            return None

        # Not awaited: the reader goes on with the next frames while the batch commits, so a member's
        # acknowledgements share commits instead of taking one commit cycle each.
        self.d.enqueue(
            records.ack_entry(ack), done, failed, traffic=True, readers=(ack.sender, ack.recipient), recheck=recheck
        )
        self.d.acks_pending.add(pending)  # only once queued: an enqueue refused (a full queue) must not leave it

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
            records.Retraction.check(body, sig, member.sign_key, self.member)
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
        if (inflight := self.d.retracting.get(row.digest)) is not None:
            # Another retraction of it is being logged (a replaced connection's, say): its answer, not a second.
            waiter, at = inflight
            try:
                index = await waiter.result()
            except Refused as refused:
                await self.send(refused.answer(msg.rid))
                return
            except StoreError as exc:
                await self.send(ev.ErrorMessage(msg.rid, codes.INTERNAL, f"the retraction failed: {_told(exc)}"))
                return
            await self.send(self._retraction_receipt(msg, row.digest, index, at))
            return
        recipients = self.d.logged_header(row.log_index).core.recipients
        at = self.d.now()
        digest = row.digest

        # The in-flight record lives as long as the entry does, not as this task: a replaced connection's task is
        # cancelled while its retraction still waits for the commit, and a retry must find it.
        def done(index: int) -> None:
            self.d.withdrawals += 1
            self.d.retract_effects(retraction, recipients, index, at)  # out of `retracting` once it commits

        def failed(exc: BaseException) -> None:
            if not isinstance(exc, NotQueued):  # logged, it stays in flight until applied (retract_effects)
                self.d.retracting.pop(digest, None)

        def recheck() -> Error | None:
            # A directory record (a rekey) landed ahead of it: it must still verify where it is logged.
            current = self.d.policy.members.get(self.member)
            try:
                records.Retraction.check(body, sig, current.sign_key if current else bytes(32), self.member)
            except Error as exc:
                self.d.retracting.pop(digest, None)
                what = str(exc)
                return Refused(what, lambda rid: ev.ErrorMessage(rid, codes.BAD_SIGNATURE, what))
            return None

        readers = (self.member, *recipients)
        entry = records.retract_entry(retraction)
        waiter = self.d.enqueue(entry, done, failed, traffic=True, readers=readers, recheck=recheck)
        self.d.retracting[digest] = (waiter, at)
        try:
            index = await waiter.result()
        except Refused as refused:
            await self.send(refused.answer(msg.rid))
            return
        except StoreError as exc:  # the broker's disk: this request fails, the session goes on; ask again later
            await self.send(ev.ErrorMessage(msg.rid, codes.INTERNAL, f"the retraction failed: {_told(exc)}"))
            return
        for r in recipients:
            self.d.wake(r)
        await self.send(self._retraction_receipt(msg, row.digest, index, at))

    def _retraction_receipt(self, msg: ev.Retract, digest: bytes, index: int, at: int) -> ev.RetractResult:
        receipt = records.Receipt.make(self.d.identity.signing, self.d.origin, index, digest, msg.id, self.member, at)
        return ev.RetractResult(msg.rid, index, receipt.raw)

    async def _statement_handler(self) -> None:
        async for msg in self._statements_out:
            await self._statement(msg)

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
        wait = self.d.statement_budget.take(self.member, trio.current_time())
        if wait:  # before the signature and policy checks, which it bounds too (a refused one counts as well)
            what = (
                f"{self.member} has sent more statements than the broker takes ({ratelimit.BURST} at once, then "
                f"{ratelimit.RATE * 3600:g} an hour): send this one again in {math.ceil(wait)} s"
            )
            await self.send(ev.ErrorMessage(msg.rid, codes.REFUSED, what))
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
                except NotQueued as exc:  # logged and in force: only its readers wait for the mailboxes
                    index = exc.index
                except StoreError as exc:  # the broker's disk: this request fails, the session goes on
                    what = f"the statement could not be logged: {_told(exc)}"
                    refused = Refused(what, lambda rid: ev.ErrorMessage(rid, codes.INTERNAL, what))
        if refused is not None:
            await self.send(refused.answer(msg.rid))
            return
        receipt = records.Receipt.make(
            self.d.identity.signing, self.d.origin, index, record.id, bytes(16), self.member, self.d.now()
        )
        await self.send(ev.StatementResult(msg.rid, index, receipt.raw))

    async def _proof(self, rid: int, make: Callable[[], list[bytes]], answer: Any) -> None:
        try:
            with self._charged():
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
        with self._charged():
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
            ticket = self.queue(ev.Entries(msg.rid, msg.start, tuple(items), tuple(hashed), tuple(levels)))
        await self.flush(ticket)

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
                    self._abandon_upload(rid, f"no data for this upload for {liveness.STALL:g} s")
                elif (slow := self._too_slow(rid, now)) is not None:
                    self._abandon_upload(rid, slow)

    def _warn(self, text: str, *args: object, cosign: bool = False) -> None:
        """A warning this member's own frames caused, within its budget of log lines (ratelimit.LogBudget)."""
        budget = self.d.cosign_log_budget if cosign else self.d.log_budget
        held = budget.allow(self.member, trio.current_time())
        if held is None:
            return
        more = f" ({held} more such lines from {self.member} were not written)" if held else ""
        log.warning(f"%s {text}{more}", self.member, *args)

    @contextmanager
    def _charged(self) -> Iterator[None]:
        """Count the block's time against this member's share of the broker's thread (fairshare.py). Only for
        blocks that do not await, or the time other tasks ran meanwhile would be counted too: the work a request
        makes the broker do, which the member chooses (a head's recipients, a range of entries)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.d.shares.charge(self.member, time.perf_counter() - start, trio.current_time())

    def _say_what_was_held(self) -> None:
        """At the session's end: how many of its warnings were not written (within the budget, as they were), so
        that a member that went quiet after its budget ran out still leaves a trace of them; and how often its
        frames waited for its share of the thread."""
        if self.held_back:
            log.warning(
                "%s: its frames waited %d times for the others, using more than its share of the broker",
                self.member,
                self.held_back,
            )
        for budget in (self.d.log_budget, self.d.cosign_log_budget):
            held = budget.flush(self.member)
            if held:
                log.warning("%s: %d more warnings its frames caused were not written", self.member, held)

    def _too_slow(self, rid: int, now: float) -> str | None:
        """Why an upload to a file is given up for its rate (Settings.upload_floor), or None if it is not."""
        upload = self._uploads.get(rid)
        settings = self.d.settings
        if not isinstance(upload, Upload) or now - upload.began < settings.upload_grace:
            return None
        rate = upload.received / (now - upload.began)
        if rate >= settings.upload_floor:
            return None
        return (
            f"this upload averaged {rate:.0f} bytes/s, under the {settings.upload_floor} bytes/s the broker needs of "
            "a packet it stores on disk (the disk room it holds is given back)"
        )

    def _abandon_upload(self, rid: int, why: str) -> None:
        """Give up an upload that got no data for liveness.STALL seconds, or came too slowly: its file goes, its
        later chunks are discarded, and the member is told (it may submit the packet again)."""
        del self._upload_moved[rid]
        self._unknown_at.pop(rid, None)
        upload = self._uploads.get(rid)
        if upload is not None:
            upload.discard()
            self._uploads[rid] = None
            self.send_soon(ev.ErrorMessage(rid, codes.TIMEOUT, why))

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
                    # out) must not go out after all. Rare: a query only when some packet was withdrawn. One that
                    # expired and waits for the purger does not go out either: a node refuses it, and raised an
                    # alarm for it before it learnt that a packet expired a moment ago is routine.
                    gone = (item.expires is not None and item.expires <= self.d.now()) or (
                        self.d.withdrawals != withdrawals
                        and not self.d.mail.has_item(self.member, "packet", item.digest)
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
                    by = records.Retraction.parse(notice, logged=True)[0].sender
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
            taken = [fresh.popleft() for _ in range(min(room, len(fresh)))]
            self._fresh_bytes -= sum(len(item.body or b"") for item, _ in taken)
            return taken
        withdrawals = self.d.withdrawals
        items = self.d.mail.pending(self.member, self._last_seq, limit=room)
        if len(items) < room:
            # Everything in the mailbox is read: from here on, what commits for this member is handed over
            # (offer), and nothing is committed between this query and this line (both are in this one step).
            self._fresh = deque()
            self._fresh_bytes = 0
        return [(item, withdrawals) for item in items]

    def offer(self, item: MailItem) -> None:
        """An item just committed to this member's mailbox. Kept for the pusher if it has read everything before
        it; past FRESH_MAX items or FRESH_BYTES of bodies waiting (a member that does not confirm), the pusher goes
        back to querying."""
        fresh = self._fresh
        if fresh is not None:
            size = len(item.body or b"")
            if len(fresh) < FRESH_MAX and self._fresh_bytes + size <= FRESH_BYTES:
                fresh.append((item, self.d.withdrawals))
                self._fresh_bytes += size
            else:  # a member that confirms nothing holds no more than this here; the store keeps the rest
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
        if latest is not None and seen > latest.size:
            self.d.member_is_ahead(self.member, seen, latest.size)
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
            self._warn("its cosignature is refused: %s", quoted(str(exc)), cosign=True)
        finally:
            done.set()


def _told(exc: BaseException) -> str:
    """A failure as a member is told it: a store failure's cause, never the broker's paths."""
    return f"the broker's {exc.told}" if isinstance(exc, StoreError) else str(exc)
