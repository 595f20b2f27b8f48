"""Open and inspect a packet v1 (pure: reads and writes only the streams passed in; the clock is `now`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

from cryptography.exceptions import InvalidTag

from valise import identity
from valise.crypto import hpke, padding, stream
from valise.errors import (
    ExpiredError,
    NotARecipientError,
    PacketError,
    PayloadError,
    StanzaError,
    TrailingDataError,
    TruncatedError,
)
from valise.labels import Labels
from valise.packet.format import (
    CONTENT_KEY_SIZE,
    PREFIX_SIZE,
    SIGNATURE_SIZE,
    X25519_STANZA,
    CiphertextHasher,
    Core,
    Head,
    Header,
    parse_prefix,
    payload_aad,
    stanza_info,
)

# A packet created this far in the future (by the sender's clock) is refused: clocks disagree a little, a
# packet stamped days ahead is a mistake or an attempt to outlive its expiry checks.
MAX_CLOCK_SKEW = 300
_ONE_READ = 1 << 20  # ciphertexts up to this size are read and hashed at once by inspect
_new = tuple.__new__  # builds a NamedTuple without its generated __new__ (a Python call) on the broker's path


@dataclass(frozen=True, slots=True)
class Opened:
    """What a recipient learns from a verified packet (the payload went to the output stream)."""

    packet_id: bytes
    sender: str
    recipients: tuple[str, ...]
    labels: Labels
    created: int
    expires: int
    header_digest: bytes
    payload_size: int
    # Sealed to an encryption key this member moved from (identity.rotate): whoever held that key, a thief after
    # a compromise, could open it too. Only a sender whose log did not show the move yet does that.
    sealed_to_replaced_key: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "packet_id": self.packet_id.hex(),
            "from": self.sender,
            "to": list(self.recipients),
            "labels": self.labels.to_json(),
            "created": self.created,
            "expires": self.expires,
            "header_digest": self.header_digest.hex(),
            "payload_size": self.payload_size,
            "sealed_to_replaced_key": self.sealed_to_replaced_key,
        }

    def warnings(self) -> list[str]:
        """What a reader must be told beside the payload."""
        return [REPLACED_KEY_WARNING] if self.sealed_to_replaced_key else []


REPLACED_KEY_WARNING = (
    "this packet was sealed to an encryption key this member has replaced: whoever held that key could read it too "
    "(after a compromise, treat its content as exposed; its sender's log was behind the move)"
)


class Inspection(NamedTuple):
    """What a broker sees: no payload, no key, but every signed fact and its verification status.

    A NamedTuple rather than a frozen dataclass: just as immutable, and built in a third of the time, which
    counts on the broker's per-packet path (tools/bench_packet.py, inspect+verify against a raw verify)."""

    packet_id: bytes
    sender: str
    recipients: tuple[str, ...]
    labels: Labels
    created: int
    expires: int
    header_size: int
    ciphertext_size: int
    packet_size: int
    header_digest: bytes
    stanza_types: tuple[str, ...]
    signature_verified: bool
    ciphertext_verified: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "packet_id": self.packet_id.hex(),
            "from": self.sender,
            "to": list(self.recipients),
            "labels": self.labels.to_json(),
            "created": self.created,
            "expires": self.expires,
            "header_size": self.header_size,
            "ciphertext_size": self.ciphertext_size,
            "packet_size": self.packet_size,
            "header_digest": self.header_digest.hex(),
            "stanza_types": list(self.stanza_types),
            "signature_verified": self.signature_verified,
            "ciphertext_verified": self.ciphertext_verified,
        }


def read_head(src: BinaryIO) -> Head:
    """Read and parse the head (prefix, header, signature) from a stream; limits before reading the header."""
    prefix = src.read(PREFIX_SIZE)
    header_len = parse_prefix(prefix)
    rest = src.read(header_len + SIGNATURE_SIZE)
    if len(rest) < header_len + SIGNATURE_SIZE:
        raise TruncatedError(f"packet ends inside its header ({PREFIX_SIZE + len(rest)} bytes)")
    header = Header.parse(rest[:header_len])
    return _new(Head, (header, rest[header_len:], PREFIX_SIZE + header_len + SIGNATURE_SIZE))


def check_time(head: Head, now: int) -> None:
    core = head.core
    if now >= core.expires:
        raise ExpiredError(f"packet expired at {core.expires} (now {now})", hint="ask the sender to send it again")
    if core.created > now + MAX_CLOCK_SKEW:
        raise ExpiredError(f"packet is dated {core.created - now} s in the future", hint="check both clocks")


def check_readable(head: Head, me: identity.Identity) -> bool:
    """That `me` can read the packet: it is a recipient, its stanza opens and the content key matches the signed
    commitment (NotARecipientError, StanzaError). True if the stanza opened only under a key `me` replaced.

    A recipient's node checks it before it acknowledges a delivery (protocol.md): a sender could otherwise have
    a packet acknowledged, and logged as delivered, that its recipient finds unreadable only when it reads it
    (a crypto review). The payload is not touched: one X25519 and a few hashes."""
    return _content_key(head, me)[1]


def _content_key(head: Head, me: identity.Identity) -> tuple[bytes, bool]:
    """The content key, and whether the stanza opened only under an encryption key `me` has replaced."""
    core = head.core
    if me.member_id not in core.recipients:
        raise NotARecipientError(
            f"{me.member_id} is not a recipient of this packet (it is for {', '.join(core.recipients)})"
        )
    mine = [s for s in head.header.stanzas if s.recipient == me.member_id and s.type == X25519_STANZA]
    if not mine:  # stanzas of types we cannot use are skipped, as the format requires
        raise NotARecipientError(f"no stanza of a type {me.member_id} can open ({X25519_STANZA})")
    info = stanza_info(X25519_STANZA, core.packet_id, core.sender, me.member_id)
    key, replaced = b"", False
    # The current key, then those the member moved from (sealed by a sender whose log did not show the move yet).
    for n, private in enumerate((me.enc_private, *me.enc_previous)):
        try:
            key, replaced = hpke.open_(private, info, mine[0].body), n > 0
            break
        except (InvalidTag, ValueError):
            continue
    else:
        raise StanzaError(
            f"the stanza for {me.member_id} does not open",
            hint="it was sealed to another key, or for another packet or sender",
        )
    if len(key) != CONTENT_KEY_SIZE:
        raise StanzaError(f"the stanza for {me.member_id} holds a {len(key)}-byte key, expected {CONTENT_KEY_SIZE}")
    if stream.key_commitment(key, core.packet_id) != head.header.key_commit:
        raise StanzaError("the content key does not match the header's key commitment")
    return key, replaced


def open_packet(
    src: BinaryIO, out: BinaryIO, *, me: identity.Identity, sender: identity.PublicBundle, now: int | None
) -> Opened:
    """Verify and decrypt a packet from `src`, writing the payload to `out`.

    Checks, in order: framing and limits, sender identity and header signature, time (unless `now` is None: a
    packet its recipient's node took in while it was in time, which stays readable for as long as it is kept),
    recipient and stanza, key commitment; then, from a seekable `src`, the length and hash of the whole ciphertext
    and that nothing follows, before any plaintext is written; then every chunk (order, last flag) and the
    padding. A chunk authenticates to anyone holding K, every recipient among them: only the signed hash shows
    the sender wrote it, so checking it first means a co-recipient's forgery never reaches `out` (a crypto
    review: `valise open -o -` streamed it to the terminal before the hash refused it). From a pipe the hash is
    checked as the chunks go, and if an error is raised the caller must discard what was written.
    """
    head = read_head(src)
    head.verify(sender)
    if now is not None:
        check_time(head, now)
    key, replaced = _content_key(head, me)
    header = head.header
    core = header.core
    if src.seekable():
        start = src.tell()
        _check_ciphertext(src, header)
        src.seek(start)
    dec = stream.Decryptor(stream.payload_key(key, core.packet_id), payload_aad(core.raw))
    hasher = CiphertextHasher(header)
    unpad = padding.Unpadder(out.write)
    remaining = header.ct_len
    while remaining:
        n = min(stream.CT_CHUNK, remaining)
        chunk = src.read(n)
        while len(chunk) < n:  # short reads from pipes
            more = src.read(n - len(chunk))
            if not more:
                raise TruncatedError(
                    f"ciphertext ends after {header.ct_len - remaining + len(chunk)} of {header.ct_len} bytes"
                )
            chunk += more
        remaining -= n
        hasher.update(chunk)
        try:
            unpad.feed(dec.open(chunk, last=remaining == 0))
        except stream.ChunkError as exc:
            raise PayloadError(f"payload {exc}", hint="the ciphertext was modified, reordered or cut") from None
    if src.read(1):
        raise TrailingDataError("bytes follow the end of the packet")
    hasher.finish()
    try:
        size = unpad.finish()
    except ValueError as exc:
        raise PayloadError(f"payload {exc}") from None
    return Opened(*_described(core), head.digest, size, replaced)


def _check_ciphertext(src: BinaryIO, header: Header) -> None:
    """The ciphertext that follows the head has the signed length and SHA-256, and nothing follows it (streamed:
    `open` checks it before decrypting, `inspect` for a large packet)."""
    hasher = CiphertextHasher(header)
    while hasher.received < header.ct_len:
        data = src.read(min(1 << 20, header.ct_len - hasher.received))
        if not data:
            break  # finish() says how far it got
        hasher.update(data)
    if src.read(1):
        raise TrailingDataError("bytes follow the end of the packet")
    hasher.finish()


def _described(core: Core) -> tuple[bytes, str, tuple[str, ...], Labels, int, int]:
    """The signed facts `Opened` and `Inspection` both begin with, in their order."""
    return core.packet_id, core.sender, core.recipients, core.labels, core.created, core.expires


def inspect_packet(
    src: BinaryIO, *, sender: identity.PublicBundle | None = None, check_ciphertext: bool = True
) -> Inspection:
    """Parse a packet as a broker would; verify the signature if `sender` is given, and (by default) that the
    ciphertext has the signed length and hash and that nothing follows it."""
    head = read_head(src)
    header = head.header
    ct_len = header.ct_len
    if sender is not None:
        head.verify(sender)
    if check_ciphertext and ct_len <= _ONE_READ:
        # Small packets (the common case for a broker) in one read and one hash, without the streaming hasher.
        data = src.read(ct_len + 1)
        if len(data) > ct_len:
            raise TrailingDataError("bytes follow the end of the packet")
        if len(data) < ct_len:
            raise TruncatedError(f"ciphertext ends after {len(data)} of {ct_len} bytes")
        if hashlib.sha256(data).digest() != header.ct_sha256:
            raise PayloadError("ciphertext does not match the SHA-256 in the signed header")
    elif check_ciphertext:
        _check_ciphertext(src, header)
    core = header.core
    stanzas = header.stanzas
    # One stanza per recipient is the common case; its type set needs no set or sort.
    types = (stanzas[0].type,) if len(stanzas) == 1 else tuple(sorted({s.type for s in stanzas}))
    return _new(
        Inspection,
        (
            *_described(core),
            len(header.raw),
            ct_len,
            head.head_size + ct_len,
            hashlib.sha256(header.raw).digest(),
            types,
            sender is not None,
            check_ciphertext,
        ),
    )


__all__ = ["Inspection", "Opened", "PacketError", "check_time", "inspect_packet", "open_packet", "read_head"]
