"""Canonical msgpack: the one byte form of every signed or hashed structure in valise.

Rules (specs/packet.md, "Conventions"):
- maps have text keys, written in ascending order of their UTF-8 bytes, no duplicates;
- integers use the shortest msgpack form (msgpack-python does this), booleans and nil as usual;
- text is `str` (UTF-8), bytes are `bin`; floats and extension types are not allowed;
- a decoder accepts a byte string only if encoding the decoded value again yields the same bytes.

Signed structures are serialised once and carried as bytes; verifiers check the signature over the bytes
they received and only then decode, so re-serialisation is never needed to verify.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from valise.errors import EncodingError

# Nesting deeper than this is never produced by valise; refusing it keeps a hostile input from recursing.
MAX_DEPTH = 16


def _canonical(value: Any, depth: int = 0) -> Any:
    # Exact type checks first, most common first: this runs for every frame and record valise writes.
    if depth > MAX_DEPTH:
        raise EncodingError(f"value nests deeper than {MAX_DEPTH} levels")
    t = type(value)
    if t is bytes or t is str or t is bool or value is None:
        return value
    if t is int:
        if not -(2**63) <= value < 2**64:
            raise EncodingError(f"integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise EncodingError(f"map key {key!r} is not text")
        # Code point order is UTF-8 byte order (UTF-8 was designed so), so plain string order is the canonical
        # one without encoding each key; a key UTF-8 cannot encode (a lone surrogate) is refused by `pack`.
        return {k: _canonical(value[k], depth + 1) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v, depth + 1) for v in value]
    if isinstance(value, bool | str | bytes):  # subclasses (an IntEnum is handled below)
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise EncodingError(f"integer {value} does not fit in 64 bits")
        return value
    raise EncodingError(f"type {type(value).__name__} has no canonical msgpack form")


def pack(value: Any) -> bytes:
    """Encode `value` canonically (maps sorted by key bytes, no floats)."""
    try:
        return msgpack.packb(_canonical(value), use_bin_type=True)
    except UnicodeEncodeError as exc:  # a lone surrogate: text that has no UTF-8 form
        raise EncodingError(f"text {exc.object[exc.start : exc.end]!r} cannot be encoded as UTF-8") from None


def decode(data: bytes, *, what: str, max_size: int) -> Any:
    """Parse msgpack with every length bounded by `max_size`; no canonical check (see `unpack`, `repacks_to`).

    The size is checked before any parsing, so a hostile length costs nothing.
    """
    if len(data) > max_size:
        raise EncodingError(f"{what} is {len(data)} bytes, over the limit of {max_size}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError, OverflowError) as exc:
        # Some of msgpack's errors carry no text (too deep a nesting, the reserved byte 0xc1): name their kind.
        raise EncodingError(f"{what} is not valid msgpack: {str(exc) or type(exc).__name__}") from None


def repacks_to(value: Any, data: bytes) -> bool:
    """Whether encoding `value` as decoded (no key sorting) gives `data` back: shortest integer forms, bin vs
    str, no duplicate keys, nothing trailing. Together with a check that every map's keys are in sorted order
    and every value has an allowed type, this is exactly the canonical rule, at the cost of one round trip;
    the packet and wire decoders, which know their schemas, use it on their hot paths."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    try:
        return bool(packer.pack(value) == data)
    except (ValueError, TypeError, OverflowError):
        # Something msgpack decodes but will not encode again (e.g. nesting past the packer's limit, which
        # msgpack < 1.2 sets below its decoder's): not canonical, so a refusal, never an exception.
        packer.reset()
        return False


# One Packer per thread for `repacks_to`: `msgpack.packb` builds a Packer per call, which is 40% of the cost of
# re-encoding a packet core (0.5 of 1.1 µs). A Packer holds a buffer while it packs, so threads do not share one;
# it empties the buffer after every pack, failed or not, and packing decoded (built-in) values runs no Python
# code, so no pack starts inside another on the same thread.
_local = threading.local()


def unpack(data: bytes, *, what: str, max_size: int) -> Any:
    """Decode canonical msgpack bytes describing `what`; refuse oversize, malformed or non-canonical input."""
    value = decode(data, what=what, max_size=max_size)
    if pack(value) != data:
        raise EncodingError(f"{what} is not in canonical msgpack form")
    return value


def unpack_map(data: bytes, *, what: str, max_size: int, fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """Decode a canonical map whose keys are exactly `fields` and whose values have the stated types."""
    value = unpack(data, what=what, max_size=max_size)
    return check_map(value, what=what, fields=fields)


def check_map(value: Any, *, what: str, fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """Check that `value` is a map with exactly `fields`, each of the stated type (bool is not an int)."""
    if not isinstance(value, dict):
        raise EncodingError(f"{what} is not a map")
    if any(type(k) is not str for k in value):  # msgpack decodes bin keys too; naming them below needs text
        raise EncodingError(f"{what} has a map key that is not text")
    missing = sorted(set(fields) - set(value))
    extra = sorted(set(value) - set(fields))
    if missing:
        raise EncodingError(f"{what} lacks field(s) {', '.join(missing)}")
    if extra:
        raise EncodingError(f"{what} has unknown field(s) {', '.join(extra)}")
    for name, kind in fields.items():
        item = value[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(item, bool) and bool not in kinds:
            raise EncodingError(f"{what} field {name!r} has the wrong type (bool)")
        if not isinstance(item, kinds):
            raise EncodingError(f"{what} field {name!r} has the wrong type ({type(item).__name__})")
    return value
