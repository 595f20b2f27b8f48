"""Differential tests of the packet header fast path against the checked parsers.

`format._fast_header` and `format._fast_core` answer "valid, and here it is" or None; on None the checked parsers
(`_parse_header`, `_parse_core`) run and name the fault. The security rule: the fast path never accepts what the
checked parser refuses, and when it accepts it returns exactly what the checked parser returns (same values of
the same types: `True == 1` and `1.0 == 1` in Python, so plain `==` on the NamedTuples would not do).

The inputs are structured: valid headers (generated, or the spec's vectors), then changed by meaning (field
values of the wrong type or just out of range, keys added, dropped or renamed, recipients and stanzas
reordered, repeated or dropped, labels broken) and by encoding (every msgpack form that decodes to an equal
value: wider integers, str8 for a fixstr, bin16 for bin8, map16, unsorted or repeated keys, bin for str and str
for bin, bool for 1, float for an integer, zero-length ext), then sometimes by a byte (trailing, cut, poked).
Random byte changes rarely reach these; single-byte changes of one header are in tests/test_packet.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valise import encoding
from valise.crypto import padding, stream
from valise.errors import PacketError
from valise.labels import TLP_LEVELS
from valise.packet import format as fmt

VECTORS = sorted((Path(__file__).resolve().parent.parent / "specs" / "vectors").glob("packet-*.json"))

# Deterministic and quick: a fixed derivation of examples, no example database, no deadline (no timed asserts).
FAST = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=24,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the oracle -------------------------------------------------------------------------------------------------


def _typed(value: Any) -> Any:
    """`value` with the exact type of every part made explicit, so that True ≠ 1 and 1.0 ≠ 1 when compared."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value).__name__, tuple(_typed(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, tuple | list):
        return type(value).__name__, tuple(_typed(v) for v in value)
    return type(value).__name__, value


def _has_bin_key(raw: bytes) -> bool:
    """Whether `raw` decodes to something with a bin map key anywhere, the core carried as bytes included."""

    def walk(value: Any) -> bool:
        if isinstance(value, dict):
            return any(isinstance(k, bytes) or walk(v) for k, v in value.items())
        return isinstance(value, list) and any(walk(v) for v in value)

    try:
        value = msgpack.unpackb(raw)
    except Exception:
        return False
    core = value.get("core") if isinstance(value, dict) else None
    return walk(value) or (isinstance(core, bytes) and _has_bin_key(core))


def _differ(fast: Callable[[bytes], object], checked: Callable[[bytes], object], raw: bytes) -> str:
    """Run both parsers on `raw`; fail on any disagreement the security rule forbids; say what happened.

    The fast path may only answer or hand over (it must not raise), and must hand over whatever the checked
    parser refuses. The checked parser refuses with a PacketError, except for the one known fault pinned by
    `test_bin_map_keys_are_refused_with_a_packet_error` (a TypeError on a map with a bin key); any other
    exception escapes and fails the test."""
    answer = fast(raw)
    try:
        reference = checked(raw)
    except PacketError:
        assert answer is None, f"fast path accepted what the checked parser refuses: {raw.hex()}"
        return "refused"
    except TypeError:
        if not _has_bin_key(raw):
            raise
        assert answer is None, f"fast path accepted what the checked parser refuses: {raw.hex()}"
        return "refused (TypeError)"
    if answer is None:
        return "handed over"  # safe (only slower); the property test still requires it never to happen
    assert _typed(answer) == _typed(reference), f"fast path returned other values: {raw.hex()}"
    return "accepted"


def _check_header(raw: bytes) -> str:
    outcome = _differ(fmt._fast_header, fmt._parse_header, raw)
    if not outcome.startswith("refused"):  # anything accepted is canonical (the spec's rule) and re-encodes to itself
        header = fmt._parse_header(raw)
        assert encoding.unpack(raw, what="header", max_size=fmt.MAX_HEADER)["core"] == header.core.raw
        encoding.unpack(header.core.raw, what="core", max_size=fmt.MAX_CORE)
        assert fmt.Header.encode(header.core, header.ct_len, header.ct_sha256, header.key_commit, header.stanzas) == raw
    return outcome


def _check_core(raw: bytes) -> str:
    outcome = _differ(fmt._fast_core, fmt._parse_core, raw)
    if not outcome.startswith("refused"):
        assert encoding.unpack(raw, what="core", max_size=fmt.MAX_CORE) is not None
    return outcome


# --- msgpack encoder with every non-canonical form ---------------------------------------------------------------

_INT_FORMS = (
    (0xCC, ">B", 0, 2**8),
    (0xCD, ">H", 0, 2**16),
    (0xCE, ">I", 0, 2**32),
    (0xCF, ">Q", 0, 2**64),
    (0xD0, ">b", -(2**7), 2**7),
    (0xD1, ">h", -(2**15), 2**15),
    (0xD2, ">i", -(2**31), 2**31),
    (0xD3, ">q", -(2**63), 2**63),
)
# Length headers: (fix prefix, fix limit) and (code, struct format, limit) for the 8/16/32-bit forms.
_LEN_FORMS: dict[str, tuple[tuple[int, int] | None, tuple[tuple[int, str, int], ...]]] = {
    "str": ((0xA0, 32), ((0xD9, ">B", 2**8), (0xDA, ">H", 2**16), (0xDB, ">I", 2**32))),
    "bin": (None, ((0xC4, ">B", 2**8), (0xC5, ">H", 2**16), (0xC6, ">I", 2**32))),
    "array": ((0x90, 16), ((0xDC, ">H", 2**16), (0xDD, ">I", 2**32))),
    "map": ((0x80, 16), ((0xDE, ">H", 2**16), (0xDF, ">I", 2**32))),
}


def _int_forms(n: int) -> list[bytes]:
    forms = [bytes((n & 0xFF,))] if -32 <= n < 128 else []
    return forms + [bytes((code,)) + struct.pack(f, n) for code, f, lo, hi in _INT_FORMS if lo <= n < hi]


def _len_forms(kind: str, n: int) -> list[bytes]:
    fix, sized = _LEN_FORMS[kind]
    forms = [bytes((fix[0] | n,))] if fix is not None and n < fix[1] else []
    return forms + [bytes((code,)) + struct.pack(f, n) for code, f, limit in sized if n < limit]


def _const(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8


def _key_bytes(key: str | bytes) -> bytes:
    return _utf8(key) if isinstance(key, str) else key


class Encoder:
    """msgpack encoder; `plan` maps a node's pre-order number to the non-canonical form to use there."""

    def __init__(self, plan: dict[int, int]) -> None:
        self.plan = plan
        self.node = 0

    def encode(self, value: Any) -> bytes:
        choice = self.plan.get(self.node)
        self.node += 1
        if choice is not None:
            forms = self._other_forms(value)
            if forms:
                return forms[choice % len(forms)]()
        return self._canonical(value)

    def _canonical(self, value: Any) -> bytes:
        if value is None or isinstance(value, bool):
            return {None: b"\xc0", False: b"\xc2", True: b"\xc3"}[value]
        if isinstance(value, int):  # the first form that fits is the shortest, as msgpack writes it; past 64 bits
            return (_int_forms(value) or [b"\xcb" + struct.pack(">d", value)])[0]  # (a change made one) a float
        if isinstance(value, float):
            return b"\xcb" + struct.pack(">d", value)
        if isinstance(value, str):
            return _len_forms("str", len(_utf8(value)))[0] + _utf8(value)
        if isinstance(value, bytes):
            return _len_forms("bin", len(value))[0] + value
        if isinstance(value, msgpack.ExtType):
            return msgpack.packb(value)
        if isinstance(value, list):
            return self._array(value, 0)
        if isinstance(value, dict):
            return self._map(list(value.items()), 0)
        raise TypeError(type(value))

    def _array(self, items: list[Any], form: int) -> bytes:
        return _len_forms("array", len(items))[form] + b"".join(self.encode(v) for v in items)

    def _map(self, items: list[tuple[Any, Any]], form: int, *, order: bool = True, count: int | None = None) -> bytes:
        if order:
            items = sorted(items, key=lambda kv: _key_bytes(kv[0]))
        head = _len_forms("map", len(items) if count is None else count)[form]
        return head + b"".join(self.encode(k) + self.encode(v) for k, v in items)

    def _other_forms(self, value: Any) -> list[Callable[[], bytes]]:
        """Every other encoding of a value that decodes to something equal (or nearly so) in Python."""
        canonical = self._canonical
        if value is None:
            return [lambda: b"\xc2"]  # false
        if isinstance(value, bool):
            return [lambda: _int_forms(int(value))[0], lambda: b"\xcb" + struct.pack(">d", float(value))]
        if isinstance(value, int):
            forms = [_const(f) for f in _int_forms(value)[1:]]
            if float(value) == value:
                forms.append(lambda: b"\xcb" + struct.pack(">d", float(value)))
                if abs(value) < 2**24:
                    forms.append(lambda: b"\xca" + struct.pack(">f", float(value)))
            if value in (0, 1):
                forms.append(lambda: b"\xc3" if value else b"\xc2")
            return forms
        if isinstance(value, float):
            forms = []
            if struct.unpack(">f", struct.pack(">f", value))[0] == value:
                forms.append(lambda: b"\xca" + struct.pack(">f", value))
            if value.is_integer() and -(2**63) <= value < 2**64:
                forms.append(lambda: _int_forms(int(value))[0])
            return forms
        if isinstance(value, str):
            data = _utf8(value)
            return [_const(h + data) for h in _len_forms("str", len(data))[1:] + _len_forms("bin", len(data))[:1]]
        if isinstance(value, bytes):
            heads = _len_forms("bin", len(value))[1:]
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                heads.append(_len_forms("str", len(value))[0])
            return [_const(h + value) for h in heads]
        if isinstance(value, msgpack.ExtType):
            return [lambda: b"\xc7" + bytes((len(value.data),)) + struct.pack(">b", value.code) + value.data]
        if isinstance(value, list):
            return [functools.partial(self._array, value, i) for i in range(1, len(_len_forms("array", len(value))))]
        if isinstance(value, dict):
            items = sorted(value.items(), key=lambda kv: _key_bytes(kv[0]))
            forms = [functools.partial(self._map, items, i) for i in range(1, len(_len_forms("map", len(items))))]
            if len(items) > 1:
                forms.append(lambda: self._map(items[::-1], 0, order=False))
                forms.append(lambda: self._map(items[1:] + items[:1], 0, order=False))
            if items:
                first = items[0]
                forms.append(lambda: self._map([*items, first], 0, order=False))  # a key twice, same value
                forms.append(lambda: self._map([(first[0], None), *items], 0, order=False))  # twice, last wins
                forms.append(lambda: self._map(items, 0, count=len(items) + 1) + canonical("zz") + canonical(0))
                if isinstance(first[0], str):  # the key as bin
                    forms.append(lambda: self._map([(_utf8(first[0]), first[1]), *items[1:]], 0))
            return forms
        return []


def count_nodes(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(count_nodes(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(count_nodes(k) + count_nodes(v) for k, v in value.items())
    return 1


# --- valid headers -------------------------------------------------------------------------------------------------

LOWER, DIGITS = "abcdefghijklmnopqrstuvwxyz", "0123456789"
ID_CHARS = LOWER + LOWER.upper() + DIGITS + "._-"
member_ids = st.one_of(
    st.sampled_from(["DEU", "FRA", "ITA", "NGA", "ACME", "a", "Z", "a.b-c_d", "9" * 64]),
    st.text(ID_CHARS, min_size=1, max_size=12),
)
# Built from parts rather than with st.from_regex, which would be most of this file's run time.
categories = st.builds(
    lambda first, rest, words: "-".join([first + rest, *words])[:32].rstrip("-"),
    st.sampled_from(LOWER),
    st.text(LOWER + DIGITS, max_size=8),
    st.lists(st.text(LOWER + DIGITS, min_size=1, max_size=5), max_size=2),
)
operations = st.text(ID_CHARS, min_size=1, max_size=64)
content_types = st.sampled_from(
    ["application/octet-stream", "application/stix+json;version=2.1", "text/plain", "a/b;x=y", "x/" + "y" * 126]
)
STANZA_TYPES = ["X25519-HPKE-v1", "MLKEM768-X25519-v0", "PQ", "a", "Z.+-9", "T" * 32]


def _ct_len(payload: int) -> int:
    return stream.ciphertext_size(padding.padded_size(payload))


@st.composite
def valid_models(draw: st.DrawFn) -> dict[str, Any]:
    """A valid header as Python values, its core as a map (encoded later, maybe non-canonically)."""
    to = sorted(draw(st.lists(member_ids, min_size=1, max_size=4, unique=True)))
    created = draw(st.integers(0, 2**63 - 2))
    expires = draw(st.one_of(st.integers(created + 1, min(created + 10**6, 2**63 - 1)), st.just(2**63 - 1)))
    labels = {
        "tlp": draw(st.sampled_from([level.label for level in TLP_LEVELS])),
        "categories": sorted(draw(st.lists(categories, max_size=3, unique=True))),
        "operation": draw(st.one_of(st.none(), operations)),
        "content_type": draw(content_types),
    }
    core = {
        "v": fmt.VERSION,
        "id": draw(st.binary(min_size=16, max_size=16)),
        "created": created,
        "expires": expires,
        "from": draw(member_ids),
        "to": to,
        "labels": labels,
    }
    stanzas = []
    for recipient in to:
        for kind in sorted(draw(st.lists(st.sampled_from(STANZA_TYPES), min_size=1, max_size=2, unique=True))):
            size = fmt.X25519_STANZA_BODY if kind == fmt.X25519_STANZA else draw(st.integers(0, 40))
            stanzas.append({"type": kind, "to": recipient, "body": draw(st.binary(min_size=size, max_size=size))})
    payload = draw(st.one_of(st.integers(0, 10**7), st.just(fmt.MAX_PAYLOAD)))
    return {
        "core": core,
        "ct_len": _ct_len(payload),
        "ct_sha256": draw(st.binary(min_size=32, max_size=32)),
        "key_commit": draw(st.binary(min_size=32, max_size=32)),
        "stanzas": stanzas,
    }


def _vector_model(path: Path) -> dict[str, Any]:
    header = msgpack.unpackb(bytes.fromhex(json.loads(path.read_text())["expected"]["header"]))
    return {**header, "core": msgpack.unpackb(header["core"])}


VECTOR_MODELS = [_vector_model(p) for p in VECTORS]


# --- changes by meaning --------------------------------------------------------------------------------------------

GENERIC: list[Any] = [None, True, False, 0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 1.0, 0.5, "", "x", b""]
GENERIC += [b"x", [], [1], {}, {"a": 1}, msgpack.ExtType(1, b""), msgpack.ExtType(5, b"ab"), [[[[]]]]]


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def _near(old: Any) -> list[Any]:
    """Values close to `old`: the same thing of another type, or just outside a limit."""
    if isinstance(old, bool):
        return [int(old), float(old), not old]
    if isinstance(old, int):
        near = [old + 1, old - 1, -old, old * 2, float(old), str(old), (old % 2**64).to_bytes(8, "big")]
        if old in (0, 1):
            near.append(bool(old))
        return [n for n in near if not isinstance(n, int) or -(2**63) <= n < 2**64]
    if isinstance(old, str):
        return [
            old + " ",
            " " + old,
            old.upper(),
            old.lower(),
            old[:-1],
            old * 2,
            old + "\x00",
            old + "\n",
            old + "\ud800",
            old + "é",
            unicodedata.normalize("NFD", old + "é"),
            _fullwidth(old),
            "\u212a" + old,  # KELVIN SIGN, which some case-insensitive matchers take for K
            "\u0430" + old[1:],  # Cyrillic a
            old[:1] * 64,
            old[:1] * 65,
            _utf8(old),
        ]
    if isinstance(old, bytes):
        return [old[:-1], old + b"\x00", bytes(len(old)), old * 2, old.decode("latin-1"), list(old[:2])]
    if isinstance(old, list):
        return [[], old[::-1], old + old[:1], old[:1] + old, [old], old[:-1], [*old, None], [*old, [*old]]]
    if isinstance(old, dict):
        return [{}, list(old), {**old, "x": 1}, dict(list(old.items())[1:])]
    return []


def _maps(model: dict[str, Any]) -> list[dict[Any, Any]]:
    """Every map of the model: the header, the core, the labels and each stanza (as far as they still exist)."""
    found = [model]
    core = model.get("core")
    if isinstance(core, dict):
        found.append(core)
        if isinstance(core.get("labels"), dict):
            found.append(core["labels"])
    if isinstance(model.get("stanzas"), list):
        found += [s for s in model["stanzas"] if isinstance(s, dict)]
    return found


def _pick_map(model: dict[str, Any], draw: st.DrawFn) -> dict[Any, Any]:
    maps = _maps(model)
    return maps[draw(st.integers(0, len(maps) - 1))]


def _pick_key(m: dict[Any, Any], draw: st.DrawFn) -> Any:
    keys = sorted(m, key=_key_bytes)
    return keys[draw(st.integers(0, len(keys) - 1))] if keys else None


def _core(model: dict[str, Any]) -> dict[str, Any]:
    core = model.get("core")
    return core if isinstance(core, dict) else {}


def _labels(model: dict[str, Any]) -> dict[str, Any]:
    labels = _core(model).get("labels")
    return labels if isinstance(labels, dict) else {}


def _stanzas(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The stanzas, if they are still a list of maps with their three fields, else none."""
    stanzas = model.get("stanzas")
    if isinstance(stanzas, list) and all(isinstance(s, dict) and {"to", "type", "body"} <= set(s) for s in stanzas):
        return stanzas
    return []


def _stanza_for(recipient: str, kind: str = fmt.X25519_STANZA) -> dict[str, Any]:
    size = fmt.X25519_STANZA_BODY if kind == fmt.X25519_STANZA else 3
    return {"type": kind, "to": recipient, "body": bytes(size)}


def _sort_stanzas(model: dict[str, Any]) -> None:
    current = _stanzas(model)  # left alone unless they are all maps with text recipients and types
    if current and all(isinstance(s["to"], str) and isinstance(s["type"], str) for s in current):
        model["stanzas"] = sorted(current, key=lambda s: (s["to"], s["type"]))


def _to(model: dict[str, Any]) -> list[Any]:
    to = _core(model).get("to")
    return to if isinstance(to, list) else []


Edit = Callable[[dict[str, Any], st.DrawFn], None]
EDITS: dict[str, Edit] = {}  # each breaks one rule (or, under "edge:", reaches a limit and stays valid)


def edit(name: str) -> Callable[[Edit], Edit]:
    def register(f: Edit) -> Edit:
        EDITS[name] = f
        return f

    return register


def _set(where: Callable[[dict[str, Any]], dict[Any, Any]], key: str, values: list[Any]) -> Edit:
    """An edit that sets `key` of the map `where` picks to one of `values` (when that map has the key)."""

    def change(model: dict[str, Any], draw: st.DrawFn) -> None:
        m = where(model)
        if key in m:
            m[key] = draw(st.sampled_from(values))

    return change


def _header(model: dict[str, Any]) -> dict[str, Any]:
    return model


def _first_stanza(model: dict[str, Any]) -> dict[str, Any]:
    stanzas = _stanzas(model)
    return stanzas[0] if stanzas else {}


BIGGEST_CT = _ct_len(fmt.MAX_PAYLOAD)
# Same value, other msgpack type (True == 1 and 1.0 == 1 in Python), and near-miss values, field by field.
FIELD_VALUES: list[tuple[Callable[[dict[str, Any]], dict[Any, Any]], str, list[Any]]] = [
    (_core, "v", [True, 1.0, 0, 2, -1, "1", b"\x01", [1]]),
    (_core, "id", [bytes(15), bytes(17), "0" * 16, [0] * 16, b""]),
    (_core, "created", [True, 0.0, 1.5, "0", -1, -(2**63)]),
    (_core, "expires", [1.7e9, True, 2**63, 2**64 - 1, "1790003600"]),
    (_core, "from", [b"DEU", "", "D" * 65, "D EU", "DEU\n", "DÉU", "ＤＥＵ", "\u212aEU", "DE\x00", ["DEU"], None]),
    (_core, "to", [[], "DEU", ["DEU", ["ITA"]], [b"DEU"], [""], ["D" * 65], [None]]),
    (_core, "labels", [[], None, {}, "RED"]),
    (_header, "core", ["core", [], {}, None, b""]),
    (_header, "ct_len", [float(BIGGEST_CT), True, 0, -1, BIGGEST_CT + 1, fmt.MAX_CIPHERTEXT + 1, "17"]),
    (_header, "ct_sha256", [bytes(31), bytes(33), "0" * 32, b"", [0] * 32]),
    (_header, "key_commit", [bytes(31), bytes(33), "0" * 32, b"", None]),
    (_header, "stanzas", [None, {}, "x", [None], [[]], [[fmt.X25519_STANZA, "DEU", bytes(80)]]]),
    (_first_stanza, "type", [b"X25519-HPKE-v1", "", "T" * 33, "a b", "X25519-HPKE-v1\n", "é", 1, None]),
    (_first_stanza, "to", [b"DEU", "", 5, None, "D EU"]),
    (_first_stanza, "body", ["x" * 80, bytes(79), bytes(81), None, [0] * 80]),
    (_labels, "tlp", ["red", "TLP:RED", "AMBER_STRICT", "WHITE", b"RED", 4, None, ["RED"]]),
    (_labels, "operation", ["", "O" * 65, "OP 1", "OP\n", "ÖP", b"OP", False, 0, []]),
    (_labels, "content_type", ["", "Text/Plain", "text/plain ", "a/" + "b" * 127, b"text/plain", None]),
    (
        _labels,
        "categories",
        [
            ["b", "a"],
            ["a", "a"],
            [f"c{i:02d}" for i in range(17)],
            ["a" * 33],
            ["Malware"],
            ["mal ware"],
            ["-x"],
            ["x-"],
            [b"malware"],
            [["malware"]],
            "malware",
            None,
        ],
    ),
]
for where, key, values in FIELD_VALUES:
    edit(f"{where.__name__.strip('_')}.{key}")(_set(where, key, values))


@edit("map key dropped")
def drop_key(model: dict[str, Any], draw: st.DrawFn) -> None:
    m = _pick_map(model, draw)
    key = _pick_key(m, draw)
    if key is not None:
        del m[key]


@edit("map key added")
def add_key(model: dict[str, Any], draw: st.DrawFn) -> None:
    m = _pick_map(model, draw)
    m[draw(st.sampled_from(["x", "", "zz", "A", "v2", "é", b"to", b"v", "\x00"]))] = draw(st.sampled_from(GENERIC))


@edit("map key renamed")
def rename_key(model: dict[str, Any], draw: st.DrawFn) -> None:
    m = _pick_map(model, draw)
    key = _pick_key(m, draw)
    if isinstance(key, str):
        new = draw(st.sampled_from([k for k in _near(key) if isinstance(k, str | bytes) and k not in m] or ["x"]))
        m[new] = m.pop(key)


@edit("any value")
def replace_value(model: dict[str, Any], draw: st.DrawFn) -> None:
    m = _pick_map(model, draw)
    key = _pick_key(m, draw)
    if key is not None:
        m[key] = draw(st.sampled_from(_near(m[key]) + GENERIC))


@edit("times")
def times(model: dict[str, Any], draw: st.DrawFn) -> None:
    core = _core(model)
    created, expires = core.get("created"), core.get("expires")
    pairs = [(expires, expires), (expires, created), (-1, expires), (created, 2**63), (0, 0), (2**63 - 1, 2**63)]
    core["created"], core["expires"] = draw(st.sampled_from(pairs))


@edit("ct_len")
def ct_len(model: dict[str, Any], draw: st.DrawFn) -> None:
    old = model.get("ct_len")
    base = old if type(old) is int else 17
    model["ct_len"] = draw(st.sampled_from([base + 1, base - 1, base + 16, base - 16, _ct_len(fmt.MAX_PAYLOAD + 1)]))


@edit("recipient added without a stanza")
def recipient_bare(model: dict[str, Any], draw: st.DrawFn) -> None:
    core, new = _core(model), draw(member_ids)
    if new not in _to(model):
        core["to"] = sorted([*_to(model), new])


@edit("recipient dropped, stanza kept")
def recipient_dropped(model: dict[str, Any], draw: st.DrawFn) -> None:
    to = _to(model)
    if to:
        del to[draw(st.integers(0, len(to) - 1))]


@edit("recipients swapped")
def recipients_swapped(model: dict[str, Any], draw: st.DrawFn) -> None:
    to = _to(model)
    if len(to) > 1:
        to[0], to[1] = to[1], to[0]
    else:
        recipient_repeated(model, draw)


@edit("recipient repeated")
def recipient_repeated(model: dict[str, Any], draw: st.DrawFn) -> None:
    to = _to(model)
    if to:
        i = draw(st.integers(0, len(to) - 1))
        to.insert(i, to[i])


@edit("257 recipients")
def recipients_257(model: dict[str, Any], draw: st.DrawFn) -> None:
    _core(model)["to"] = [f"m{i:03d}" for i in range(fmt.MAX_RECIPIENTS + 1)]
    model["stanzas"] = [_stanza_for(r) for r in _core(model)["to"]]


@edit("stanzas shuffled")
def stanzas_shuffled(model: dict[str, Any], draw: st.DrawFn) -> None:
    stanzas = _stanzas(model)
    if len(stanzas) > 1:
        model["stanzas"] = draw(st.permutations(stanzas).filter(lambda p: p != stanzas))
    else:
        stanza_repeated(model, draw)


@edit("stanza repeated")
def stanza_repeated(model: dict[str, Any], draw: st.DrawFn) -> None:
    stanzas = _stanzas(model)
    if stanzas:
        i = draw(st.integers(0, len(stanzas) - 1))
        stanzas.insert(i, dict(stanzas[i]))


@edit("stanza dropped")
def stanza_dropped(model: dict[str, Any], draw: st.DrawFn) -> None:
    stanzas = _stanzas(model)
    if stanzas:
        del stanzas[draw(st.integers(0, len(stanzas) - 1))]


@edit("stanza for a stranger")
def stanza_stranger(model: dict[str, Any], draw: st.DrawFn) -> None:
    stranger = draw(member_ids)
    if stranger not in _to(model) and _stanzas(model):
        _stanzas(model).append(_stanza_for(stranger))
        _sort_stanzas(model)


def _crowd(model: dict[str, Any], extra: int) -> None:
    """Stanzas of new types until every recipient holds as many as allowed (4), and `extra` more for the first."""
    stanzas, to = _stanzas(model), _to(model)
    if stanzas and to and all(isinstance(s["to"], str) for s in stanzas):
        holders = [s["to"] for s in stanzas]
        for r in dict.fromkeys(holders):  # each holder once, in order
            more = fmt.MAX_STANZAS_PER_RECIPIENT - holders.count(r) + (extra if r == holders[0] else 0)
            for j in range(more):
                stanzas.append(_stanza_for(r, f"T{j:02d}"))
        _sort_stanzas(model)


@edit("one stanza too many")
def stanzas_over(model: dict[str, Any], draw: st.DrawFn) -> None:
    _crowd(model, 1)


@edit("stanza body over the limit")
def body_over(model: dict[str, Any], draw: st.DrawFn) -> None:
    stanzas = _stanzas(model)
    others = [s for s in stanzas if s["type"] != fmt.X25519_STANZA] or stanzas[:1]
    for s in others[:1]:
        s["type"], s["body"] = ("PQ" if s["type"] == fmt.X25519_STANZA else s["type"]), bytes(fmt.MAX_STANZA_BODY + 1)
        _sort_stanzas(model)


@edit("X25519 body one byte off")
def x25519_body(model: dict[str, Any], draw: st.DrawFn) -> None:
    for s in _stanzas(model)[:1]:
        s["type"], s["body"] = fmt.X25519_STANZA, bytes(fmt.X25519_STANZA_BODY + draw(st.sampled_from([-1, 1])))
        _sort_stanzas(model)


# Edges: each reaches a limit and keeps the header valid, so both parsers must take it, to the same values.


@edit("edge: times")
def edge_times(model: dict[str, Any], draw: st.DrawFn) -> None:
    pairs = [(0, 1), (0, 2**63 - 1), (2**63 - 2, 2**63 - 1)]
    _core(model)["created"], _core(model)["expires"] = draw(st.sampled_from(pairs))


@edit("edge: ct_len")
def edge_ct_len(model: dict[str, Any], draw: st.DrawFn) -> None:
    model["ct_len"] = draw(st.sampled_from([_ct_len(0), BIGGEST_CT, _ct_len(65535), _ct_len(65536)]))


@edit("edge: labels")
def edge_labels(model: dict[str, Any], draw: st.DrawFn) -> None:
    labels = _labels(model)
    field, value = draw(
        st.sampled_from(
            [
                ("categories", sorted(f"{c}{i:02d}" + "x" * 29 for i, c in enumerate("abcdefghijklmnop"))),
                ("operation", "O" * 64),
                ("operation", "._-"),
                ("content_type", "a/" + "b" * 126),
                ("content_type", "a/b;c=d;e=f+g"),
                ("tlp", "AMBER+STRICT"),
            ]
        )
    )
    labels[field] = value


@edit("edge: 256 recipients")
def edge_256(model: dict[str, Any], draw: st.DrawFn) -> None:
    _core(model)["to"] = [f"m{i:03d}" for i in range(fmt.MAX_RECIPIENTS)]
    model["stanzas"] = [_stanza_for(r) for r in _core(model)["to"]]


@edit("edge: long ids, the sender a recipient")
def edge_ids(model: dict[str, Any], draw: st.DrawFn) -> None:
    _core(model)["from"] = "F" * 64
    _core(model)["to"] = sorted({"F" * 64, "t" * 64, "-", "."})
    model["stanzas"] = [_stanza_for(r) for r in _core(model)["to"]]


@edit("edge: all the stanzas allowed")
def edge_stanzas(model: dict[str, Any], draw: st.DrawFn) -> None:
    _crowd(model, 0)


@edit("edge: stanza bodies of 0 and 4096 bytes")
def edge_bodies(model: dict[str, Any], draw: st.DrawFn) -> None:
    stanzas = _stanzas(model)
    if stanzas and isinstance(stanzas[0]["to"], str):
        stanzas += [{"type": "T0", "to": stanzas[0]["to"], "body": bytes(fmt.MAX_STANZA_BODY)}]
        stanzas += [{"type": "T1", "to": stanzas[0]["to"], "body": b""}]
        _sort_stanzas(model)


@edit("edge: new recipient with a stanza")
def edge_recipient(model: dict[str, Any], draw: st.DrawFn) -> None:
    new = draw(member_ids)
    if new not in _to(model) and _stanzas(model):
        _core(model)["to"] = sorted([*_to(model), new])
        _stanzas(model).append(_stanza_for(new, draw(st.sampled_from(STANZA_TYPES))))
        _sort_stanzas(model)


BREAKS = sorted(name for name in EDITS if not name.startswith("edge:"))
EDGES = sorted(name for name in EDITS if name.startswith("edge:"))


# --- whole cases -----------------------------------------------------------------------------------------------


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


@dataclasses.dataclass
class Case:
    header: bytes
    core: bytes | None  # None when the core is no longer a map of its own
    changes: list[str]


def _encode(value: Any, deviations: int, draw: st.DrawFn) -> bytes:
    nodes = count_nodes(value)
    plan = {draw(st.integers(0, nodes - 1)): draw(st.integers(0, 15)) for _ in range(deviations)}
    return Encoder(plan).encode(value)


def _poke(raw: bytes, draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["trail", "cut", "poke"]))
    if how == "trail":
        return raw + draw(st.sampled_from([b"\x00", b"\xc0", b"\x90"]))
    if how == "cut":
        return raw[:-1]
    i = draw(st.integers(0, len(raw) - 1))
    return raw[:i] + bytes((draw(st.integers(0, 255)),)) + raw[i + 1 :]


ENCODINGS = ["core encoding", "header encoding", "core bytes", "header bytes"]
BREAKS += ENCODINGS


@st.composite
def cases(draw: st.DrawFn, first: str | None) -> Case:
    """A valid header (generated, or a vector's) changed by the named edit `first` (None: left as it is),
    sometimes with one or two more changes of any kind, then encoded (a change may make that non-canonical)."""
    model = _copy(draw(st.one_of(valid_models(), st.sampled_from(VECTOR_MODELS))))
    changes = [] if first is None else [first]
    if first in BREAKS:
        changes += draw(st.lists(st.sampled_from(BREAKS + EDGES), max_size=draw(st.sampled_from([0, 0, 2]))))
    for name in changes:
        if name in EDITS:
            EDITS[name](model, draw)
    core = None
    if isinstance(model.get("core"), dict):
        core = _encode(model["core"], changes.count("core encoding"), draw)
        for _ in range(changes.count("core bytes")):
            core = _poke(core, draw)
        model["core"] = core
    header = _encode(model, changes.count("header encoding"), draw)
    for _ in range(changes.count("header bytes")):
        header = _poke(header, draw)
    return Case(header, core, changes)


@pytest.mark.parametrize("first", [None, *BREAKS, *EDGES])
def test_fast_path_agrees_with_checked_parsers(first: str | None) -> None:
    """Per edit (so that each gets its share of examples, and a failure names it): every header it makes gets
    the same answer from both paths; one that breaks a rule is refused at least once; valid ones are taken,
    by the fast path (it may hand a valid header over, which is only slower, but should not)."""
    outcomes: Counter[str] = Counter()

    @FAST
    @given(cases(first))
    def check(case: Case) -> None:
        outcome = _check_header(case.header)
        if case.core is not None:
            _check_core(case.core)
        if all(change in EDGES for change in case.changes):  # valid by construction
            assert outcome == "accepted", (case.changes, case.header.hex())
        outcomes[outcome.split()[0]] += 1

    check()
    if first in BREAKS:
        assert outcomes["refused"] > 0, outcomes
    assert outcomes["handed"] == 0, outcomes


# --- known answers and limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_vectors_take_the_fast_path_to_the_checked_result(path: Path) -> None:
    vector = json.loads(path.read_text())
    expected = vector["expected"]
    raw, core_raw = bytes.fromhex(expected["header"]), bytes.fromhex(expected["core"])
    assert _check_header(raw) == "accepted"
    assert _check_core(core_raw) == "accepted"
    header = fmt._fast_header(raw)
    assert header is not None
    assert header.core.raw == core_raw
    assert header.core.packet_id.hex() == expected["packet_id"]
    assert (header.core.sender, list(header.core.recipients)) == (vector["sender"], vector["to"])
    assert (header.core.created, header.core.expires) == (vector["now"], vector["expires"])
    labels = header.core.labels.to_map()
    assert (labels["tlp"], labels["operation"]) == (vector["tlp"], vector["operation"])
    assert labels["categories"] == sorted(vector["categories"])  # the vector lists them as given to seal
    if vector["content_type"] is not None:  # None: sniffed from the payload
        assert labels["content_type"] == vector["content_type"]
    assert header.key_commit.hex() == expected["key_commitment"]
    assert [s.recipient for s in header.stanzas] == vector["to"]
    signature = bytes.fromhex(expected["signature"])
    head = fmt.parse_head(fmt.MAGIC + bytes((fmt.VERSION,)) + len(raw).to_bytes(4, "big") + raw + signature)
    assert isinstance(head, fmt.Head)
    assert _typed(head.header) == _typed(fmt._parse_header(raw))
    assert head.total_size == expected["packet_size"]


def _header_of_size(size: int) -> bytes:
    """A valid header of exactly `size` bytes: recipients each with an X25519 stanza and one of 4096 bytes,
    as many as it takes, then large bodies cut down to fit (each keeps its 3-byte bin16 header)."""
    core = VECTOR_MODELS[0]["core"]

    def model(n: int) -> dict[str, Any]:
        to = [f"m{i:03d}" for i in range(n)]
        stanzas = [{"type": "PQ", "to": r, "body": bytes(fmt.MAX_STANZA_BODY)} for r in to]
        stanzas = sorted([*stanzas, *(_stanza_for(r) for r in to)], key=lambda s: (s["to"], s["type"]))
        return {**VECTOR_MODELS[0], "core": encoding.pack({**core, "to": to}), "stanzas": stanzas}

    one, two = len(encoding.pack(model(1))), len(encoding.pack(model(2)))
    m = model(1 + -(-(size - one) // (two - one)))
    over = len(encoding.pack(m)) - size
    for s in m["stanzas"]:
        cut = min(over, len(s["body"]) - 256) if s["type"] == "PQ" else 0
        s["body"] = s["body"][cut:]
        over -= cut
    raw = encoding.pack(m)
    assert len(raw) == size
    return raw


def test_header_size_limit_is_the_same_on_both_paths() -> None:
    assert _check_header(_header_of_size(fmt.MAX_HEADER)) == "accepted"
    assert _check_header(_header_of_size(fmt.MAX_HEADER + 1)) == "refused"


@pytest.mark.parametrize("depth", [1, 16, 17, 510, 511, 512, 1000, 1022, 1023, 1024, 5000])
def test_deeply_nested_values_are_refused_cleanly(depth: int) -> None:
    """Nesting where a list or map belongs: refused with a PacketError, the fast path handing over. msgpack
    before 1.2 re-encodes at most 511 levels but decodes up to 1024, so the re-encoding check itself can raise
    there; this pins that any such failure stays a refusal (and fails loudly if it does not)."""
    model = _copy(VECTOR_MODELS[0])
    base = encoding.pack({**model, "core": encoding.pack(model["core"]), "stanzas": []})
    assert base.endswith(b"\xa7stanzas\x90")
    assert _check_header(base[:-1] + b"\x91" * depth + b"\x90") == "refused"
    core = encoding.pack({**model["core"], "labels": []})
    assert core.count(b"\xa6labels\x90") == 1
    deep_core = core.replace(b"\xa6labels\x90", b"\xa6labels" + b"\x91" * depth + b"\x90")
    assert _check_core(deep_core) == "refused"


# A known fault of the checked parser (not of the fast path, which hands these over): msgpack lets a map key be
# bin as well as str, and `encoding.check_map`, which the checked parser calls to name a bad field, sorts and
# joins the unknown keys as text. A bin key next to a text one, or next to all the known fields, makes it raise
# TypeError instead of a PacketError, so a caller that refuses bad packets by catching `valise.errors.Error`
# (the broker's `relay.parse_submitted_head`, the node's delivery path) lets it escape.
BIN_KEY_CASES = {
    "header {'x': nil, b'y': nil}": (fmt.Header.parse, bytes.fromhex("82a178c0c40179c0")),
    "core {'x': nil, b'y': nil}": (fmt.Core.parse, bytes.fromhex("82a178c0c40179c0")),
    "valid header plus b'x'": (
        fmt.Header.parse,
        Encoder({}).encode({**VECTOR_MODELS[0], "core": encoding.pack(VECTOR_MODELS[0]["core"]), b"x": None}),
    ),
    "valid core plus b'x'": (fmt.Core.parse, Encoder({}).encode({**VECTOR_MODELS[0]["core"], b"x": None})),
    "stanza plus b'x'": (
        fmt.Header.parse,
        Encoder({}).encode(
            {
                **VECTOR_MODELS[0],
                "core": encoding.pack(VECTOR_MODELS[0]["core"]),
                "stanzas": [{**VECTOR_MODELS[0]["stanzas"][0], b"x": None}],
            }
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(BIN_KEY_CASES))
def test_bin_map_keys_are_refused_with_a_packet_error(name: str) -> None:
    parse, raw = BIN_KEY_CASES[name]
    assert fmt._fast_header(raw) is None
    assert fmt._fast_core(raw) is None
    with pytest.raises(PacketError):
        parse(raw)


def test_a_recipient_holding_more_than_four_stanzas_is_refused_even_when_the_total_fits() -> None:
    """specs/packet.md allows 4 stanzas per recipient; a total check alone (4 × recipients) let one recipient
    hold 7 while another held 1."""
    model = next(m for m in VECTOR_MODELS if len(m["core"]["to"]) >= 2)
    first, second = model["core"]["to"][:2]
    extra = [{"body": b"\x00" * 32, "to": first, "type": f"kem-{i}"} for i in range(6)]
    mine = [s for s in model["stanzas"] if s["to"] == first]
    others = [s for s in model["stanzas"] if s["to"] != first]
    stanzas = sorted(mine + extra, key=lambda s: (s["to"], s["type"])) + others
    raw = encoding.pack({**model, "core": encoding.pack(model["core"]), "stanzas": stanzas})
    assert fmt._fast_header(raw) is None
    with pytest.raises(PacketError, match=f"{first} holds more than 4 stanzas"):
        fmt.Header.parse(raw)
    assert second in {s["to"] for s in others}
