"""Packet v1 wire format: limits, byte layout, core and header encoding, and the incremental head parser (pure).

    packet     = magic (7) ‖ version (1) ‖ header length (u32 BE) ‖ header ‖ signature (64) ‖ ciphertext
    magic      = "VALISE" 0x00, version = 0x01
    header     = canonical msgpack {core, ct_len, ct_sha256, key_commit, stanzas}
    core       = canonical msgpack {v, id, created, expires, from, to, labels}   (carried as bytes in header)
    signature  = Ed25519 over "valise/v1/packet-header" 0x00 ‖ header

specs/packet.md is the authority; this module is its executable form.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from valise import encoding, identity
from valise.crypto import padding, sign, stream
from valise.errors import (
    EncodingError,
    Error,
    LabelError,
    MemberIdError,
    PacketFormatError,
    PacketLimitError,
    PacketSignatureError,
    PacketVersionError,
    PayloadError,
    SenderMismatchError,
    SignatureError,
    StanzaError,
    TrailingDataError,
    TruncatedError,
)
from valise.labels import Labels

MAGIC = b"VALISE\x00"
VERSION = 1
PREFIX_SIZE = len(MAGIC) + 1 + 4  # magic, version byte, header length
SIGNATURE_SIZE = sign.SIGNATURE_SIZE

# Limits, all checked before any crypto and before allocating for the thing they bound (specs/packet.md).
MAX_RECIPIENTS = 256
MAX_STANZAS_PER_RECIPIENT = 4
MAX_STANZA_BODY = 4096  # room for a post-quantum hybrid stanza (an ML-KEM-1024 ciphertext is 1568 bytes)
MAX_HEADER = 512 * 1024
MAX_CORE = 32 * 1024
MAX_CIPHERTEXT = 1 << 32  # 4 GiB

PACKET_ID_SIZE = 16
CONTENT_KEY_SIZE = 32
HASH_SIZE = 32

HEADER_DOMAIN = sign.domain("packet-header")
AAD_DOMAIN = b"valise/v1/payload-aad\x00"

X25519_STANZA = "X25519-HPKE-v1"
X25519_STANZA_BODY = 32 + 32 + 16  # enc ‖ sealed K ‖ tag
STANZA_TYPE = re.compile(r"[A-Za-z0-9.+-]{1,32}")

_CORE_FIELDS: dict[str, type] = {
    "v": int,
    "id": bytes,
    "created": int,
    "expires": int,
    "from": str,
    "to": list,
    "labels": dict,
}
_HEADER_FIELDS: dict[str, type] = {
    "core": bytes,
    "ct_len": int,
    "ct_sha256": bytes,
    "key_commit": bytes,
    "stanzas": list,
}
_STANZA_FIELDS: dict[str, type] = {"type": str, "to": str, "body": bytes}
_SORTED_KEYS = {id(f): sorted(f) for f in (_CORE_FIELDS, _HEADER_FIELDS, _STANZA_FIELDS)}
_STANZA_KEYS = sorted(_STANZA_FIELDS)


def _unpack_map(raw: bytes, *, what: str, max_size: int, fields: dict[str, type]) -> dict[str, Any]:
    """Decode a canonical map of known fields under the rule of `valise.encoding.unpack_map`, faster.

    A broker verifies headers at the rate it verifies signatures (inspect+verify must stay within 70% of a
    raw Ed25519 verify), and `encoding.unpack` rebuilds every map to re-encode it. Every map in a packet has
    a fixed field set, so canonical key order is one list comparison per map (`_check_fields`, here and for
    nested maps by their callers), every value's exact type is checked (so no float can hide anywhere), and
    re-encoding the decoded value as is must give the same bytes (shortest integers, bin vs str, no
    duplicate keys). Together that is exactly "re-encoding canonically gives the same bytes";
    tests/test_packet.py checks both decoders agree.
    """
    value = _check_fields(encoding.decode(raw, what=what, max_size=max_size), what, fields)
    if not encoding.repacks_to(value, raw):
        raise EncodingError(f"{what} is not in canonical msgpack form")
    return value


def _check_fields(value: Any, what: str, fields: dict[str, type]) -> dict[str, Any]:
    """Exact field set in canonical (sorted) order, exact types (msgpack yields exact built-in types, so a
    `bool` is never taken for an `int`); the generic `encoding.check_map` explains any failure."""
    if type(value) is dict and list(value) == _SORTED_KEYS[id(fields)]:
        for name, kind in fields.items():
            if type(value[name]) is not kind:
                break
        else:
            return value
    encoding.check_map(value, what=what, fields=dict(fields))
    if type(value) is dict and list(value) != sorted(value):
        raise EncodingError(f"{what} is not in canonical msgpack form")
    raise EncodingError(f"{what} has a field of the wrong type")


def max_payload_size() -> int:
    """The largest payload whose packet's ciphertext fits MAX_CIPHERTEXT."""
    lo, hi = 0, MAX_CIPHERTEXT
    while lo < hi:  # largest L with ciphertext_size(padded_size(L)) ≤ MAX_CIPHERTEXT (monotone in L)
        mid = (lo + hi + 1) // 2
        if stream.ciphertext_size(padding.padded_size(mid)) <= MAX_CIPHERTEXT:
            lo = mid
        else:
            hi = mid - 1
    return lo


MAX_PAYLOAD = max_payload_size()


def payload_aad(core: bytes) -> bytes:
    """AAD of every payload chunk: binds the chunks to this exact core (packet id, sender, recipients, labels)."""
    return hashlib.sha256(AAD_DOMAIN + core).digest()


def stanza_info(stanza_type: str, packet_id: bytes, sender: str, recipient: str) -> bytes:
    """HPKE `info` of a stanza: binds the sealed K to the stanza type, packet, sender and recipient.

    Member ids are 1-64 ASCII characters, so a one-byte length prefix makes the encoding injective."""
    kind = stanza_type.encode()
    s, r = sender.encode(), recipient.encode()
    return (
        b"valise/v1/stanza\x00" + bytes((len(kind),)) + kind + packet_id + bytes((len(s),)) + s + bytes((len(r),)) + r
    )


_LABELS_CACHE: dict[tuple[Any, ...], Labels] = {}
_LABELS_CACHE_MAX = 1024


def _labels(value: Any) -> Labels:
    """Labels from a decoded core, memoised: a broker sees the same few label sets again and again, and
    validating them is a fifth of the cost of parsing a header. Only maps that passed validation are cached,
    keyed by their exact (canonically ordered) content."""
    if type(value) is not dict or list(value) != ["categories", "content_type", "operation", "tlp"]:
        if type(value) is dict and set(value) == {"categories", "content_type", "operation", "tlp"}:
            raise EncodingError("packet core labels are not in canonical msgpack form")
        return Labels.from_map(value)  # raises the precise LabelError
    cats = value["categories"]
    key = (value["tlp"], tuple(cats) if type(cats) is list else cats, value["operation"], value["content_type"])
    try:
        cached = _LABELS_CACHE.get(key)
    except TypeError:  # an unhashable value where text belongs: let the validator say what is wrong
        cached = None
    if cached is not None:
        return cached
    labels = Labels.from_map(value)
    if len(_LABELS_CACHE) < _LABELS_CACHE_MAX:
        _LABELS_CACHE[key] = labels
    return labels


class Core(NamedTuple):
    """The decoded core; `raw` is the exact bytes that were signed and hashed into the AAD.

    Core, Stanza, Header and Head are NamedTuples rather than frozen dataclasses: just as immutable, with the
    same attributes, and the parser builds them with one `tuple.__new__` call each instead of one
    `object.__setattr__` per field (~2.5 µs of a ~20 µs header parse; tools/bench_packet.py)."""

    packet_id: bytes
    created: int
    expires: int
    sender: str
    recipients: tuple[str, ...]
    labels: Labels
    raw: bytes

    @classmethod
    def make(
        cls,
        packet_id: bytes,
        created: int,
        expires: int,
        sender: str,
        recipients: tuple[str, ...],
        labels: Labels,
    ) -> Core:
        raw = encoding.pack(
            {
                "v": VERSION,
                "id": packet_id,
                "created": created,
                "expires": expires,
                "from": sender,
                "to": list(recipients),
                "labels": labels.to_map(),
            }
        )
        return cls.parse(raw)

    @classmethod
    def parse(cls, raw: bytes) -> Core:
        core = _fast_core(raw)
        return _parse_core(raw) if core is None else core


def _parse_core(raw: bytes) -> Core:
    """The checked core parser: the reference for what is valid, and the one that says what is wrong."""
    try:
        m = _unpack_map(raw, what="packet core", max_size=MAX_CORE, fields=_CORE_FIELDS)
    except EncodingError as exc:
        raise PacketFormatError(f"malformed packet: {exc.what}") from None
    if m["v"] != VERSION:
        raise PacketVersionError(f"packet core version {m['v']} is not supported (expected {VERSION})")
    if len(m["id"]) != PACKET_ID_SIZE:
        raise PacketFormatError(f"packet id is {len(m['id'])} bytes, expected {PACKET_ID_SIZE}")
    if not 0 <= m["created"] < m["expires"] < 2**63:
        raise PacketFormatError("packet times are not valid (need 0 ≤ created < expires < 2^63)")
    to = m["to"]
    if not 1 <= len(to) <= MAX_RECIPIENTS:
        raise PacketLimitError(f"packet has {len(to)} recipients; 1 to {MAX_RECIPIENTS} are allowed")
    try:
        if not all(type(r) is str and identity.MEMBER_ID.fullmatch(r) for r in (m["from"], *to)):
            for r in (m["from"], *to):
                identity.check_member_id(r)  # raises, naming the bad id
        labels = _labels(m["labels"])
    except (MemberIdError, LabelError, EncodingError) as exc:
        raise PacketFormatError(f"malformed packet core: {exc.what}") from None
    if to != sorted(set(to)):
        raise PacketFormatError("packet recipients are not sorted and unique")
    return Core(m["id"], m["created"], m["expires"], m["from"], tuple(to), labels, raw)


class Stanza(NamedTuple):
    type: str
    recipient: str
    body: bytes

    def to_map(self) -> dict[str, Any]:
        return {"type": self.type, "to": self.recipient, "body": self.body}


class Header(NamedTuple):
    core: Core
    ct_len: int
    ct_sha256: bytes
    key_commit: bytes
    stanzas: tuple[Stanza, ...]
    raw: bytes

    @property
    def padded_size(self) -> int:
        size = stream.padded_size_of(self.ct_len)
        assert size is not None  # checked by parse
        return size

    @staticmethod
    def encode(core: Core, ct_len: int, ct_sha256: bytes, key_commit: bytes, stanzas: tuple[Stanza, ...]) -> bytes:
        return encoding.pack(
            {
                "core": core.raw,
                "ct_len": ct_len,
                "ct_sha256": ct_sha256,
                "key_commit": key_commit,
                "stanzas": [s.to_map() for s in stanzas],
            }
        )

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        """Decode and check a header: canonical form, limits, lengths, stanzas consistent with `to`."""
        header = _fast_header(raw)
        return _parse_header(raw) if header is None else header


def _parse_header(raw: bytes) -> Header:
    """The checked header parser: the reference for what is valid, and the one that says what is wrong."""
    if len(raw) > MAX_HEADER:
        raise PacketLimitError(f"packet header is {len(raw)} bytes, over the limit of {MAX_HEADER}")
    try:
        m = _unpack_map(raw, what="packet header", max_size=MAX_HEADER, fields=_HEADER_FIELDS)
    except EncodingError as exc:
        raise PacketFormatError(f"malformed packet: {exc.what}") from None
    core = _parse_core(m["core"])
    ct_len = m["ct_len"]
    if not 0 < ct_len <= MAX_CIPHERTEXT:
        raise PacketLimitError(f"ciphertext length {ct_len} is outside 1..{MAX_CIPHERTEXT}")
    padded = stream.padded_size_of(ct_len)
    if padded is None or padding.padme(padded) != padded:
        raise PacketFormatError(f"ciphertext length {ct_len} is not that of a padded payload")
    if len(m["ct_sha256"]) != HASH_SIZE or len(m["key_commit"]) != HASH_SIZE:
        raise PacketFormatError("ciphertext hash and key commitment must be 32 bytes each")
    raw_stanzas = m["stanzas"]
    if len(raw_stanzas) > MAX_STANZAS_PER_RECIPIENT * len(core.recipients):
        raise PacketLimitError(f"packet has {len(raw_stanzas)} stanzas for {len(core.recipients)} recipients")
    stanzas = []
    holders: list[str] = []  # recipients holding stanzas, in order, without repeats
    held = 0  # stanzas of the last holder so far: at most MAX_STANZAS_PER_RECIPIENT each (specs/packet.md)
    prev: tuple[str, str] | None = None
    for i, value in enumerate(raw_stanzas):
        stanza = _parse_stanza(value, i)
        key = (stanza.recipient, stanza.type)
        if prev is not None and key <= prev:
            raise StanzaError("stanzas are not sorted by (recipient, type) and unique")
        if not holders or holders[-1] != stanza.recipient:
            holders.append(stanza.recipient)
            held = 0
        held += 1
        if held > MAX_STANZAS_PER_RECIPIENT:
            raise PacketLimitError(f"{stanza.recipient} holds more than {MAX_STANZAS_PER_RECIPIENT} stanzas")
        prev = key
        stanzas.append(stanza)
    if tuple(holders) != core.recipients:
        raise StanzaError("stanzas do not match the packet's recipients one for one")
    return Header(core, ct_len, m["ct_sha256"], m["key_commit"], tuple(stanzas), raw)


def _parse_stanza(value: Any, index: int) -> Stanza:
    if type(value) is dict and list(value) == _STANZA_KEYS:
        kind, to, body = value["type"], value["to"], value["body"]
        ok = type(kind) is str and type(to) is str and type(body) is bytes
    else:
        ok = False
    if not ok:
        try:
            _check_fields(value, f"stanza {index}", _STANZA_FIELDS)
        except EncodingError as exc:
            raise PacketFormatError(f"malformed packet: {exc.what}") from None
    if kind == X25519_STANZA:
        if len(body) != X25519_STANZA_BODY:
            raise StanzaError(f"stanza {index} ({X25519_STANZA}) body is not {X25519_STANZA_BODY} bytes")
    elif not STANZA_TYPE.fullmatch(kind):
        raise PacketFormatError(f"stanza {index} has an invalid type")
    elif len(body) > MAX_STANZA_BODY:
        raise PacketLimitError(f"stanza {index} body is {len(body)} bytes, over {MAX_STANZA_BODY}")
    return Stanza(kind, to, body)


# The fast parsers. A broker parses headers at the rate it verifies signatures (inspect+verify must stay within
# 70% of a raw Ed25519 verify, tools/bench_packet.py), so the common case, a valid header, takes one straight
# pass: decode, exact keys and types, every limit and rule of the checked parsers above, one re-encoding of
# each of the two maps, and tuples built in one call. They only ever answer "valid, and here it is" or None;
# on None the checked parser (`_parse_header`, `_parse_core`) runs and raises the precise error, so every
# refusal and its message come from one place. Each condition below is one the checked parser also imposes
# (tests/test_packet.py runs both on mutated headers), which is what makes answering early sound.
# They decode with msgpack's defaults but for ext types (none allowed): since msgpack 1.0 these are text as
# `str`, map keys `str` or `bytes`, arrays as lists, and every length bounded by the input's length, which is
# checked first against the limit `encoding.decode` is given; the same decoding, a quarter of a µs sooner.
_new = tuple.__new__
_unpackb = msgpack.unpackb
_member_id = identity.MEMBER_ID.fullmatch
_stanza_type = STANZA_TYPE.fullmatch
_HEADER_KEYS = _SORTED_KEYS[id(_HEADER_FIELDS)]
_CORE_KEYS = _SORTED_KEYS[id(_CORE_FIELDS)]
_MAX_TIME = 2**63


def _fast_map(raw: bytes, limit: int, keys: list[str]) -> dict[str, Any] | None:
    """`raw` decoded, if it is a map of exactly `keys` in that order within `limit` bytes; else None."""
    if len(raw) > limit:
        return None
    try:
        m = _unpackb(raw, max_ext_len=0)
    except Exception:  # the checked parser says what is wrong
        return None
    return m if type(m) is dict and list(m) == keys else None


def _fast_core(raw: bytes) -> Core | None:
    m = _fast_map(raw, MAX_CORE, _CORE_KEYS)
    if m is None:
        return None
    v, packet_id, created, expires, sender, to = m["v"], m["id"], m["created"], m["expires"], m["from"], m["to"]
    if not (
        type(v) is int
        and v == VERSION
        and type(packet_id) is bytes
        and len(packet_id) == PACKET_ID_SIZE
        and type(created) is int
        and type(expires) is int
        and 0 <= created < expires < _MAX_TIME
        and type(sender) is str
        and _member_id(sender)
        and type(to) is list
        and type(m["labels"]) is dict
    ):
        return None
    n = len(to)
    if n == 1:
        if type(to[0]) is not str or not _member_id(to[0]):
            return None
    elif not (1 < n <= MAX_RECIPIENTS and all(type(r) is str and _member_id(r) for r in to) and to == sorted(set(to))):
        return None
    if not encoding.repacks_to(m, raw):
        return None
    try:
        labels = _labels(m["labels"])
    except Error:
        return None
    return _new(Core, (packet_id, created, expires, sender, tuple(to), labels, raw))


def _fast_header(raw: bytes) -> Header | None:
    m = _fast_map(raw, MAX_HEADER, _HEADER_KEYS)
    if m is None:
        return None
    ct_len, ct_sha256, key_commit, raw_stanzas = m["ct_len"], m["ct_sha256"], m["key_commit"], m["stanzas"]
    if not (
        type(ct_len) is int
        and 0 < ct_len <= MAX_CIPHERTEXT
        and type(ct_sha256) is bytes
        and len(ct_sha256) == HASH_SIZE
        and type(key_commit) is bytes
        and len(key_commit) == HASH_SIZE
        and type(raw_stanzas) is list
        and type(m["core"]) is bytes
        and (ct_len in _PADDED_SEEN or _padded_ok(ct_len))
        and encoding.repacks_to(m, raw)
    ):
        return None
    core = _fast_core(m["core"])
    if core is None:
        return None
    recipients = core.recipients
    if len(raw_stanzas) > MAX_STANZAS_PER_RECIPIENT * len(recipients):
        return None
    stanzas = []
    holders: list[str] = []  # recipients holding stanzas, in order, without repeats
    held = 0  # stanzas of the last holder so far: at most MAX_STANZAS_PER_RECIPIENT each (specs/packet.md)
    prev: tuple[str, str] | None = None
    for value in raw_stanzas:
        if type(value) is not dict or list(value) != _STANZA_KEYS:
            return None
        kind, to, body = value["type"], value["to"], value["body"]
        if type(kind) is not str or type(to) is not str or type(body) is not bytes:
            return None
        if kind == X25519_STANZA:
            if len(body) != X25519_STANZA_BODY:
                return None
        elif not _stanza_type(kind) or len(body) > MAX_STANZA_BODY:
            return None
        key = (to, kind)
        if prev is not None and key <= prev:
            return None
        if not holders or holders[-1] != to:
            holders.append(to)
            held = 0
        held += 1
        if held > MAX_STANZAS_PER_RECIPIENT:
            return None
        prev = key
        stanzas.append(_new(Stanza, (kind, to, body)))
    if tuple(holders) != recipients:
        return None
    return _new(Header, (core, ct_len, ct_sha256, key_commit, tuple(stanzas), raw))


def _padded_ok(ct_len: int) -> bool:
    padded = stream.padded_size_of(ct_len)
    ok = padded is not None and padding.padme(padded) == padded
    if ok and len(_PADDED_SEEN) < _PADDED_SEEN_MAX:
        _PADDED_SEEN.add(ct_len)
    return ok


# Ciphertext lengths found valid, so that a broker, which sees the same few again and again (padmé leaves
# few), checks one with a set lookup (0.05 µs) instead of two calls (0.45 µs). Bounded like `_LABELS_CACHE`.
_PADDED_SEEN: set[int] = set()
_PADDED_SEEN_MAX = 4096


@dataclass(frozen=True, slots=True)
class NeedMore:
    """`parse_head` needs at least `size` bytes of the packet in total."""

    size: int


class Head(NamedTuple):
    """A parsed (not yet verified) packet head: everything before the ciphertext."""

    header: Header
    signature: bytes
    head_size: int  # offset of the ciphertext

    @property
    def total_size(self) -> int:
        return self.head_size + self.header.ct_len

    @property
    def digest(self) -> bytes:
        """The header digest: SHA-256 of the signed header bytes (what the log records)."""
        return hashlib.sha256(self.header.raw).digest()

    @property
    def core(self) -> Core:
        return self.header.core

    def verify(self, sender: identity.PublicBundle) -> None:
        """Check that `sender` is the packet's sender and signed this header."""
        core = self.header.core
        if core.sender != sender.member_id:
            raise SenderMismatchError(
                f"packet is from {core.sender}, but the sender key given is {sender.member_id}'s",
                hint=f"check it against {core.sender}'s public bundle",
            )
        try:
            sign.verify(sender.sign_key, HEADER_DOMAIN, self.header.raw, self.signature, what="packet header")
        except SignatureError as exc:
            raise PacketSignatureError(
                f"{exc.what} under {sender.member_id}'s identity key", hint="the packet was altered or forged"
            ) from None


def parse_prefix(prefix: bytes) -> int:
    """Check magic and version and return the header length (bounded) from the first PREFIX_SIZE bytes."""
    if prefix[: len(MAGIC)] != MAGIC[: len(prefix)]:
        raise PacketFormatError("not a valise packet (bad magic)")
    if len(prefix) < PREFIX_SIZE:
        raise TruncatedError(f"packet ends after {len(prefix)} bytes, inside its prefix")
    if prefix[len(MAGIC)] != VERSION:
        raise PacketVersionError(f"packet version {prefix[len(MAGIC)]} is not supported (expected {VERSION})")
    header_len = int.from_bytes(prefix[len(MAGIC) + 1 : PREFIX_SIZE], "big")
    if header_len > MAX_HEADER:
        raise PacketLimitError(f"packet header is {header_len} bytes, over the limit of {MAX_HEADER}")
    return header_len


def parse_head(data: bytes) -> NeedMore | Head:
    """Incremental head parser for a packet arriving in pieces (the broker's path).

    Given the bytes received so far (a prefix of the packet), return NeedMore(n) if the head is not complete
    (n = bytes needed in total so far as known), or the parsed Head. Limits are checked as soon as the length
    prefix is in, so a hostile length costs nothing. The signature is not checked: call `Head.verify`.
    """
    if len(data) < PREFIX_SIZE:
        if data[: len(MAGIC)] != MAGIC[: min(len(data), len(MAGIC))]:
            raise PacketFormatError("not a valise packet (bad magic)")
        if len(data) > len(MAGIC) and data[len(MAGIC)] != VERSION:
            raise PacketVersionError(f"packet version {data[len(MAGIC)]} is not supported (expected {VERSION})")
        return NeedMore(PREFIX_SIZE)
    header_len = parse_prefix(data[:PREFIX_SIZE])
    head_size = PREFIX_SIZE + header_len + SIGNATURE_SIZE
    if len(data) < head_size:
        return NeedMore(head_size)
    header = Header.parse(bytes(data[PREFIX_SIZE : PREFIX_SIZE + header_len]))
    return Head(header, bytes(data[PREFIX_SIZE + header_len : head_size]), head_size)


class CiphertextHasher:
    """Checks that streamed ciphertext has exactly the signed length and SHA-256 (for a relay without K)."""

    __slots__ = ("_hash", "_header", "received")

    def __init__(self, header: Header) -> None:
        self._header = header
        self._hash = hashlib.sha256()
        self.received = 0

    def update(self, data: bytes | memoryview) -> None:
        if self.received + len(data) > self._header.ct_len:
            raise TrailingDataError(f"more than the {self._header.ct_len} ciphertext bytes the header states")
        self._hash.update(data)
        self.received += len(data)

    def finish(self) -> None:
        if self.received != self._header.ct_len:
            raise TruncatedError(f"ciphertext ends after {self.received} of {self._header.ct_len} bytes")
        if self._hash.digest() != self._header.ct_sha256:
            raise PayloadError("ciphertext does not match the SHA-256 in the signed header")
