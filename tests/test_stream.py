"""Padmé padding and the payload STREAM."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valise.crypto import padding, stream


def test_padme_known_values() -> None:
    # Padmé keeps only the top ⌊log2 E⌋ + 1 bits after the leading bit (PETS 2019, §4.2).
    assert [padding.padme(n) for n in range(1, 13)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12]
    assert padding.padme(1000) == 1024
    assert padding.padme(65537) == 67584
    assert padding.padme(2**30 + 1) == 2**30 + 2**25
    with pytest.raises(ValueError, match="≥ 1"):
        padding.padme(0)


@given(st.integers(min_value=1, max_value=2**40))
def test_padme_bounds_and_idempotence(n: int) -> None:
    p = padding.padme(n)
    assert n <= p <= n + n // 8 + 1  # overhead under 12.5%
    assert padding.padme(p) == p


def _unpad(padded: bytes, cuts: list[int]) -> bytes:
    out = io.BytesIO()
    u = padding.Unpadder(out.write)
    pos = 0
    for c in [*sorted(cuts), len(padded)]:
        u.feed(padded[pos:c])
        pos = max(pos, c)
    assert u.finish() == len(out.getvalue())
    return out.getvalue()


def _pad(data: bytes) -> bytes:
    n = padding.padded_size(len(data))
    return data + b"\x80" + bytes(n - len(data) - 1)


@settings(max_examples=200)
@given(
    data=st.binary(max_size=300)
    | st.builds(lambda k, z: b"\x01" * k + bytes(z), st.integers(0, 5), st.integers(0, 300)),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_unpadder_recovers_payload_whatever_the_chunking(data: bytes, cuts: list[int]) -> None:
    padded = _pad(data)
    assert _unpad(padded, [c for c in cuts if c <= len(padded)]) == data


def test_unpadder_refuses_missing_marker_and_non_canonical_length() -> None:
    with pytest.raises(ValueError, match="marker"):
        _unpad(b"abc\x00", [])
    with pytest.raises(ValueError, match="marker"):
        _unpad(b"\x00\x00", [])
    with pytest.raises(ValueError, match="canonical"):
        _unpad(b"abcdefgh\x80\x00\x00\x00", [])  # 8-byte payload pads to 10, not 12


def test_nonce_layout() -> None:
    assert stream.nonce(0, False) == bytes(12)
    assert stream.nonce(1, True) == bytes(10) + b"\x01\x01"
    assert stream.nonce(2**88 - 1, False) == b"\xff" * 11 + b"\x00"


@given(st.integers(min_value=1, max_value=2**33))
def test_ciphertext_size_inverts(padded: int) -> None:
    assert stream.padded_size_of(stream.ciphertext_size(padded)) == padded


def test_impossible_ciphertext_sizes() -> None:
    for bad in (0, 1, 16, stream.CT_CHUNK + 16):
        assert stream.padded_size_of(bad) is None


def test_stream_rejects_reorder_truncation_and_extension() -> None:
    key, aad = b"k" * 32, b"a" * 32
    enc = stream.Encryptor(key, aad)
    chunks = [enc.seal(b"x" * stream.CHUNK, False), enc.seal(b"y" * stream.CHUNK, False), enc.seal(b"z", True)]
    with pytest.raises(ValueError, match="already"):
        enc.seal(b"more", True)

    dec = stream.Decryptor(key, aad)
    assert dec.open(chunks[0], False) == b"x" * stream.CHUNK
    with pytest.raises(stream.ChunkError, match="chunk 1"):
        dec.open(chunks[2], True)  # chunk 1 dropped

    dec = stream.Decryptor(key, aad)
    with pytest.raises(stream.ChunkError, match="chunk 0"):
        dec.open(chunks[1], False)  # reordered

    dec = stream.Decryptor(key, aad)
    dec.open(chunks[0], False)
    with pytest.raises(stream.ChunkError, match="chunk 1"):
        dec.open(chunks[1], True)  # truncated after chunk 1: it was not sealed as last

    dec = stream.Decryptor(key, b"b" * 32)
    with pytest.raises(stream.ChunkError, match="chunk 0"):
        dec.open(chunks[0], False)  # another core


def test_encryptor_refuses_bad_chunk_sizes() -> None:
    enc = stream.Encryptor(b"k" * 32, b"")
    with pytest.raises(ValueError, match="65536"):
        enc.seal(b"short", False)
    with pytest.raises(ValueError, match="65536"):
        enc.seal(b"", True)


def test_key_derivations_are_separated() -> None:
    k, pid = b"K" * 32, b"P" * 16
    assert stream.payload_key(k, pid) != stream.key_commitment(k, pid)
    assert stream.payload_key(k, pid) != stream.payload_key(k, b"Q" * 16)
