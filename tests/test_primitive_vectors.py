"""Public known answers for the primitives under valise's own wrappers: Ed25519 (RFC 8032 §7.1, through
valise.crypto.sign, which calls libsodium by its bindings) and HKDF-SHA256 (RFC 5869 appendix A, through the
hand-written one-block HKDF that derives payload keys and key commitments). HPKE has RFC 9180's vector in
test_hpke.py; the packet vectors are recomputed independently in test_packet_vectors.py. (A crypto review
found these missing.)"""

from __future__ import annotations

import pytest

from valise.crypto import hpke, sign, stream
from valise.errors import SignatureError

# RFC 8032 §7.1: TEST 1, 2 and 3 (secret key = seed, public key, message, signature).
ED25519 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595"
        "bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb43"
        "02aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716"
        "ed28dc027beceea1ec40a",
    ),
]


@pytest.mark.parametrize(("seed", "public", "message", "signature"), ED25519)
def test_ed25519_rfc8032(seed: str, public: str, message: str, signature: str) -> None:
    key = sign.SigningKey(bytes.fromhex(seed))
    assert key.public.hex() == public
    assert key.sign_raw(bytes.fromhex(message)).hex() == signature
    sign.verify_raw(bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature), what="vector")
    # valise's domain-separated form is the same signature over label ‖ message.
    assert key.sign(b"L\x00", bytes.fromhex(message)) == key.sign_raw(b"L\x00" + bytes.fromhex(message))
    forged = bytearray.fromhex(signature)
    forged[0] ^= 1
    with pytest.raises(SignatureError, match="vector: signature does not verify"):
        sign.verify_raw(bytes.fromhex(public), bytes.fromhex(message), bytes(forged), what="vector")
    with pytest.raises(SignatureError, match="does not verify"):
        sign.verify_raw(bytes.fromhex(public), bytes.fromhex(message) + b"!", bytes.fromhex(signature), what="vector")


# RFC 5869 appendix A.1 and A.3 (IKM, salt, info, the first 32 bytes of OKM: valise's outputs are one block).
HKDF = [
    ("0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9",
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"),
    ("0b" * 22, "", "", "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"),
]  # fmt: skip


@pytest.mark.parametrize(("ikm", "salt", "info", "okm"), HKDF)
def test_hkdf_sha256_rfc5869(ikm: str, salt: str, info: str, okm: str) -> None:
    ikm_b, salt_b, info_b = bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info)
    assert stream.hkdf_sha256(ikm_b, salt_b, info_b).hex() == okm
    # The HPKE code's own Extract and single-block Expand (an empty salt is HashLen zeros, RFC 5869 §2.2).
    assert hpke._expand(hpke._extract(salt_b, ikm_b), info_b, 32).hex() == okm
