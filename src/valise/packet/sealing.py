"""Seal a packet v1 (pure: reads `payload`, writes `out`; randomness and time are passed in)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from valise import identity, labels
from valise.crypto import hpke, padding, stream
from valise.errors import (
    Error,
    LimitError,
    PayloadError,
    SenderMismatchError,
    StanzaError,
    TruncatedError,
    UsageError,
)
from valise.labels import Labels
from valise.packet.format import (
    CONTENT_KEY_SIZE,
    HASH_SIZE,
    HEADER_DOMAIN,
    MAGIC,
    MAX_HEADER,
    MAX_PAYLOAD,
    MAX_RECIPIENTS,
    PACKET_ID_SIZE,
    SIGNATURE_SIZE,
    VERSION,
    X25519_STANZA,
    CiphertextHasher,
    Core,
    Header,
    Stanza,
    payload_aad,
    stanza_info,
)
from valise.packet.opening import read_head

Random = Callable[[int], bytes]

DEFAULT_LIFETIME = 30 * 24 * 3600
# Payloads up to this size are parsed as JSON to pick the default content type; larger ones are not (the
# whole payload would have to sit in memory), so they default to octet-stream unless the caller says.
SNIFF_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sealed:
    packet_id: bytes
    header_digest: bytes
    size: int
    labels: Labels
    # K, for a sender that must be able to seal the packet afresh (reseal): whoever holds it reads the packet.
    content_key: bytes = field(default=b"", repr=False)


def _payload_size(payload: BinaryIO, given: int | None) -> int:
    if given is not None:
        return given
    if not payload.seekable():
        raise UsageError("payload size is unknown", hint="pass payload_size, or a seekable payload stream")
    here = payload.tell()
    end = payload.seek(0, 2)
    payload.seek(here)
    return end - here


def _read_exact(src: BinaryIO, n: int) -> bytes:
    data = src.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def seal(
    payload: BinaryIO,
    out: BinaryIO,
    *,
    sender: identity.Identity,
    recipients: Sequence[identity.PublicBundle],
    tlp: labels.TLP | str,
    now: int,
    random: Random,
    expires: int | None = None,
    categories: Sequence[str] = (),
    operation: str | None = None,
    content_type: str | None = None,
    payload_size: int | None = None,
) -> Sealed:
    """Seal `payload` from `sender` to `recipients` and write the packet to `out` (which must be seekable).

    The header precedes the ciphertext but signs its hash, so a same-size placeholder is written first and
    overwritten once the ciphertext is out. Randomness is drawn in a fixed order (packet id, K, then one
    HPKE ikmE per recipient in sorted id order), so fixed randomness gives a byte-exact packet.
    """
    if not out.seekable():
        raise UsageError("packet output must be seekable", hint="write to a file, or spool to a temporary file")
    size = _payload_size(payload, payload_size)
    if not 0 <= size <= MAX_PAYLOAD:
        raise LimitError(f"payload is {size} bytes; at most {MAX_PAYLOAD} fit in a packet")
    by_id: dict[str, identity.PublicBundle] = {}
    for r in recipients:
        if r.member_id in by_id:
            raise UsageError(f"recipient {r.member_id} is given twice")
        by_id[r.member_id] = r
    if not 1 <= len(by_id) <= MAX_RECIPIENTS:
        raise LimitError(f"{len(by_id)} recipients given; 1 to {MAX_RECIPIENTS} are allowed")
    expires = now + DEFAULT_LIFETIME if expires is None else expires
    if expires <= now:
        raise UsageError("expiry time must be in the future")

    if content_type is None:
        if size <= SNIFF_LIMIT:
            data = _read_exact(payload, size)
            content_type = labels.sniff_content_type(data)
            payload = io.BytesIO(data)  # shares `data` (no copy) until written
        else:
            content_type = labels.OCTET_STREAM
    lab = Labels.make(tlp, tuple(categories), operation, content_type)

    packet_id = random(PACKET_ID_SIZE)
    key = random(CONTENT_KEY_SIZE)
    core = Core.make(packet_id, now, expires, sender.member_id, tuple(sorted(by_id)), lab)
    padded = padding.padded_size(size)
    sealing = _Sealing(out, sender, core, by_id, key, stream.ciphertext_size(padded), random)
    digest = _write_ciphertext(payload, out, size, padded, stream.payload_key(key, packet_id), core.raw)
    return sealing.finish(digest)


def reseal(
    src: BinaryIO,
    out: BinaryIO,
    *,
    key: bytes,
    sender: identity.Identity,
    recipients: Sequence[identity.PublicBundle],
    now: int,
    random: Random,
) -> Sealed:
    """Seal the sender's own packet from `src` afresh, dated `now`, to `out` (seekable): same packet id, recipients,
    labels, expiry and padded payload; a new content key, new stanzas (to the recipients' current keys) and a new
    signature (the sender's current key). `key` is the old packet's content key K, which the sender kept.

    For a packet that waited in its sender's outbox past the broker's time window (protocol.md): the broker takes
    a packet only within minutes of its `created`, and a sealed packet cannot be re-dated without re-encrypting
    its payload (the header's core, `created` with it, is the payload's associated data). The payload is never
    unpadded: each chunk is opened under K and sealed again under the new key, so plaintext exists only one chunk
    at a time, in memory. A new key, never K again: sealing the same chunks under K's nonces with other associated
    data would reuse ChaCha20-Poly1305 nonces. Checks: K against the old header's commitment, the old header's
    signer is `sender` (as a member id), the recipients are the old ones, every old chunk authenticates and the old
    ciphertext has its signed length and hash. If it raises, `out` holds garbage to discard."""
    head = read_head(src)
    old = head.header
    core = old.core
    if core.sender != sender.member_id:
        raise SenderMismatchError(f"packet is from {core.sender}, not {sender.member_id}: only its sender reseals it")
    if len(key) != CONTENT_KEY_SIZE or stream.key_commitment(key, core.packet_id) != old.key_commit:
        raise StanzaError("the kept content key does not match the packet's key commitment")
    by_id = {r.member_id: r for r in recipients}
    if tuple(sorted(by_id)) != core.recipients or len(by_id) != len(recipients):
        raise UsageError(f"recipients {', '.join(sorted(by_id))} are not the packet's: {', '.join(core.recipients)}")
    if core.expires <= now:
        raise UsageError("the packet has expired: it cannot be sealed afresh")
    fresh = Core.make(core.packet_id, now, core.expires, core.sender, core.recipients, core.labels)
    new_key = random(CONTENT_KEY_SIZE)
    if new_key == key:  # only a broken random source: the chunks would go out again under K's nonces
        raise Error("the random source gave the old content key again: refusing to reuse its nonces")
    sealing = _Sealing(out, sender, fresh, by_id, new_key, old.ct_len, random)
    dec = stream.Decryptor(stream.payload_key(key, core.packet_id), payload_aad(core.raw))
    enc = stream.Encryptor(stream.payload_key(new_key, core.packet_id), payload_aad(fresh.raw))
    checked, digest = CiphertextHasher(old), hashlib.sha256()
    remaining = old.ct_len
    while remaining:
        n = min(stream.CT_CHUNK, remaining)
        chunk = _read_exact(src, n)
        if len(chunk) != n:
            raise TruncatedError(f"ciphertext ends after {old.ct_len - remaining + len(chunk)} of {old.ct_len} bytes")
        remaining -= n
        checked.update(chunk)
        try:
            sealed = enc.seal(dec.open(chunk, last=remaining == 0), last=remaining == 0)
        except stream.ChunkError as exc:
            raise PayloadError(f"payload {exc}", hint="the packet file was modified") from None
        digest.update(sealed)
        out.write(sealed)
    checked.finish()
    return sealing.finish(digest.digest())


class _Sealing:
    """A packet being written: the stanzas and a placeholder header go out first (the header signs the hash of
    the ciphertext that follows it); `finish` writes the real header and signature once the ciphertext is out."""

    def __init__(
        self,
        out: BinaryIO,
        sender: identity.Identity,
        core: Core,
        by_id: dict[str, identity.PublicBundle],
        key: bytes,
        ct_len: int,
        random: Random,
    ) -> None:
        pid = core.packet_id
        self.stanzas = tuple(
            Stanza(X25519_STANZA, rid, hpke.seal(by_id[rid].enc_key, _info(pid, core.sender, rid), key, random(32)))
            for rid in core.recipients
        )  # drawn in sorted recipient order, after the packet id and K: fixed randomness gives a fixed packet
        self.commit = stream.key_commitment(key, pid)
        placeholder = Header.encode(core, ct_len, bytes(HASH_SIZE), self.commit, self.stanzas)
        if len(placeholder) > MAX_HEADER:
            raise LimitError(f"packet header would be {len(placeholder)} bytes, over the limit of {MAX_HEADER}")
        self.out, self.sender, self.core, self.key, self.ct_len = out, sender, core, key, ct_len
        self.start = out.tell()
        self.prefix = MAGIC + bytes((VERSION,)) + len(placeholder).to_bytes(4, "big")
        self.header_len = len(placeholder)
        out.write(self.prefix + placeholder + bytes(SIGNATURE_SIZE))

    def finish(self, digest: bytes) -> Sealed:
        header = Header.encode(self.core, self.ct_len, digest, self.commit, self.stanzas)
        assert len(header) == self.header_len  # only the fixed-size hash changed
        signature = self.sender.signing.sign(HEADER_DOMAIN, header)
        out = self.out
        end = out.tell()
        out.seek(self.start + len(self.prefix))
        out.write(header + signature)
        out.seek(end)
        digest_of_header = hashlib.sha256(header).digest()
        return Sealed(self.core.packet_id, digest_of_header, end - self.start, self.core.labels, self.key)


def _info(packet_id: bytes, sender: str, recipient: str) -> bytes:
    return stanza_info(X25519_STANZA, packet_id, sender, recipient)


def _write_ciphertext(payload: BinaryIO, out: BinaryIO, size: int, padded: int, key: bytes, core: bytes) -> bytes:
    """Pad, encrypt and write the payload chunk by chunk; return the ciphertext's SHA-256."""
    enc = stream.Encryptor(key, payload_aad(core))
    digest = hashlib.sha256()
    produced = 0
    while produced < padded:
        n = min(stream.CHUNK, padded - produced)
        want = max(0, min(size, produced + n) - produced)
        chunk = _read_exact(payload, want)
        if len(chunk) != want:
            raise UsageError(f"payload ended after {produced + len(chunk)} of the {size} bytes announced")
        if want < n:  # the padding starts in this chunk: marker at offset `size`, then zeros
            pad = n - want
            chunk += b"\x80" + bytes(pad - 1) if produced + want == size else bytes(pad)
        produced += n
        sealed = enc.seal(chunk, last=produced == padded)
        digest.update(sealed)
        out.write(sealed)
    if payload.read(1):
        raise UsageError(f"payload is longer than the {size} bytes announced")
    return digest.digest()
