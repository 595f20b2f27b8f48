"""Messages ↔ frame payloads: canonical msgpack maps with a `t` key, checked field by field (specs/wire.md).

Decoding is strict in the age / x/mod/sumdb sense: a payload is accepted only if it is canonical msgpack, a map,
with exactly the fields of its type, each of the right msgpack type and within its range. Encoding runs the very
same checks on what it is about to send, so this side never emits a frame its peer must refuse.

Checks here are stateless (they need no connection); limits that depend on what the peer announced, and the
order of messages, are the state machine's job (state.py). Every failure is a LocalProtocolError with code
`bad-encoding`, `unknown-type` or `bad-field`; the connection turns it into a RemoteProtocolError when the
bytes came from the peer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from valise import encoding
from valise.errors import EncodingError, LocalProtocolError
from valise.identity import MEMBER_ID
from valise.wire import codes, events
from valise.wire import limits as L

Check = Callable[[Any, str], Any]


def _bad(where: str, rule: str) -> LocalProtocolError:
    return LocalProtocolError(f"{where} {rule}", code=codes.BAD_FIELD)


def _uint(maximum: int) -> Check:
    def check(value: Any, where: str) -> int:
        # `type(...) is int` also refuses bool, which msgpack keeps distinct from integers.
        if type(value) is not int or not 0 <= value <= maximum:
            raise _bad(where, f"must be an integer in 0..{maximum}")
        return value

    return check


def _blob(low: int, high: int) -> Check:
    def check(value: Any, where: str) -> bytes:
        if type(value) is not bytes:
            raise _bad(where, "must be bytes (msgpack bin)")
        if not low <= len(value) <= high:
            raise _bad(
                where, f"is {len(value)} bytes, must be {low}..{high}" if low != high else f"must be {low} bytes"
            )
        return value

    return check


def _text(value: Any, where: str) -> str:
    if type(value) is not str:
        raise _bad(where, "must be text (msgpack str)")
    if len(value.encode()) > L.MAX_TEXT:
        raise _bad(where, f"is over {L.MAX_TEXT} bytes")
    return value


def _member(value: Any, where: str) -> str:
    if type(value) is not str or not MEMBER_ID.fullmatch(value):
        raise _bad(where, "must be a member id (1-64 of A-Z a-z 0-9 . _ -)")
    return value


def _code(value: Any, where: str) -> str:
    if type(value) is not str or not codes.CODE.fullmatch(value):
        raise _bad(where, "must be an error code (1-64 of a-z 0-9 -)")
    return value


def _role(value: Any, where: str) -> str:
    if type(value) is not str or value not in ("node", "auditor"):
        raise _bad(where, 'must be "node" or "auditor"')
    return value


def _optional(inner: Check) -> Check:
    def check(value: Any, where: str) -> Any:
        return None if value is None else inner(value, where)

    return check


def _array(inner: Check, low: int, high: int) -> Check:
    def check(value: Any, where: str) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _bad(where, "must be an array")
        if not low <= len(value) <= high:
            raise _bad(where, f"has {len(value)} items, must have {low}..{high}")
        return tuple(inner(item, f"{where}[{i}]") for i, item in enumerate(value))

    return check


def _order(names: list[str]) -> tuple[str, ...]:
    """Canonical key order: ascending UTF-8 bytes."""
    return tuple(sorted(names, key=lambda k: k.encode()))


def _fields(value: Any, where: str, checks: dict[str, Check], order: tuple[str, ...]) -> dict[str, Any]:
    """Check that `value` is a map whose keys are exactly `order`, in that order, and convert each field.

    `order` holds the keys of `checks` (plus "t" at the top level) in canonical order; comparing the map's keys
    with it checks the field set and the canonical key order at once.
    """
    if type(value) is not dict:
        raise _bad(where, "must be a map")
    if tuple(value) != order:
        if any(type(k) is not str for k in value):
            raise LocalProtocolError(f"{where} has a map key that is not text", code=codes.BAD_ENCODING)
        names = set(value)
        missing = sorted(set(order) - names)
        extra = sorted(names - set(order))
        if missing:
            raise _bad(where, f"lacks field(s) {', '.join(missing)}")
        if extra:
            shown = ", ".join(repr(k[:40]) for k in extra[:5])
            raise _bad(where, f"has unknown field(s) {shown}")
        raise LocalProtocolError(f"{where} keys are not in canonical (sorted) order", code=codes.BAD_ENCODING)
    out: dict[str, Any] = {}
    for name, check in checks.items():
        item = value[name]
        try:
            out[name] = check(item, f"{where} field {name!r}")
        except LocalProtocolError:
            if type(item) is float or (type(item) is list and any(type(v) is float for v in item)):
                raise LocalProtocolError(f"{where} field {name!r} is a float", code=codes.BAD_ENCODING) from None
            raise
    return out


STRUCT_ORDER: dict[type[Any], tuple[str, ...]] = {}


def _struct(cls: type[Any], checks: dict[str, Check]) -> Check:
    order = STRUCT_ORDER[cls] = _order(list(checks))

    def check(value: Any, where: str) -> Any:
        return cls(**_fields(value, where, checks, order))

    return check


RID = _uint(L.MAX_RID)
SEQ = _uint(L.MAX_INDEX)
INDEX = _uint(L.MAX_INDEX)
PACKET_ID = _blob(L.PACKET_ID_SIZE, L.PACKET_ID_SIZE)
DIGEST = _blob(L.HASH_SIZE, L.HASH_SIZE)
HEAD = _blob(1, L.MAX_HEAD)
DATA = _blob(1, L.MAX_CHUNK)
SIGNED = _blob(1, L.MAX_BLOB)
PROOF = _array(DIGEST, 0, L.MAX_PROOF)

LIMITS = _struct(
    L.Limits,
    {
        "frame": _uint(L.MAX_FRAME),
        "chunk": _uint(L.MAX_CHUNK),
        "packet": _uint(L.MAX_PACKET),
        "requests": _uint(L.MAX_REQUESTS),
        "window": _uint(L.MAX_WINDOW),
        "pushes": _uint(L.MAX_PUSHES),
    },
)
REASON = _struct(events.DenyReason, {"to": _member, "reason": _text})

SCHEMAS: dict[type[events.Message], dict[str, Check]] = {
    events.Hello: {
        "versions": _array(_uint(L.MAX_RID), 1, L.MAX_VERSIONS),
        "member": _member,
        "role": _role,
        "seen": INDEX,
        "limits": LIMITS,
    },
    events.Welcome: {"version": _uint(L.MAX_RID), "broker": _member, "time": _uint(L.MAX_TIME), "limits": LIMITS},
    events.SubmitBegin: {"rid": RID, "head": HEAD, "size": _uint(L.MAX_PACKET)},
    events.SubmitChunk: {"rid": RID, "data": DATA},
    events.SubmitEnd: {"rid": RID},
    events.SubmitCancel: {"rid": RID},
    events.Receipt: {"rid": RID, "id": PACKET_ID, "index": INDEX, "digest": DIGEST, "receipt": SIGNED},
    events.Deny: {"rid": RID, "id": PACKET_ID, "reasons": _array(REASON, 1, L.MAX_REASONS)},
    events.DeliverBegin: {"seq": SEQ, "head": HEAD, "size": _uint(L.MAX_PACKET)},
    events.DeliverChunk: {"seq": SEQ, "data": DATA},
    events.DeliverEnd: {"seq": SEQ},
    events.DeliverCancel: {"seq": SEQ, "code": _code},
    events.AckForward: {"seq": SEQ, "id": PACKET_ID, "by": _member, "index": INDEX, "ack": SIGNED},
    events.RetractForward: {"seq": SEQ, "id": PACKET_ID, "by": _member, "index": INDEX, "retraction": SIGNED},
    events.Ack: {"seq": SEQ, "id": PACKET_ID, "ack": SIGNED},
    events.Seen: {"seq": SEQ},
    events.Refuse: {"seq": SEQ, "code": _code, "message": _text},
    events.Retract: {"rid": RID, "id": PACKET_ID, "retraction": SIGNED},
    events.RetractResult: {"rid": RID, "index": INDEX, "receipt": SIGNED},
    events.Statement: {"rid": RID, "statement": SIGNED},
    events.StatementResult: {"rid": RID, "index": INDEX, "receipt": SIGNED},
    events.GetCheckpoint: {"rid": RID},
    events.Checkpoint: {"rid": RID, "checkpoint": SIGNED},
    events.GetInclusion: {"rid": RID, "index": INDEX, "size": INDEX},
    events.Inclusion: {"rid": RID, "proof": PROOF},
    events.GetConsistency: {"rid": RID, "old": INDEX, "new": INDEX},
    events.Consistency: {"rid": RID, "proof": PROOF},
    events.GetEntries: {"rid": RID, "start": INDEX, "end": INDEX},
    events.Entries: {
        "rid": RID,
        "start": INDEX,
        "entries": _array(_blob(1, L.MAX_ENTRY), 1, L.MAX_ENTRIES),
        "hashed": _array(_uint(L.MAX_ENTRIES - 1), 0, L.MAX_ENTRIES),
        "levels": _array(_uint(L.MAX_LEVEL), 0, L.MAX_ENTRIES),
    },
    events.CosignRequest: {"rid": RID, "old": INDEX, "proof": PROOF, "checkpoint": SIGNED},
    events.CosignResponse: {"rid": RID, "cosignature": SIGNED},
    events.Credit: {"amount": _uint(L.MAX_WINDOW)},
    events.Ping: {"n": _uint(L.MAX_RID)},
    events.Pong: {"n": _uint(L.MAX_RID)},
    events.ErrorMessage: {"rid": _optional(RID), "code": _code, "message": _text},
    events.Goodbye: {"message": _text},
}
BY_TYPE: dict[str, type[events.Message]] = {cls.TYPE: cls for cls in SCHEMAS}
ORDER: dict[type[events.Message], tuple[str, ...]] = {cls: _order([*checks, "t"]) for cls, checks in SCHEMAS.items()}
assert set(SCHEMAS) == set(events.MESSAGE_TYPES), "every message type has a schema"


def check_limits(limits: L.Limits, where: str) -> None:
    """Ranges that relate one announced limit to another (a single chunk must fit a frame and the window)."""
    if limits.frame < L.MIN_FRAME:
        raise _bad(f"{where} limits field 'frame'", f"must be at least {L.MIN_FRAME}")
    top = min(L.MAX_CHUNK, limits.frame - L.FRAME_OVERHEAD)
    if not L.MIN_CHUNK <= limits.chunk <= top:
        raise _bad(f"{where} limits field 'chunk'", f"must be {L.MIN_CHUNK}..{top}")
    if limits.window < limits.chunk:
        raise _bad(f"{where} limits field 'window'", "must be at least one chunk")
    if limits.requests < 1 or limits.pushes < 1:
        raise _bad(f"{where} limits", "'requests' and 'pushes' must be at least 1")


def _check_relations(msg: events.Message) -> None:
    where = msg.TYPE
    if isinstance(msg, events.Hello):
        if list(msg.versions) != sorted(set(msg.versions)) or 0 in msg.versions:
            raise _bad(f"{where} field 'versions'", "must be distinct positive versions in ascending order")
        check_limits(msg.limits, where)
    elif isinstance(msg, events.Welcome):
        if msg.version == 0:
            raise _bad(f"{where} field 'version'", "must be positive")
        check_limits(msg.limits, where)
    elif isinstance(msg, events.GetInclusion) and msg.index >= msg.size:
        raise _bad(where, f"index {msg.index} is not below size {msg.size}")
    elif isinstance(msg, events.GetConsistency) and msg.old > msg.new:
        raise _bad(where, f"old size {msg.old} is above new size {msg.new}")
    elif isinstance(msg, events.GetEntries) and msg.end <= msg.start:
        raise _bad(where, f"must ask for at least one entry (start {msg.start}, end {msg.end})")
    elif isinstance(msg, events.Entries):
        if list(msg.hashed) != sorted(set(msg.hashed)) or any(i >= len(msg.entries) for i in msg.hashed):
            raise _bad(f"{where} field 'hashed'", "must be distinct ascending offsets into 'entries'")
        if len(msg.levels) != len(msg.hashed):
            raise _bad(f"{where} field 'levels'", "must give one level per offset in 'hashed'")
        if any(len(msg.entries[i]) != L.HASH_SIZE for i in msg.hashed):
            raise _bad(f"{where} field 'entries'", "a hashed item must be a 32-byte subtree hash")
    elif isinstance(msg, events.Credit) and msg.amount == 0:
        raise _bad(f"{where} field 'amount'", "must be positive")
    elif isinstance(msg, events.Deny):
        names = [r.to for r in msg.reasons]
        if len(set(names)) != len(names):
            raise _bad(f"{where} field 'reasons'", "names a recipient twice")


def _from_map(value: Any) -> events.Message:
    if type(value) is not dict:
        raise LocalProtocolError("frame payload is not a map", code=codes.BAD_ENCODING)
    kind = value.get("t")
    if type(kind) is not str:
        raise LocalProtocolError("frame payload has no text field 't'", code=codes.BAD_ENCODING)
    cls = BY_TYPE.get(kind)
    if cls is None:
        raise LocalProtocolError(f"unknown message type {kind[:40]!r}", code=codes.UNKNOWN_TYPE)
    msg = cls(**_fields(value, kind, SCHEMAS[cls], ORDER[cls]))
    _check_relations(msg)
    return msg


def decode(payload: bytes) -> events.Message:
    """Parse one frame payload (without its length prefix) into a message, or raise LocalProtocolError.

    Canonical form (valise.encoding's rules) is checked in two steps that together cost one msgpack round trip:
    re-encoding the decoded value must give the same bytes (shortest forms, no duplicate keys, no trailing bytes),
    and every map's keys must be exactly its schema's keys in sorted order (checked by `_fields`), with values of
    the types the schema allows (so no float, extension, or nesting beyond the schema's).
    """
    try:
        value = encoding.decode(payload, what="frame payload", max_size=len(payload))
    except EncodingError as exc:
        raise LocalProtocolError(exc.what, code=codes.BAD_ENCODING) from None
    if not encoding.repacks_to(value, payload):
        raise LocalProtocolError("frame payload is not in canonical msgpack form", code=codes.BAD_ENCODING)
    return _from_map(value)


def _to_wire(value: Any) -> Any:
    order = STRUCT_ORDER.get(type(value))
    if order is not None:
        return {name: _to_wire(getattr(value, name)) for name in order}
    if isinstance(value, tuple | list):
        return [_to_wire(v) for v in value]
    return value


def to_map(msg: events.Message) -> dict[str, Any]:
    """`msg` as the map a frame carries (keys in canonical order, tuples as lists), without any check."""
    order = ORDER.get(type(msg))
    if order is None:
        raise LocalProtocolError(f"{type(msg).__name__} is not a wire message", code=codes.UNKNOWN_TYPE)
    return {name: msg.TYPE if name == "t" else _to_wire(getattr(msg, name)) for name in order}


def encode(msg: events.Message) -> bytes:
    """The canonical payload of `msg`, after the same checks a receiver makes (LocalProtocolError if any fails)."""
    wire = to_map(msg)
    _from_map(wire)  # the receiver's checks: types and ranges, so the map below is canonical msgpack
    return msgpack.packb(wire, use_bin_type=True)
