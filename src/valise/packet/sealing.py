"""Seal a packet v1 (pure: reads `payload`, writes `out`; randomness and time are passed in)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from valise import identity, labels
from valise.crypto import hpke, padding, stream
from valise.errors import LimitError, UsageError
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
    Core,
    Header,
    Stanza,
    payload_aad,
    stanza_info,
)

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
    ids = tuple(sorted(by_id))
    me = sender.member_id
    core = Core.make(packet_id, now, expires, me, ids, lab)
    stanzas = tuple(
        Stanza(
            X25519_STANZA, rid, hpke.seal(by_id[rid].enc_key, _info(packet_id, sender.member_id, rid), key, random(32))
        )
        for rid in ids
    )
    padded = padding.padded_size(size)
    ct_len = stream.ciphertext_size(padded)
    commit = stream.key_commitment(key, packet_id)
    placeholder = Header.encode(core, ct_len, bytes(HASH_SIZE), commit, stanzas)
    if len(placeholder) > MAX_HEADER:
        raise LimitError(f"packet header would be {len(placeholder)} bytes, over the limit of {MAX_HEADER}")

    start = out.tell()
    prefix = MAGIC + bytes((VERSION,)) + len(placeholder).to_bytes(4, "big")
    out.write(prefix + placeholder + bytes(SIGNATURE_SIZE))
    digest = _write_ciphertext(payload, out, size, padded, stream.payload_key(key, packet_id), core.raw)
    header = Header.encode(core, ct_len, digest, commit, stanzas)
    assert len(header) == len(placeholder)  # only the fixed-size hash changed
    signature = sender.signing.sign(HEADER_DOMAIN, header)
    end = out.tell()
    out.seek(start + len(prefix))
    out.write(header + signature)
    out.seek(end)
    return Sealed(packet_id, hashlib.sha256(header).digest(), end - start, lab)


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
