"""The control socket's operations (specs/protocol.md, "Control channel"): what `valise send|inbox|read|...` ask.

One request per connection: a map with "op", maybe data frames, then one reply map ("ok", and on failure
"error" and "code", the CLI's exit code). `read` streams the plaintext as data frames before its reply.
Sealing and opening run in a worker thread (they are CPU-bound and synchronous); the payload and the plaintext
flow between that thread and the socket chunk by chunk, so neither is ever written to disk in the clear nor
held whole in memory.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, BinaryIO, cast

import trio
import trio.lowlevel

from valise import encoding, identity, packet, records
from valise.errors import DeniedError, Error, LimitError, StoreError, UsageError, WireError
from valise.node import control, erasing, receipts, report, resealing
from valise.node.daemon import NodeDaemon
from valise.node.report import one as _one
from valise.node.store import OutboxRow, writing
from valise.packet import MAX_RECIPIENTS
from valise.policy import records as policy_records
from valise.policy.records import GROUP_PREFIX
from valise.policy.state import ACTIVE, SUSPENDED, Statement
from valise.wire import codes
from valise.wire import events as ev

log = logging.getLogger("valise.node")

MAX_WAIT = 3600.0
# A local client that sends nothing, or takes nothing we send, for this long is dropped: it would otherwise hold
# a task and, in `send` and `read`, one of the worker threads that every `send` and `read` shares.
CONTROL_IDLE = 60.0
# And a payload must arrive at least this fast on average once CONTROL_IDLE has passed: a client that trickles a
# byte every few seconds would otherwise hold a worker thread for good, and 40 of them every `send` and `read`.
CONTROL_MIN_RATE = 64 * 1024
# How long a `send` waiting for the broker's answer, cut off by the daemon's stop, may take to say it is queued.
STOPPING_REPLY = 1.0


async def serve_control(daemon: NodeDaemon, listener: trio.SocketListener) -> None:
    await control.serve(listener, functools.partial(_handle, daemon))


async def _handle(daemon: NodeDaemon, stream: trio.SocketStream) -> None:
    """One control connection. Whatever goes wrong answers this client only: the daemon, its other clients and
    its broker connection carry on (a request that raised anything but an Error once stopped them all)."""
    async with stream:
        reader = control.MessageReader(stream, idle=CONTROL_IDLE, min_rate=CONTROL_MIN_RATE)
        op: object = None
        try:
            request = await reader.next()
            if request is None:
                return
            op = request.get("op")
            handler = OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise UsageError(f"unknown control operation {str(op)[:40]!r}")
            reply = await handler(daemon, request, reader, stream)
        except control.PeerStalled as exc:  # our last frame may be cut short: an answer after it would be garbage
            log.info("control operation %.40r: %s", op, exc)
            return
        except Error as exc:
            reply = {"ok": False, "error": str(exc), "code": exc.exit_code}
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception as exc:
            log.exception("control operation %.40r failed", op)
            reply = {"ok": False, "error": f"internal error in {str(op)[:40]!r}: {type(exc).__name__}", "code": 1}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            try:
                await control.send_msg(stream, reply, within=CONTROL_IDLE)
            except LimitError as exc:  # an answer over the frame limit: say so instead of vanishing
                log.error("control operation %.40r: %s", op, exc)
                error = {"ok": False, "error": f"the answer is too large: {exc}", "code": 1}
                await control.send_msg(stream, error, within=CONTROL_IDLE)
            except WireError as exc:
                log.info("control operation %.40r: %s", op, exc)


def _text(request: dict[str, Any], name: str, default: str | None = None) -> str:
    value = request.get(name, default)
    if not isinstance(value, str):
        raise UsageError(f"control request field {name!r} must be text")
    return value


MAX_INT = 2**63 - 1  # SQLite's integers, and every size and time the node handles, fit below this


def _opt(request: dict[str, Any], name: str, kind: type) -> Any:
    value = request.get(name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise UsageError(f"control request field {name!r} must be {kind.__name__}")
    if isinstance(value, int) and not 0 <= value <= MAX_INT:  # msgpack carries up to 2**64-1, and negatives
        raise UsageError(f"control request field {name!r} is {value}, outside 0..{MAX_INT}")
    return value


# --- recipients and keys, from the verified log only -----------------------------------------------------------


def bundle_of(daemon: NodeDaemon, member_id: str, *, removed_too: bool = False) -> identity.PublicBundle | None:
    """A member's keys as of the daemon's verified log (report.member_bundle)."""
    return report.member_bundle(daemon.follower.policy, member_id, removed_too=removed_too)


def expand(daemon: NodeDaemon, names: list[str]) -> tuple[list[str], list[str]]:
    """Member ids for `names` (ids and group:NAME); and the names the verified log does not know."""
    policy = daemon.follower.policy
    out: set[str] = set()
    unknown: list[str] = []
    for name in names:
        if name.startswith(GROUP_PREFIX):
            group = policy.groups.get(name[len(GROUP_PREFIX) :]) if policy else None
            if group is None:
                unknown.append(name)
            else:
                out |= group.members - {daemon.member}
        elif bundle_of(daemon, name) is None:
            unknown.append(name)
        else:
            out.add(name)
    return sorted(out), unknown


async def _recipients(daemon: NodeDaemon, names: list[str]) -> list[identity.PublicBundle]:
    if daemon.member in names:  # named directly (a group of others may include us: we are dropped from it)
        raise UsageError(f"{daemon.member} cannot send to itself", hint="name the recipients")
    ids, unknown = expand(daemon, names)
    if unknown and daemon.session is not None:
        await daemon.try_sync(daemon.session)  # maybe the log moved on since the last poll
        ids, unknown = expand(daemon, names)
    if unknown and daemon.storage_failures and daemon.session is None:
        # Not followed because this node cannot record the log (or the broker failed): say that, not "unknown".
        raise Error(f"not in the verified directory yet: {', '.join(unknown)}; {daemon.last_error}")
    if unknown:
        raise UsageError(
            f"not in the verified directory: {', '.join(unknown)}",
            hint="check the id, or wait until the node has followed the log",
        )
    if not ids:
        raise UsageError("no recipients left (a group of only this member?)")
    return [b for b in (bundle_of(daemon, i) for i in ids) if b is not None]


# --- send ------------------------------------------------------------------------------------------------------


class _Pull(io.RawIOBase):
    """A file-like object a worker thread reads, pulling data frames from the control socket."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    async def _next(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return b""

    def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            self._buf = trio.from_thread.run(self._next)
            self._eof = not self._buf
        if n < 0:
            n = len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def _check_may_send(daemon: NodeDaemon) -> None:
    """Refuse at once when the verified log shows this member suspended or removed: the broker refuses its
    certificate, so a packet queued now would wait, with `send` saying "queued", until it expires."""
    policy = daemon.follower.policy
    me = policy.members.get(daemon.member) if policy is not None else None
    if me is not None and me.status != ACTIVE:
        raise UsageError(
            f"{daemon.member} is {me.status} in the verified log ({me.reason}): the broker takes nothing from it",
            hint="ask the broker's operator (`valise broker member reinstate`)" if me.status == SUSPENDED else None,
        )


async def op_send(
    daemon: NodeDaemon, request: dict[str, Any], reader: control.MessageReader, stream: trio.SocketStream
) -> dict[str, Any]:
    to = request.get("to")
    if not isinstance(to, list) or not to or not all(isinstance(t, str) for t in to):
        raise UsageError("send needs 'to': a list of member ids or group:NAME")
    # Counted before any is looked up: each lookup reads the member's keys from the log, and 200,000 names (a
    # 0.8 MB request) once held the daemon's event loop for 45 s.
    to = list(dict.fromkeys(to))
    if len(to) > MAX_RECIPIENTS:
        raise LimitError(f"{len(to)} recipients named; a packet has at most {MAX_RECIPIENTS}")
    size = _opt(request, "size", int)
    if size is None or size < 0:
        raise UsageError("send needs the payload 'size'")
    categories = request.get("categories") or []
    if not isinstance(categories, list):
        raise UsageError("'categories' must be a list")
    wait = float(_opt(request, "wait", int) or 0)
    if wait > MAX_WAIT:
        raise LimitError(f"wait of {wait} s is over {MAX_WAIT}")
    _check_may_send(daemon)
    recipients = await _recipients(daemon, to)
    now = daemon.now()
    spool = daemon.store.tmp_path(f"send-{daemon.random(8).hex()}.part")
    async with contextlib.aclosing(reader.data()) as chunks:
        pull = _Pull(chunks)
        try:
            tlp = _text(request, "tlp")
            expires_at = _opt(request, "expires", int)
            operation = _opt(request, "operation", str)
            content_type = _opt(request, "content_type", str)

            def work() -> tuple[packet.Sealed, int]:
                with writing("the packet being sealed", spool), open(spool, "w+b") as out:
                    sealed = packet.seal(
                        cast(BinaryIO, pull),
                        out,
                        sender=daemon.identity,
                        recipients=recipients,
                        tlp=tlp,
                        now=now,
                        random=daemon.random,
                        expires=expires_at,
                        categories=categories,
                        operation=operation,
                        content_type=content_type,
                        payload_size=size,
                    )
                    if pull.read(1):  # also consumes the `end` frame
                        raise UsageError(f"payload is longer than the {size} bytes announced")
                    out.seek(0)
                    return sealed, packet.read_head(out).core.expires

            sealed, expires = await trio.to_thread.run_sync(work)
            ids = [r.member_id for r in recipients]
            # K, kept (sealed to this member) while the packet is queued: if the broker is away for longer than
            # its time window, the packet is sealed afresh rather than given up (node/resealing.py).
            kept = resealing.keep_key(daemon.identity, sealed.packet_id, sealed.content_key, daemon.random)
            daemon.store.enqueue_file(sealed.packet_id, sealed.header_digest, ids, now, expires, spool, kept)
        finally:
            spool.unlink(missing_ok=True)
    daemon.wake_outbox()
    pid, pid_bytes = sealed.packet_id.hex(), sealed.packet_id
    log.info("queued packet %s for %s", pid, ", ".join(ids))
    try:
        row = await daemon.wait_outcome(sealed.packet_id, wait) if wait > 0 else daemon.store.outbox_get(pid_bytes)
    except trio.Cancelled:
        # The daemon is stopping. The packet is queued: say so, with its id, or the client reports a failure and a
        # user who sends again sends it twice (a concurrency review). Briefly: the daemon has a grace period.
        with trio.CancelScope(shield=True) as scope, contextlib.suppress(Error, trio.BrokenResourceError):
            scope.deadline = trio.current_time() + STOPPING_REPLY
            queued = daemon.store.outbox_get(pid_bytes)
            if queued is not None:
                await control.send_msg(stream, {**outcome(queued, connected=False), "stopping": True})
        raise
    assert row is not None
    return outcome(row, connected=daemon.session is not None, last_error=daemon.last_error)


def outcome(row: OutboxRow, *, connected: bool, last_error: str | None = None) -> dict[str, Any]:
    """The reply for a packet's current state (denials carry exit code 3, as DeniedError). A packet queued while
    the node is not connected carries why it is not (a suspended member's broker refuses its certificate, and
    "unreachable" would hide that)."""
    base: dict[str, Any] = {"id": row.packet_id.hex(), "to": row.recipients, "state": row.state, "connected": connected}
    if row.state == "receipted":
        return {"ok": True, **base, "index": row.log_index}
    if row.state == "queued":
        return {"ok": True, **base, **({} if connected or not last_error else {"last_error": last_error})}
    detail = _json(row.outcome)
    if row.state == "denied":
        error = detail.get("error") if isinstance(detail, dict) else None
        if isinstance(error, dict):
            msg = f"refused by the broker ({error.get('code')}): {error.get('message')}"
            return {"ok": False, **base, "error": msg, "code": DeniedError.exit_code, "refused": error}
        cancelled = detail.get("cancelled") if isinstance(detail, dict) else None
        if isinstance(cancelled, str):
            msg = f"cancelled by its sender before it was sent: {cancelled}"
            return {"ok": False, **base, "error": msg, "code": DeniedError.exit_code, "cancelled": cancelled}
        reasons = {str(k): str(v) for k, v in (detail or {}).items()}
        msg = "denied: " + "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        return {"ok": False, **base, "error": msg, "code": DeniedError.exit_code, "reasons": reasons}
    return {"ok": False, **base, "error": f"packet {row.state}", "code": 1}


def _json(text: str | None) -> Any:
    return json.loads(text) if text else None


# --- inbox, read, retract, status, statement ----------------------------------------------------------------------


# An answer's items stop at this many encoded bytes (under control.MAX_FRAME with room to spare): an inbox of any
# size, or with senders' labels of any length, is listed page by page instead of in one frame too large to send.
PAGE_BYTES = 256 * 1024
PAGE_ROWS = 500


async def op_inbox(daemon: NodeDaemon, request: dict[str, Any], *_: Any) -> dict[str, Any]:
    """One page of the inbox after position `after` (0: the start); `next` is where the next page starts, or
    None at the end."""
    after = _opt(request, "after", int) or 0
    rows = daemon.store.inbox_page(after, PAGE_ROWS)
    return _page([(position, report.inbox_item(row)) for position, row in rows], after)


async def op_outbox(daemon: NodeDaemon, request: dict[str, Any], *_: Any) -> dict[str, Any]:
    """One page of the outbox after position `after`, as op_inbox pages the inbox."""
    after = _opt(request, "after", int) or 0
    return _page(report.outbox_items(daemon.store, after, PAGE_ROWS), after)


def _page(rows: list[tuple[int, dict[str, Any]]], after: int) -> dict[str, Any]:
    """As many of `rows` (up to PAGE_ROWS read) as fit PAGE_BYTES, and where the next page starts."""
    items: list[dict[str, Any]] = []
    size = 0
    for position, item in rows:
        size += len(encoding.pack(item))
        if items and size > PAGE_BYTES:
            return {"ok": True, "items": items, "next": after}
        items.append(item)
        after = position
    return {"ok": True, "items": items, "next": after if len(rows) == PAGE_ROWS else None}


async def op_read(
    daemon: NodeDaemon, request: dict[str, Any], reader: control.MessageReader, stream: trio.SocketStream
) -> dict[str, Any]:
    prefix = _text(request, "id")
    sender = _opt(request, "from", str)
    row = report.inbox_one(daemon.store.inbox_find(prefix, sender), prefix, sender)
    report.check_readable(row, force=bool(request.get("force")))
    # A sender removed since still signed this while a member: the broker takes packets from active members only,
    # and the node acknowledged it. It is readable, with the removal said beside it (it may be why it was removed).
    sender = report.signer_bundle(daemon.follower.policy, row, lambda: report.inbox_head(daemon.store, row))
    policy = daemon.follower.policy
    member = policy.members.get(row.sender) if policy else None
    removed = None if member is None or member.status != "removed" else (member.reason or "no reason given")

    class Push(io.RawIOBase):
        def __init__(self) -> None:
            super().__init__()
            # A client that takes a frame now and then would hold this worker thread for good (as for `send`).
            self.floor = control.RateFloor(CONTROL_MIN_RATE, CONTROL_IDLE, time.monotonic())

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            chunk = bytes(data)
            for i in range(0, len(chunk), control.CHUNK):
                frame = {"op": "data", "data": chunk[i : i + control.CHUNK]}
                trio.from_thread.run(functools.partial(control.send_msg, stream, frame, within=CONTROL_IDLE))
            self.floor.add(len(chunk), time.monotonic(), what="took")
            return len(chunk)

    def work() -> packet.Opened:
        with daemon.store.open_inbox_packet(row.digest) as src:
            return report.open_received(src, cast(BinaryIO, Push()), me=daemon.identity, sender=sender)

    opened = await trio.to_thread.run_sync(work)
    if row.state == "new":
        try:
            daemon.store.inbox_mark(row.digest, state="read")
        except StoreError as exc:  # the plaintext went out: a full disk only costs the mark
            log.warning("packet %s was read, and the store cannot mark it so: %s", row.packet_id.hex(), exc)
    reply = {"ok": True, "packet": opened.to_json(), "state": row.state, "retraction": row.retraction}
    return reply | ({"sender_removed": removed} if removed is not None else {})


def _session(daemon: NodeDaemon) -> Any:
    if daemon.session is None:
        raise Error("the broker is unreachable right now", hint="try again when `valise status` says connected")
    return daemon.session


async def op_retract(daemon: NodeDaemon, request: dict[str, Any], *_: Any) -> dict[str, Any]:
    prefix = _text(request, "id").lower()
    rows = daemon.store.outbox_find(prefix)
    if not rows and len(prefix) >= 4 and daemon.store.inbox_find(prefix):
        raise UsageError(f"packet {prefix} is one this member received: only its sender can retract it")
    row: OutboxRow = _one(rows, prefix, "outbox")
    reason = _text(request, "reason", "")
    if row.state == "queued":
        # Never sent (the broker was unreachable, say): withdrawn here, so the wrong file never leaves. One whose
        # submission was tried may be in the broker's log with its receipt lost: that one must be retracted there.
        sent = row.packet_id in daemon.submitting or row.packet_id in daemon.unrecorded
        if not sent and daemon.store.outbox_cancelled(row.packet_id, reason):
            daemon.settled()
            return {"ok": True, "id": row.packet_id.hex(), "cancelled": True}
        raise UsageError(
            f"packet {row.packet_id.hex()} is being sent, or a submission of it was tried and may have reached the "
            "broker: retract it once it is receipted (`valise send` waits for that; `valise status` shows it)"
        )
    if row.state != "receipted":
        raise UsageError(f"packet {row.packet_id.hex()} is {row.state}; only a relayed packet can be retracted")
    done = daemon.store.get(f"retracted:{row.packet_id.hex()}")
    if done is not None:  # the broker would answer with the first retraction's index too; say it is a repeat
        return {"ok": True, "id": row.packet_id.hex(), "index": int.from_bytes(done, "big"), "already": True}
    retraction = records.Retraction.make(
        daemon.identity.signing, row.packet_id, row.digest, daemon.member, reason, daemon.now()
    )
    answer = await _session(daemon).request(lambda rid: ev.Retract(rid, row.packet_id, retraction.raw))
    if isinstance(answer, ev.RetractResult):
        what = f"the retraction of packet {row.packet_id.hex()}"
        if (bad := _bad_receipt(daemon, answer, row.digest, row.packet_id, what)) is not None:
            return bad
        daemon.store.put(f"retracted:{row.packet_id.hex()}", answer.index.to_bytes(8, "big"))
        return {"ok": True, "id": row.packet_id.hex(), "index": answer.index}
    return _refused(answer)


def _bad_receipt(
    daemon: NodeDaemon, answer: ev.RetractResult | ev.StatementResult, digest: bytes, packet_id: bytes, what: str
) -> dict[str, Any] | None:
    """The broker's receipt for a retraction or a statement, checked as a packet's is: its signature, and that it
    names this log, this member, the index answered and the object sent (a fuzzing review found these receipts
    were never read). None if it holds; else an alarm, with the receipt as evidence, and the error reply."""
    try:
        records.Receipt.verified_for(
            answer.receipt, daemon.broker.sign_key, origin=daemon.follower.origin, index=answer.index,
            digest=digest, packet_id=packet_id, sender=daemon.member,
        )  # fmt: skip
    except Error as exc:
        daemon.alarm("receipt", f"bad receipt for {what}: {exc.what}", answer.receipt)
        return {"ok": False, "error": f"the broker's receipt for {what} is bad: {exc.what}", "code": 1}
    return None


def _refused(answer: ev.Message) -> dict[str, Any]:
    if isinstance(answer, ev.ErrorMessage):
        code = "" if answer.code == codes.REFUSED else f" ({answer.code})"  # "refused (refused)" says it twice
        return {"ok": False, "error": f"the broker refused{code}: {answer.message}", "code": 1}
    return {"ok": False, "error": f"unexpected answer {answer.TYPE}", "code": 1}


async def op_status(daemon: NodeDaemon, request: dict[str, Any], *_: Any) -> dict[str, Any]:
    live = report.Live(daemon.session is not None, daemon.last_error, daemon.quorum_wait, daemon.holding())
    quorum = daemon.quorum.quorum if daemon.quorum else None
    return report.status(daemon.config, daemon.store, daemon.follower, quorum, live)


def build_statement(daemon: NodeDaemon, spec: dict[str, Any]) -> bytes:
    """Sign a grant, accept or revoke described by `spec` ({"kind", and the fields of policy.records})."""
    kind = spec.get("kind")
    key = daemon.identity.signing
    origin, author, created = daemon.follower.origin, daemon.member, daemon.now()
    try:
        if kind == "grant":
            return policy_records.grant(
                key, origin=origin, author=author, created=created, to=spec["to"], tlp=spec["tlp"],
                categories=spec.get("categories"), valid_from=spec.get("valid_from"),
                valid_until=spec.get("valid_until"), max_size=spec.get("max_size"),
            )  # fmt: skip
        if kind == "accept":
            return policy_records.accept(
                key, origin=origin, author=author, created=created, source=spec["from"], tlp=spec["tlp"],
                categories=spec.get("categories"), valid_from=spec.get("valid_from"),
                valid_until=spec.get("valid_until"),
            )  # fmt: skip
        if kind == "revoke":
            target = _own_statement(daemon, str(spec["statement"]).lower())
            return policy_records.revoke(key, origin=origin, author=author, created=created, statement=target)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:  # a field missing or of the wrong type
        raise UsageError(f"statement {str(kind)[:20]} lacks or has a bad field: {exc}") from None
    raise UsageError(f"statement kind {str(kind)[:20]!r} is not grant, accept or revoke")


def _own_statement(daemon: NodeDaemon, prefix: str) -> bytes:
    """The id of this member's statement that `prefix` (hex) names. A whole id is taken as it is: the broker judges
    it, and revoking must not wait for this node's verified log to show a statement just made (a checkpoint, or a
    witness quorum, away). A prefix is looked up in that log and among the statements this daemon sent since."""
    if len(prefix) == 64:
        return bytes.fromhex(prefix)
    policy = daemon.follower.policy
    known = {s.id for s in (policy.statements.values() if policy else ()) if s.author == daemon.member}
    known |= set(daemon.sent_statements)
    revoked = set(policy.revoked) if policy else set()
    revoked |= {r.body["statement"] for r in daemon.sent_statements.values() if r.kind == policy_records.REVOKE}
    kinds = {s.id: s.kind for s in (policy.statements.values() if policy else ())}
    kinds.update({i: r.kind for i, r in daemon.sent_statements.items()})
    mine = [i for i in known if i.hex().startswith(prefix) and kinds.get(i) != policy_records.REVOKE]
    live = [i for i in mine if i not in revoked]
    if len(live) == 1:
        return live[0]
    if not live and mine:
        raise UsageError(f"statement {prefix} is revoked already")
    if not live:
        raise UsageError(
            f"no statement of {daemon.member} in force starts with {prefix} in this node's verified log "
            f"(size {daemon.follower.trusted_size})",
            hint="see policy show --node; a statement made elsewhere just now may not be in it yet: give its whole id",
        )
    raise UsageError(f"{len(live)} statements of {daemon.member} start with {prefix}", hint="give more digits")


async def op_statement(daemon: NodeDaemon, request: dict[str, Any], *_: Any) -> dict[str, Any]:
    raw = request.get("statement")
    spec = request.get("build")
    if isinstance(spec, dict):
        raw = build_statement(daemon, spec)
    if not isinstance(raw, bytes):
        raise UsageError("statement needs 'statement' (signed bytes) or 'build' (a description to sign)")
    record = policy_records.parse_policy(raw)
    if record.type != policy_records.STMT or record.body.get("author") != daemon.member:
        raise UsageError(f"only this member's own statements can be sent through its node ({daemon.member})")
    same = _same_terms(daemon, record)
    if same and not request.get("again"):
        # A re-run (after a timeout, say) would leave two statements, and revoking one would leave the other in
        # force: a member who "revoked the grant" would go on sharing.
        raise UsageError(
            f"an identical {record.kind} is already in force: {', '.join(same)}",
            hint="revoke it, or pass --again to sign another one all the same",
        )
    answer = await _session(daemon).request(lambda rid: ev.Statement(rid, raw))
    if isinstance(answer, ev.StatementResult):
        what = f"{record.kind} statement {record.id.hex()}"
        if (bad := _bad_receipt(daemon, answer, record.id, bytes(16), what)) is not None:
            return bad
        daemon.remember_statement(record)
        reply: dict[str, Any] = {"ok": True, "index": answer.index, "statement": record.id.hex()}
        if record.kind == policy_records.REVOKE:
            reply["still_in_force"] = _still_in_force(daemon, record.body["statement"])
        return reply
    return _refused(answer)


def _live(daemon: NodeDaemon, kind: str, counterpart: str) -> list[Statement]:
    policy = daemon.follower.policy
    if policy is None:
        return []
    table = policy.grants if kind == policy_records.GRANT else policy.accepts
    return [s for s in table.get(daemon.member, {}).get(counterpart, []) if s.id not in policy.revoked]


def _same_terms(daemon: NodeDaemon, record: policy_records.Record) -> list[str]:
    """This member's statements in force (as of the verified log) that say exactly what `record` says."""
    if record.kind not in (policy_records.GRANT, policy_records.ACCEPT):
        return []
    counterpart = record.body["to" if record.kind == policy_records.GRANT else "from"]

    def terms(body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k != "created"}

    mine = terms(record.body)
    found = []
    for stmt in _live(daemon, record.kind, counterpart):
        other = policy_records.parse_policy(stmt.entry)
        if terms(other.body) == mine:
            found.append(f"{stmt.short} (log position {stmt.position})")
    # And those this daemon sent that its verified log does not show yet: the retry after a timeout, above all.
    policy = daemon.follower.policy
    revoked = {r.body["statement"] for r in daemon.sent_statements.values() if r.kind == policy_records.REVOKE}
    for sid, sent in daemon.sent_statements.items():
        pending = policy is None or sid not in policy.statements
        if pending and sid not in revoked and sent.kind == record.kind and terms(sent.body) == mine:
            found.append(f"{policy_records.short(sid)} (sent, not yet in this node's verified log)")
    return found


def _still_in_force(daemon: NodeDaemon, revoked: bytes) -> list[str]:
    """After revoking `revoked`: this member's other statements of its kind for the same counterpart, which go on
    allowing what it allowed (or some of it)."""
    policy = daemon.follower.policy
    stmt = policy.statements.get(revoked) if policy else None
    if stmt is None:
        return []
    return [
        f"{s.short} (log position {s.position})" for s in _live(daemon, stmt.kind, stmt.counterpart) if s.id != revoked
    ]


async def op_export_receipt(daemon: NodeDaemon, request: dict[str, Any], *_: Any) -> dict[str, Any]:
    """A tlog-proof bundle that the packet is in the log (node/receipts.py)."""
    prefix = _text(request, "id").lower()
    rows = daemon.store.outbox_find(prefix)
    row: OutboxRow = _one(rows, prefix, "outbox")
    done = await receipts.export_receipt(daemon, row)
    return {
        "ok": True,
        "id": row.packet_id.hex(),
        "index": row.log_index,
        "checkpoint_size": done.size,
        "cosigners": done.cosigners,
        "unchecked_cosigners": done.unchecked_cosigners,
        "bundle": done.bundle,
        "entry": done.entry,
        "carried": done.carried,
        "vkey": daemon.follower.verifier.vkey(),
    }


async def op_erase(daemon: NodeDaemon, request: dict[str, Any], *_: Any) -> dict[str, Any]:
    ids = request.get("ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise UsageError("control request field 'ids' must be a list of packet ids")
    rows = erasing.select(
        daemon.store,
        ids,
        before=_opt(request, "before", int),
        retracted=bool(request.get("retracted")),
        sender=_opt(request, "from", str),
    )
    answer, digests = erasing.plan(rows, dry_run=bool(request.get("dry_run")))
    for chunk in erasing.chunks(digests):
        daemon.store.inbox_erase(chunk, daemon.now())
        await trio.lowlevel.checkpoint()  # the broker connection and other control clients run between chunks
    return answer


OPS = {
    "erase": op_erase,
    "send": op_send,
    "inbox": op_inbox,
    "outbox": op_outbox,
    "read": op_read,
    "retract": op_retract,
    "status": op_status,
    "statement": op_statement,
    "export-receipt": op_export_receipt,
}
