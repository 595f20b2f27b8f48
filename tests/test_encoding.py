"""Canonical msgpack (valise.encoding) against bytes written out by hand from the msgpack spec."""

from __future__ import annotations

from typing import Any

import pytest

from valise import encoding
from valise.errors import EncodingError


def _str(s: str) -> bytes:
    raw = s.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


def test_map_keys_go_in_utf8_byte_order() -> None:
    # UTF-8 byte order, which is code point order: U+FFFF sorts before U+1F600 (in UTF-16 it would be after).
    value = {"\U0001f600": 5, "b": 1, "\uffff": 6, "a": 2, "é": 3, "z": 4}
    expected = b"\x86" + b"".join(
        _str(k) + bytes([v]) for k, v in [("a", 2), ("b", 1), ("z", 4), ("é", 3), ("\uffff", 6), ("\U0001f600", 5)]
    )
    assert encoding.pack(value) == expected


def test_nested_maps_are_sorted_and_integers_take_their_shortest_form() -> None:
    value = {"z": [2**64 - 1, -(2**63), 127, -32, 128], "m": {"y": b"\x00", "x": None, "w": True}}
    expected = (
        b"\x82"
        + _str("m")
        + b"\x83"
        + _str("w")
        + b"\xc3"
        + _str("x")
        + b"\xc0"
        + _str("y")
        + b"\xc4\x01\x00"
        + _str("z")
        + b"\x95"
        + b"\xcf"
        + b"\xff" * 8
        + b"\xd3\x80"
        + b"\x00" * 7
        + b"\x7f"
        + b"\xe0"
        + b"\xcc\x80"
    )
    assert encoding.pack(value) == expected


def _nest(depth: int) -> Any:
    value: Any = b"leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (1.5, "type float"),
        ({1: b""}, "map key 1 is not text"),
        ({b"k": b""}, "is not text"),
        (2**64, "does not fit in 64 bits"),
        (-(2**63) - 1, "does not fit in 64 bits"),
        (_nest(encoding.MAX_DEPTH + 1), "nests deeper"),
        ({"k": {1, 2}}, "type set"),
    ],
)
def test_what_has_no_canonical_form_is_refused_with_its_reason(value: Any, what: str) -> None:
    with pytest.raises(EncodingError, match=what):
        encoding.pack(value)


def test_the_deepest_allowed_nesting_packs() -> None:
    assert encoding.pack(_nest(encoding.MAX_DEPTH)).endswith(b"\xc4\x04leaf")


@pytest.mark.parametrize("value", [{"\ud800": 1}, {"k": "a\udfffb"}, ["\ud800"]])
def test_text_utf8_cannot_encode_is_refused_as_an_encoding_error(value: Any) -> None:
    with pytest.raises(EncodingError, match="cannot be encoded as UTF-8"):
        encoding.pack(value)


@pytest.mark.parametrize(("data", "kind"), [(b"\x91" * 2000 + b"\x00", "StackError"), (b"\xc1", "FormatError")])
def test_msgpack_errors_without_text_still_say_what_was_wrong(data: bytes, kind: str) -> None:
    """A fuzzing review: too deep a nesting, or the reserved byte 0xc1, gave "frame payload is not valid msgpack: "
    and nothing after the colon, on the wire too."""
    with pytest.raises(EncodingError, match=f"is not valid msgpack: {kind}$"):
        encoding.unpack(data, what="frame payload", max_size=1 << 20)
