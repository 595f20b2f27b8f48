"""Our RFC 9180 seal against the RFC's own vector and against cryptography's HPKE (which opens it)."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from valise.crypto import hpke

# RFC 9180 Appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305, Base mode, and its
# first encryption (sequence number 0). Values from https://www.rfc-editor.org/rfc/rfc9180.html#appendix-A.2.1
A21 = {
    "info": "4f6465206f6e2061204772656369616e2055726e",
    "ikmE": "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b",
    "pkEm": "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
    "skEm": "f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600",
    "pkRm": "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a",
    "skRm": "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb",
    "shared_secret": "0bbe78490412b4bbea4812666f7916932b828bba79942424abb65244930d69a7",
    "key": "ad2744de8e17f4ebba575b3f5f5a8fa1f69c2a07f6e7500bc60ca6e3e3ec1c91",
    "base_nonce": "5c4d98150661b848853b547f",
    "pt": "4265617574792069732074727574682c20747275746820626561757479",
    "aad": "436f756e742d30",
    "ct": "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28",
}


def v(name: str) -> bytes:
    return bytes.fromhex(A21[name])


def test_rfc9180_a21_derive_key_pair() -> None:
    assert hpke.derive_key_pair(v("ikmE")) == (v("skEm"), v("pkEm"))


def test_rfc9180_a21_encap_and_key_schedule() -> None:
    shared_secret, enc = hpke.encap(v("pkRm"), v("ikmE"))
    assert (shared_secret, enc) == (v("shared_secret"), v("pkEm"))
    assert hpke.key_schedule(shared_secret, v("info")) == (v("key"), v("base_nonce"))


def test_rfc9180_a21_seal() -> None:
    assert hpke.seal(v("pkRm"), v("info"), v("pt"), v("ikmE"), v("aad")) == v("pkEm") + v("ct")


def test_library_opens_our_seal_with_the_rfc_keys() -> None:
    sk = x25519.X25519PrivateKey.from_private_bytes(v("skRm"))
    sealed = hpke.seal(v("pkRm"), v("info"), v("pt"), v("ikmE"))
    assert hpke.open_(sk, v("info"), sealed) == v("pt")
    with pytest.raises(InvalidTag):
        hpke.open_(sk, v("info") + b"!", sealed)


@settings(max_examples=40)
@given(sk=st.binary(min_size=32, max_size=32), ikm=st.binary(min_size=32, max_size=32), info=st.binary(max_size=200))
def test_library_opens_our_seal(sk: bytes, ikm: bytes, info: bytes) -> None:
    key = x25519.X25519PrivateKey.from_private_bytes(sk)
    pt = ikm[::-1]
    sealed = hpke.seal(key.public_key().public_bytes_raw(), info, pt, ikm)
    assert len(sealed) == hpke.N_ENC + len(pt) + hpke.N_TAG
    assert hpke.open_(key, info, sealed) == pt


def test_low_order_recipient_key_is_refused() -> None:
    with pytest.raises(ValueError, match="low order"):
        hpke.seal(bytes(32), b"", b"k" * 32, b"r" * 32)
    with pytest.raises(ValueError, match="32 bytes"):
        hpke.seal(bytes(31), b"", b"k" * 32, b"r" * 32)
