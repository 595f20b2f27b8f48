"""RFC 9180 HPKE, base mode, one suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305 (pure).

Why our own *seal*: cryptography's `hpke.Suite.encrypt` draws its ephemeral key from the OS, so a packet could
never be reproduced from the randomness passed in (the house rule, and what makes known-answer vectors
possible). The sealing side is short and fully specified, so it is written out here step by step against
RFC 9180 §4.1 (DHKEM), §5.1 (key schedule) and §5.2 (single-shot seal), and checked byte for byte against the
RFC's Appendix A.2.1 vector. *Opening* uses cryptography's own `hpke.Suite.decrypt`, so every round trip
cross-checks this seal against an independent implementation.

The ephemeral key comes from `DeriveKeyPair(ikmE)` (§7.1.3) with `ikmE` = 32 bytes of the passed-in
randomness, rather than using those bytes directly as the scalar: it is the RFC's own GenerateKeyPair path
(so the Appendix A vector, which publishes ikmE, tests exactly this code), and it hashes the randomness, so a
structured or biased source never becomes the scalar as is. It costs two HMACs.
"""

from __future__ import annotations

import hmac

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

KEM_ID = 0x0020  # DHKEM(X25519, HKDF-SHA256)
KDF_ID = 0x0001  # HKDF-SHA256
AEAD_ID = 0x0003  # ChaCha20Poly1305
N_ENC = 32  # size of enc (the ephemeral public key)
N_TAG = 16
N_SECRET = 32

_KEM_SUITE = b"KEM" + KEM_ID.to_bytes(2, "big")
_HPKE_SUITE = b"HPKE" + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")
_MODE_BASE = b"\x00"

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt, ikm, "sha256")  # HKDF-Extract (RFC 5869 §2.2); empty salt = HashLen zeros


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    # Every output here is ≤ 32 bytes, so HKDF-Expand is the single block T(1) = HMAC(prk, info ‖ 0x01).
    assert length <= 32
    return hmac.digest(prk, info + b"\x01", "sha256")[:length]


def labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite + label + ikm)


def labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite + label + info, length)


def derive_key_pair(ikm: bytes) -> tuple[bytes, bytes]:
    """RFC 9180 §7.1.3 DeriveKeyPair for X25519: (skE, pkE) as raw 32-byte strings."""
    dkp_prk = labeled_extract(_KEM_SUITE, b"", b"dkp_prk", ikm)
    sk = labeled_expand(_KEM_SUITE, dkp_prk, b"sk", b"", 32)
    # libsodium's fixed-base multiplication (clamps the scalar as RFC 7748 requires) is twice as fast as
    # building an OpenSSL key object, and sealing to 195 recipients has a 25 ms budget.
    pk: bytes = nacl.bindings.crypto_scalarmult_base(sk)
    return sk, pk


# LabeledExtract("", "psk_id_hash", "") is the same for every base-mode call.
_PSK_ID_HASH = labeled_extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")


def key_schedule(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes]:
    """RFC 9180 §5.1 KeySchedule in base mode (empty psk and psk_id): (key, base_nonce)."""
    info_hash = labeled_extract(_HPKE_SUITE, b"", b"info_hash", info)
    context = _MODE_BASE + _PSK_ID_HASH + info_hash
    secret = labeled_extract(_HPKE_SUITE, shared_secret, b"secret", b"")
    key = labeled_expand(_HPKE_SUITE, secret, b"key", context, 32)
    base_nonce = labeled_expand(_HPKE_SUITE, secret, b"base_nonce", context, 12)
    return key, base_nonce


def encap(recipient_public: bytes, ikm_e: bytes) -> tuple[bytes, bytes]:
    """RFC 9180 §4.1 Encap with the ephemeral key from DeriveKeyPair(ikm_e): (shared_secret, enc)."""
    sk_e, enc = derive_key_pair(ikm_e)
    if len(recipient_public) != 32:
        raise ValueError("an X25519 public key is 32 bytes")
    try:
        dh: bytes = nacl.bindings.crypto_scalarmult(sk_e, recipient_public)
    except nacl.exceptions.RuntimeError:
        # libsodium refuses an all-zero result (a low-order recipient key), as RFC 9180 §7.1.4 requires.
        raise ValueError("recipient X25519 key is of low order") from None
    eae_prk = labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    shared_secret = labeled_expand(_KEM_SUITE, eae_prk, b"shared_secret", enc + recipient_public, N_SECRET)
    return shared_secret, enc


def seal(recipient_public: bytes, info: bytes, plaintext: bytes, ikm_e: bytes, aad: bytes = b"") -> bytes:
    """Single-shot base-mode seal (§6.1 SealBase): enc ‖ ciphertext, the form `hpke.Suite.decrypt` reads."""
    if len(ikm_e) != 32:
        raise ValueError("ikm_e must be 32 bytes")
    shared_secret, enc = encap(recipient_public, ikm_e)
    key, base_nonce = key_schedule(shared_secret, info)
    # Sequence number 0: the nonce is base_nonce itself, and each context seals exactly one message.
    return enc + ChaCha20Poly1305(key).encrypt(base_nonce, plaintext, aad)


def open_(private_key: x25519.X25519PrivateKey, info: bytes, sealed: bytes) -> bytes:
    """Open a base-mode ciphertext (enc ‖ ct, empty aad) with cryptography's HPKE; raises its InvalidTag."""
    return SUITE.decrypt(sealed, private_key, info=info)
