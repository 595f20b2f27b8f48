"""Policy log entries: their byte layout, signing and parsing (pure; specs/policy.md, "Records").

Every directory change, member statement and operator rule is one entry of the broker's Merkle log:

    entry = canonical msgpack {"t": TYPE, "body": BODY, "sig": SIG}

where BODY is the canonical msgpack of the record's fields, serialised once by its signer and carried as bytes,
and SIG is an Ed25519 signature over `domain(TYPE) ‖ BODY`. TYPE is "dir" (a directory change) or "rule" (an
operator rule), both signed by the operator key, or "stmt" (a Grant, Accept or Revoke) signed by its author's
identity key. A record's id is SHA-256(BODY): it names the record in reasons, revocations and `policy show`, and
a second entry with the same id is a replay.

Parsing here checks only form (sizes, types, value ranges); whether the signer is the right key and the record
fits the current directory is PolicyState's job, since that depends on what came before it in the log.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from valise import encoding, labels
from valise.crypto import sign
from valise.errors import EncodingError, LabelError, LimitError, PolicyError, StatementError
from valise.identity import MEMBER_ID
from valise.utctime import MAX_CALENDAR_TIME

RECORD_VERSION = 1
MAX_ENTRY_SIZE = 65535  # a log entry never exceeds this (the log's own limit)
MAX_TEXT = 256  # display names, regions, reasons
MAX_CATEGORIES = 64
GROUP_PREFIX = "group:"

DIR = "dir"
RULE = "rule"
STMT = "stmt"
TYPES = (DIR, RULE, STMT)
DOMAINS = {t: sign.domain(f"policy-{t}") for t in TYPES}
REKEY_DOMAIN = sign.domain("policy-rekey")

MEMBER_KINDS = ("country", "desk", "partner", "broker")
GROUP_KINDS = ("region", "operation")
GRANT, ACCEPT, REVOKE = "grant", "accept", "revoke"

# Fields common to every body, then the fields of each kind (exact sets: unknown fields are refused).
_OPERATOR_COMMON: dict[str, type | tuple[type, ...]] = {"v": int, "origin": str, "seq": int, "time": int}
_STMT_COMMON: dict[str, type | tuple[type, ...]] = {"v": int, "origin": str, "author": str, "created": int}
_OPT_INT = (int, type(None))
_OPT_CATS = (list, type(None))

DIR_OPS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "member-add": {"id": str, "kind": str, "name": str, "region": str, "bundle": bytes},
    "member-suspend": {"id": str, "reason": str},
    "member-reinstate": {"id": str},
    "member-remove": {"id": str, "reason": str},
    "member-enc-key": {"id": str, "enc_key": bytes, "enc_created": int, "enc_sig": bytes},
    "member-rekey": {"id": str, "bundle": bytes, "rekey_sig": bytes},
    "group-create": {"name": str, "kind": str, "start": _OPT_INT, "end": _OPT_INT},
    "group-add": {"name": str, "id": str},
    "group-remove": {"name": str, "id": str},
}
RULE_KINDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "ban-category": {"category": str},
    "max-size": {"size": int},
    "max-tlp": {"tlp": str},
    "lift": {"lifts": bytes},  # the id of a rule in force, which stops applying from this record's position
}
STMT_KINDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    GRANT: {
        "to": str,
        "tlp": str,
        "categories": _OPT_CATS,
        "valid_from": _OPT_INT,
        "valid_until": _OPT_INT,
        "max_size": _OPT_INT,
    },
    ACCEPT: {"from": str, "tlp": str, "categories": _OPT_CATS, "valid_from": _OPT_INT, "valid_until": _OPT_INT},
    REVOKE: {"statement": bytes},
}


@dataclass(frozen=True, slots=True)
class Record:
    """A parsed entry whose form is valid; its signature is not yet checked (that needs the directory)."""

    type: str  # "dir", "rule" or "stmt"
    kind: str  # the op, rule or statement kind
    body: dict[str, Any]
    body_bytes: bytes
    sig: bytes
    raw: bytes

    @property
    def id(self) -> bytes:
        return hashlib.sha256(self.body_bytes).digest()

    def verify(self, public: bytes, *, what: str) -> None:
        sign.verify(public, DOMAINS[self.type], self.body_bytes, self.sig, what=what)


def short(record_id: bytes) -> str:
    """The id as people see it in reasons: 8 hex digits and an ellipsis (`policy show` prints all 64)."""
    return record_id[:4].hex() + "…"


def _text(value: str, name: str, what: str) -> str:
    if not value or len(value) > MAX_TEXT or not value.isprintable():
        raise PolicyError(f"{what}: {name} must be 1-{MAX_TEXT} printable characters")
    return value


def _ident(value: str, name: str, what: str) -> str:
    if not MEMBER_ID.fullmatch(value):
        raise PolicyError(f"{what}: {name} {value[:80]!r} is not 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def check_party(value: str, what: str) -> str:
    """A statement's counterpart: a member id, or "group:NAME"."""
    name = value[len(GROUP_PREFIX) :] if value.startswith(GROUP_PREFIX) else value
    _ident(name, "counterpart", what)
    return value


def check_categories(cats: list[Any] | None, what: str) -> list[str] | None:
    """None means any category; a list must be non-empty, sorted, unique and from the vocabulary."""
    if cats is None:
        return None
    if not cats:
        raise PolicyError(f"{what}: categories is empty (leave it out, nil, to mean any category)")
    if len(cats) > MAX_CATEGORIES:
        raise LimitError(f"{what}: {len(cats)} categories, over the limit of {MAX_CATEGORIES}")
    for c in cats:
        if not isinstance(c, str):
            raise PolicyError(f"{what}: a category is not text")
        try:
            labels.check_category(c)
        except LabelError as exc:
            raise PolicyError(f"{what}: {exc.what}") from None
    if cats != sorted(set(cats)):
        raise PolicyError(f"{what}: categories must be sorted and unique")
    return cats


def check_tlp(value: str, what: str) -> str:
    try:
        return labels.TLP.parse(value).label
    except LabelError as exc:
        raise PolicyError(f"{what}: {exc.what}") from None


# Every time a record carries: refused past the calendar's end (utctime.py), or before 1970, when signed, admitted
# or folded, so that no reason, listing or audit has to show a time it cannot.
_TIME_FIELDS = ("time", "created", "valid_from", "valid_until", "start", "end", "enc_created")


def _check_times(body: dict[str, Any], what: str) -> None:
    for name in _TIME_FIELDS:
        t = body.get(name)
        if t is not None and not 0 <= t <= MAX_CALENDAR_TIME:
            raise PolicyError(f"{what}: {name} {t} is not a time between 1970 and the year 9999")


def _check_window(start: int | None, end: int | None, what: str) -> None:
    if start is not None and end is not None and end <= start:
        raise PolicyError(f"{what}: the end ({end}) is not after the start ({start})")


def check_body(rtype: str, body: dict[str, Any], what: str) -> str:
    """Check the fields of a decoded body; return its kind. Raises PolicyError/StatementError naming the field."""
    if rtype == STMT:
        kinds, common, key = STMT_KINDS, _STMT_COMMON, "k"
    elif rtype == DIR:
        kinds, common, key = DIR_OPS, _OPERATOR_COMMON, "op"
    else:
        kinds, common, key = RULE_KINDS, _OPERATOR_COMMON, "rule"
    kind = body.get(key)
    if not isinstance(kind, str) or kind not in kinds:
        raise PolicyError(f"{what}: unknown {key} {str(kind)[:40]!r} (expected one of {', '.join(kinds)})")
    try:
        encoding.check_map(body, what=what, fields={**common, key: str, **kinds[kind]})
    except EncodingError as exc:
        raise PolicyError(exc.what) from None
    if body["v"] != RECORD_VERSION:
        raise PolicyError(f"{what}: version {body['v']} is not supported (expected {RECORD_VERSION})")
    _check_times(body, what)
    if rtype == STMT:
        _ident(body["author"], "author", what)
        if kind in (GRANT, ACCEPT):
            check_party(body["to" if kind == GRANT else "from"], what)
            check_tlp(body["tlp"], what)
            check_categories(body["categories"], what)
            _check_window(body["valid_from"], body["valid_until"], what)
            if kind == GRANT and body["max_size"] is not None and body["max_size"] <= 0:
                raise PolicyError(f"{what}: max_size must be positive")
        elif len(body["statement"]) != 32:
            raise PolicyError(f"{what}: the revoked statement id is not 32 bytes")
    elif rtype == DIR:
        if "id" in body:
            _ident(body["id"], "member id", what)
        if "name" in body and kind != "member-add":  # a group name; a member's "name" is its display name
            _ident(body["name"], "group name", what)
        if kind == "member-add":
            _text(body["name"], "name", what)
            _ident(body["region"], "region", what)
            if body["kind"] not in MEMBER_KINDS:
                raise PolicyError(f"{what}: member kind {body['kind'][:40]!r} is not one of {', '.join(MEMBER_KINDS)}")
        if kind in ("member-suspend", "member-remove"):
            _text(body["reason"], "reason", what)
        if kind == "group-create":
            if body["kind"] not in GROUP_KINDS:
                raise PolicyError(f"{what}: group kind {body['kind'][:40]!r} is not one of {', '.join(GROUP_KINDS)}")
            if body["kind"] == "region" and (body["start"] is not None or body["end"] is not None):
                raise PolicyError(f"{what}: a region group has no start or end (use kind 'operation')")
            _check_window(body["start"], body["end"], what)
    else:
        if kind == "ban-category":
            check_categories([body["category"]], what)
        elif kind == "max-size" and body["size"] <= 0:
            raise PolicyError(f"{what}: size must be positive")
        elif kind == "max-tlp":
            check_tlp(body["tlp"], what)
        elif kind == "lift" and len(body["lifts"]) != 32:
            raise PolicyError(f"{what}: the lifted rule id is not 32 bytes")
    return kind


def maybe_policy(entry: bytes) -> bool:
    """False for an entry that cannot be a policy record, decided without decoding it.

    Every fold of the log (the broker at start-up, each operator command, nodes, auditors) meets mostly traffic
    records, and decoding each only to find it is not policy was most of a fold's time. A policy record's "t" is
    the string "dir", "rule" or "stmt", and msgpack stores a string's bytes as they are, whatever header form it
    uses; so an entry containing none of the three byte strings cannot be one. (Traffic that contains one by
    chance is decoded as before.) Three substring searches: a regular expression alternation was 10x slower.
    """
    return b"dir" in entry or b"rule" in entry or b"stmt" in entry


def parse(entry: bytes) -> Record | None:
    """Parse a log entry; None if its type is not a policy type (packets, acks... belong to other modules).

    A policy entry (type dir, rule or stmt) must be well formed; its signature is checked later, by PolicyState.
    An entry that is not even a map with a text "t" is no policy record either: the log's other owners refuse
    such entries before they are appended, so here it is skipped, not judged.
    """
    if len(entry) > MAX_ENTRY_SIZE:
        raise LimitError(f"log entry is {len(entry)} bytes, over the limit of {MAX_ENTRY_SIZE}")
    if not maybe_policy(entry):
        return None
    return parse_decoded(entry)


def parse_decoded(entry: bytes) -> Record | None:
    """`parse` without the shortcut: decodes every entry (tests hold the two to the same answers)."""
    if len(entry) > MAX_ENTRY_SIZE:
        raise LimitError(f"log entry is {len(entry)} bytes, over the limit of {MAX_ENTRY_SIZE}")
    try:
        outer = encoding.unpack(entry, what="log entry", max_size=MAX_ENTRY_SIZE)
    except EncodingError:
        return None
    if not isinstance(outer, dict) or outer.get("t") not in TYPES:
        return None
    rtype: str = outer["t"]
    what = {DIR: "directory record", RULE: "operator rule", STMT: "statement"}[rtype]
    error = StatementError if rtype == STMT else PolicyError
    try:
        encoding.check_map(outer, what=what, fields={"t": str, "body": bytes, "sig": bytes})
        body = encoding.unpack(outer["body"], what=what, max_size=MAX_ENTRY_SIZE)
    except EncodingError as exc:
        raise error(f"malformed {what}: {exc.what}") from None
    if not isinstance(body, dict):
        raise error(f"malformed {what}: the body is not a map")
    try:
        kind = check_body(rtype, body, what)
    except PolicyError as exc:
        raise error(exc.what) from None
    return Record(rtype, kind, body, outer["body"], outer["sig"], entry)


def parse_policy(entry: bytes) -> Record:
    """Parse an entry that must be a policy record (e.g. a statement file handed to the broker)."""
    record = parse(entry)
    if record is None:
        raise PolicyError("not a policy record (expected a map with t = dir, rule or stmt)")
    return record


def seal(rtype: str, body: dict[str, Any], key: sign.SigningKey) -> bytes:
    """Sign `body` (after checking its form) and return the log entry bytes."""
    check_body(rtype, body, {DIR: "directory record", RULE: "operator rule", STMT: "statement"}[rtype])
    body_bytes = encoding.pack(body)
    entry = encoding.pack({"t": rtype, "body": body_bytes, "sig": key.sign(DOMAINS[rtype], body_bytes)})
    if len(entry) > MAX_ENTRY_SIZE:
        raise LimitError(f"policy record is {len(entry)} bytes, over the limit of {MAX_ENTRY_SIZE}")
    return entry


def rekey_message(member_id: str, origin: str, new_bundle: bytes) -> bytes:
    """What a member's old identity key signs to hand its membership to a new identity key."""
    return encoding.pack({"id": member_id, "origin": origin, "bundle": hashlib.sha256(new_bundle).digest()})


REKEY_REQUEST_MAX = 16384  # a bundle (a certificate and three keys) and a signature


def rekey_request(old: sign.SigningKey, member_id: str, origin: str, new_bundle: bytes) -> bytes:
    """The file a member gives its broker's operator to move its membership to a new identity key: the new
    bundle and the old key's hand-over signature (`valise keygen --rotate`; `valise broker member rekey`)."""
    sig = old.sign(REKEY_DOMAIN, rekey_message(member_id, origin, new_bundle))
    return encoding.pack({"v": 1, "t": "rekey-request", "id": member_id, "origin": origin, "bundle": new_bundle,
                          "rekey_sig": sig})  # fmt: skip


def parse_rekey_request(data: bytes) -> dict[str, Any]:
    """A rekey request's fields, checked for shape (the signature is checked when the record is folded)."""
    fields: dict[str, type | tuple[type, ...]] = {
        "v": int, "t": str, "id": str, "origin": str, "bundle": bytes, "rekey_sig": bytes,
    }  # fmt: skip
    m = encoding.unpack_map(data, what="rekey request", max_size=REKEY_REQUEST_MAX, fields=fields)
    if m["v"] != 1 or m["t"] != "rekey-request":
        raise EncodingError("not a version 1 rekey request")
    return m


# --- builders: the one place each body is spelled out -----------------------------------------------


def operator_body(origin: str, seq: int, time: int, tag: str, value: str, /, **fields: Any) -> dict[str, Any]:
    return {"v": RECORD_VERSION, "origin": origin, "seq": seq, "time": time, tag: value, **fields}


def dir_record(key: sign.SigningKey, origin: str, seq: int, time: int, op: str, /, **fields: Any) -> bytes:
    """A directory change signed by the operator key (`fields` as in DIR_OPS[op])."""
    return seal(DIR, operator_body(origin, seq, time, "op", op, **fields), key)


def rule_record(key: sign.SigningKey, origin: str, seq: int, time: int, rule: str, /, **fields: Any) -> bytes:
    """An operator rule signed by the operator key (`fields` as in RULE_KINDS[rule])."""
    return seal(RULE, operator_body(origin, seq, time, "rule", rule, **fields), key)


def grant(
    key: sign.SigningKey,
    *,
    origin: str,
    author: str,
    created: int,
    to: str,
    tlp: str,
    categories: list[str] | None = None,
    valid_from: int | None = None,
    valid_until: int | None = None,
    max_size: int | None = None,
) -> bytes:
    body = {
        "v": RECORD_VERSION,
        "origin": origin,
        "k": GRANT,
        "author": author,
        "created": created,
        "to": to,
        "tlp": tlp,
        "categories": sorted(set(categories)) if categories is not None else None,
        "valid_from": valid_from,
        "valid_until": valid_until,
        "max_size": max_size,
    }
    return seal(STMT, body, key)


def accept(
    key: sign.SigningKey,
    *,
    origin: str,
    author: str,
    created: int,
    source: str,
    tlp: str,
    categories: list[str] | None = None,
    valid_from: int | None = None,
    valid_until: int | None = None,
) -> bytes:
    body = {
        "v": RECORD_VERSION,
        "origin": origin,
        "k": ACCEPT,
        "author": author,
        "created": created,
        "from": source,
        "tlp": tlp,
        "categories": sorted(set(categories)) if categories is not None else None,
        "valid_from": valid_from,
        "valid_until": valid_until,
    }
    return seal(STMT, body, key)


def revoke(key: sign.SigningKey, *, origin: str, author: str, created: int, statement: bytes) -> bytes:
    body = {"v": RECORD_VERSION, "origin": origin, "k": REVOKE, "author": author, "created": created}
    return seal(STMT, {**body, "statement": statement}, key)
