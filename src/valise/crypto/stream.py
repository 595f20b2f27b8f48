"""The payload STREAM: ChaCha20-Poly1305 over 64 KiB chunks (pure).

This is the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár ("Online Authenticated-Encryption
and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015), as age uses it: chunk i is sealed with the nonce
`i as 11 bytes big-endian ‖ last`, where `last` is 0x01 on the final chunk and 0x00 before it. The counter
makes dropping or reordering a chunk fail authentication; the flag makes truncation at a chunk boundary fail
(the new last chunk was sealed with flag 0). A fixed counter start is safe because each payload key is used
for one packet only: it is derived from a fresh content key K and the packet id.

    payload key = HKDF-SHA256(ikm = K, salt = packet id, info = "valise/v1/payload", 32 bytes)
    commitment  = HKDF-SHA256(ikm = K, salt = packet id, info = "valise/v1/key-commitment", 32 bytes)

Every chunk holds 65536 bytes of (padded) plaintext except the last, which holds 1..65536; each ciphertext
chunk is 16 bytes longer (the Poly1305 tag).
"""

from __future__ import annotations

import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

CHUNK = 65536
TAG = 16
CT_CHUNK = CHUNK + TAG
KEY_SIZE = 32
MAX_CHUNKS = 1 << 88  # the 11-byte counter; packets are far below (4 GiB = 65536 chunks)

PAYLOAD_INFO = b"valise/v1/payload"
COMMIT_INFO = b"valise/v1/key-commitment"


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) with a 32-byte output: one Expand block."""
    prk = hmac.digest(salt, ikm, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


def payload_key(content_key: bytes, packet_id: bytes) -> bytes:
    return hkdf_sha256(content_key, packet_id, PAYLOAD_INFO)


def key_commitment(content_key: bytes, packet_id: bytes) -> bytes:
    """A public commitment to K, so every recipient who accepts a packet used the same K (ChaCha20-Poly1305 is
    not key-committing: without this a sender could give recipients different keys that open one ciphertext
    to different plaintexts)."""
    return hkdf_sha256(content_key, packet_id, COMMIT_INFO)


def nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def chunk_count(padded_size: int) -> int:
    return max(1, -(-padded_size // CHUNK))


def ciphertext_size(padded_size: int) -> int:
    """Ciphertext bytes for `padded_size` (≥ 1) bytes of padded plaintext."""
    return padded_size + TAG * chunk_count(padded_size)


def padded_size_of(ciphertext_size_: int) -> int | None:
    """The padded plaintext size a ciphertext size implies, or None if no plaintext has that ciphertext size."""
    chunks = -(-ciphertext_size_ // CT_CHUNK)
    padded = ciphertext_size_ - TAG * chunks
    if padded < 1 or ciphertext_size(padded) != ciphertext_size_:
        return None
    return padded


class ChunkError(Exception):
    """A chunk fails authentication (internal; the packet layer turns it into a PayloadError)."""


class Encryptor:
    """Seals chunks in order; the caller says which one is last."""

    __slots__ = ("_aad", "_aead", "counter", "done")

    def __init__(self, key: bytes, aad: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._aad = aad
        self.counter = 0
        self.done = False

    def seal(self, plaintext: bytes, last: bool) -> bytes:
        if self.done:
            raise ValueError("the last chunk was already sealed")
        if not 0 < len(plaintext) <= CHUNK or (not last and len(plaintext) != CHUNK):
            raise ValueError("a chunk holds 65536 bytes, the last one 1..65536")
        out = self._aead.encrypt(nonce(self.counter, last), plaintext, self._aad)
        self.counter += 1
        self.done = last
        return out


class Decryptor:
    """Opens chunks in order; the caller says which one is last (from the signed ciphertext length)."""

    __slots__ = ("_aad", "_aead", "counter", "done")

    def __init__(self, key: bytes, aad: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._aad = aad
        self.counter = 0
        self.done = False

    def open(self, chunk: bytes, last: bool) -> bytes:
        if self.done:
            raise ChunkError("data after the last chunk")
        try:
            out = self._aead.decrypt(nonce(self.counter, last), chunk, self._aad)
        except InvalidTag:
            raise ChunkError(f"chunk {self.counter} does not authenticate") from None
        self.counter += 1
        self.done = last
        return out
