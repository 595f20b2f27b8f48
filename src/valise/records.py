"""Signed notices and the log records of relayed traffic (pure; specs/protocol.md, "Records").

A log entry is a canonical msgpack map whose "t" names its type. The policy module owns the directory and
statement types; this module owns the traffic types:

- "pkt"      a relayed packet: the sender's signed header bytes and signature, and when the broker took it.
             The auditor re-verifies the signature with the sender's key as of that log position and reads
             from/to/labels out of the signed header itself, so the broker cannot misstate them.
- "ack"      a recipient's signed acknowledgement of a delivered packet (an `Ack` notice).
- "retract"  a sender's signed retraction of a packet (a `Retraction` notice).
- "purge"    the broker's statement that a packet expired undelivered for one recipient (the log's own signature
             on the checkpoint covers it; there is nothing for a member to sign).

Notices are signed by members over domain-separated canonical bytes; the broker forwards them unchanged.
A `Receipt` is signed by the broker's identity key and promises that the packet is at `index` of the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from valise import encoding
from valise.crypto import sign
from valise.errors import EncodingError, SignatureError, StatementError

ACK_DOMAIN = sign.domain("ack")
RETRACT_DOMAIN = sign.domain("retract")
RECEIPT_DOMAIN = sign.domain("receipt")
NOTICE_MAX = 4096
ENTRY_MAX = 65535
REASON_MAX = 512


def _signed(body: bytes, sig: bytes) -> bytes:
    return encoding.pack({"body": body, "sig": sig})


def _notice(raw: bytes, what: str, fields: dict[str, type | tuple[type, ...]]) -> tuple[dict[str, Any], bytes, bytes]:
    """Decode a signed notice {"body", "sig"} without verifying it: (body fields, body bytes, signature).

    Sizes and forms are checked here, before any signature is, and every notice names a packet by its 16-byte id
    and 32-byte header digest."""
    try:
        outer = encoding.unpack_map(raw, what=what, max_size=NOTICE_MAX, fields={"body": bytes, "sig": bytes})
        m = encoding.unpack_map(outer["body"], what=f"{what} body", max_size=NOTICE_MAX, fields=fields)
    except EncodingError as exc:
        raise StatementError(f"malformed {what}: {exc.what}") from None
    if m["v"] != 1 or len(m["digest"]) != 32 or len(m["packet_id"]) != 16:
        raise StatementError(f"malformed {what}: bad version, digest or packet id length")
    return m, outer["body"], outer["sig"]


_ACK_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int,
    "packet_id": bytes,
    "digest": bytes,
    "sender": str,
    "recipient": str,
    "at": int,
}
_RETRACT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int,
    "packet_id": bytes,
    "digest": bytes,
    "sender": str,
    "reason": str,
    "at": int,
}


@dataclass(frozen=True, slots=True)
class Ack:
    """A recipient's signed statement that it received (and verified) a packet."""

    packet_id: bytes
    digest: bytes
    sender: str
    recipient: str
    at: int
    raw: bytes  # the signed notice: {"body", "sig"}

    @staticmethod
    def make(key: sign.SigningKey, packet_id: bytes, digest: bytes, sender: str, recipient: str, at: int) -> Ack:
        body = encoding.pack(
            {"v": 1, "packet_id": packet_id, "digest": digest, "sender": sender, "recipient": recipient, "at": at}
        )
        return Ack(packet_id, digest, sender, recipient, at, _signed(body, key.sign(ACK_DOMAIN, body)))

    @staticmethod
    def parse(raw: bytes) -> tuple[Ack, bytes, bytes]:
        """Decode without verifying; returns (ack, body, sig). `verified` also checks the recipient's signature."""
        m, body, sig = _notice(raw, "acknowledgement", _ACK_FIELDS)
        return Ack(m["packet_id"], m["digest"], m["sender"], m["recipient"], m["at"], raw), body, sig

    @staticmethod
    def verified(raw: bytes, recipient_key: bytes) -> Ack:
        ack, body, sig = Ack.parse(raw)
        Ack.check(body, sig, recipient_key, ack.recipient)
        return ack

    @staticmethod
    def check(body: bytes, sig: bytes, recipient_key: bytes, recipient: str) -> None:
        """Check the signature of a parsed acknowledgement (`parse` gave `body` and `sig`) by `recipient`."""
        sign.verify(recipient_key, ACK_DOMAIN, body, sig, what=f"acknowledgement by {recipient}")


@dataclass(frozen=True, slots=True)
class Retraction:
    """A sender's signed withdrawal of a packet it sent (recipients should discard it)."""

    packet_id: bytes
    digest: bytes
    sender: str
    reason: str
    at: int
    raw: bytes

    @staticmethod
    def make(key: sign.SigningKey, packet_id: bytes, digest: bytes, sender: str, reason: str, at: int) -> Retraction:
        if len(reason.encode()) > REASON_MAX:
            raise StatementError(f"retraction reason is longer than {REASON_MAX} bytes")
        body = encoding.pack(
            {"v": 1, "packet_id": packet_id, "digest": digest, "sender": sender, "reason": reason, "at": at}
        )
        return Retraction(packet_id, digest, sender, reason, at, _signed(body, key.sign(RETRACT_DOMAIN, body)))

    @staticmethod
    def parse(raw: bytes, *, logged: bool = False) -> tuple[Retraction, bytes, bytes]:
        """Decode without verifying (to route it, or to find the sender's key); returns (retraction, body, sig).

        The reason's limit is what make() allows and all a broker may accept (protocol.md). `logged`: one the log
        or a mailbox already holds, which a broker before the limit was enforced may have taken: read it all the
        same (refusing it there would jam its recipient's mailbox and the crash redo; an auditor names it)."""
        m, body, sig = _notice(raw, "retraction", _RETRACT_FIELDS)
        if not logged and len(m["reason"].encode()) > REASON_MAX:
            raise EncodingError(f"retraction reason is longer than {REASON_MAX} bytes")
        return Retraction(m["packet_id"], m["digest"], m["sender"], m["reason"], m["at"], raw), body, sig

    @staticmethod
    def verified(raw: bytes, sender_key: bytes, *, logged: bool = False) -> Retraction:
        retraction, body, sig = Retraction.parse(raw, logged=logged)
        Retraction.check(body, sig, sender_key, retraction.sender)
        return retraction

    @staticmethod
    def check(body: bytes, sig: bytes, sender_key: bytes, sender: str) -> None:
        """Check the signature of a parsed retraction (`parse` gave `body` and `sig`) by `sender`."""
        sign.verify(sender_key, RETRACT_DOMAIN, body, sig, what=f"retraction by {sender}")


@dataclass(frozen=True, slots=True)
class Receipt:
    """The broker's signed promise that a packet is at `index` of log `origin`."""

    origin: str
    index: int
    digest: bytes
    packet_id: bytes
    sender: str
    at: int
    raw: bytes

    @staticmethod
    def make(
        key: sign.SigningKey, origin: str, index: int, digest: bytes, packet_id: bytes, sender: str, at: int
    ) -> Receipt:
        body = encoding.pack(
            {
                "v": 1,
                "origin": origin,
                "index": index,
                "digest": digest,
                "packet_id": packet_id,
                "sender": sender,
                "at": at,
            }
        )
        return Receipt(origin, index, digest, packet_id, sender, at, _signed(body, key.sign(RECEIPT_DOMAIN, body)))

    @staticmethod
    def verified(raw: bytes, broker_key: bytes) -> Receipt:
        try:
            outer = encoding.unpack_map(raw, what="receipt", max_size=NOTICE_MAX, fields={"body": bytes, "sig": bytes})
            body, sig = outer["body"], outer["sig"]
            m = encoding.unpack_map(
                body,
                what="receipt body",
                max_size=NOTICE_MAX,
                fields={
                    "v": int,
                    "origin": str,
                    "index": int,
                    "digest": bytes,
                    "packet_id": bytes,
                    "sender": str,
                    "at": int,
                },
            )
        except EncodingError as exc:
            raise SignatureError(f"malformed receipt: {exc.what}") from None
        # Form before the signature, as for acknowledgements (a fuzzing review found a receipt of another version,
        # or with a 3-byte digest, taken as this one once the broker's key had signed it).
        if m["v"] != 1 or len(m["digest"]) != 32 or len(m["packet_id"]) != 16:
            raise SignatureError("malformed receipt: bad version, digest or packet id length")
        sign.verify(broker_key, RECEIPT_DOMAIN, body, sig, what="broker receipt")
        return Receipt(m["origin"], m["index"], m["digest"], m["packet_id"], m["sender"], m["at"], raw)

    @staticmethod
    def verified_for(
        raw: bytes, broker_key: bytes, *, origin: str, index: int, digest: bytes, packet_id: bytes, sender: str
    ) -> Receipt:
        """`verified`, and that it names what the request was about: this log, the index answered, the object sent
        (a packet's digest and id; a statement's id and 16 zero bytes) and the member who sent it."""
        receipt = Receipt.verified(raw, broker_key)
        facts = (receipt.origin, receipt.index, receipt.digest, receipt.packet_id, receipt.sender)
        if facts != (origin, index, digest, packet_id, sender):
            raise SignatureError("the receipt does not match the request it answers")
        return receipt


# --- log entries -------------------------------------------------------------------------------------------


def packet_entry(header: bytes, signature: bytes, received: int) -> bytes:
    entry = encoding.pack({"t": "pkt", "header": header, "sig": signature, "at": received})
    if len(entry) > ENTRY_MAX:
        raise StatementError(f"packet log entry is {len(entry)} bytes, over the log's {ENTRY_MAX}")
    return entry


def ack_entry(ack: Ack) -> bytes:
    return encoding.pack({"t": "ack", "notice": ack.raw})


def retract_entry(retraction: Retraction) -> bytes:
    return encoding.pack({"t": "retract", "notice": retraction.raw})


PURGE_NONCE_SIZE = 16


def purge_entry(digest: bytes, recipient: str, at: int, nonce: bytes | None = None) -> bytes:
    """A purge of `recipient`'s copy of packet `digest`. `nonce` (16 random bytes; the broker always gives one)
    makes the entry, and so its leaf hash, unguessable: without it, anyone who knows the digest (the sender, every
    co-recipient) could rebuild the entry, `at` being within seconds of the packet's `expires`, and find it among
    the public leaf hashes, learning that the recipient never collected the packet (protocol.md)."""
    fields: dict[str, object] = {"t": "purge", "digest": digest, "recipient": recipient, "at": at}
    if nonce is not None:
        if len(nonce) != PURGE_NONCE_SIZE:
            raise ValueError(f"a purge nonce is {PURGE_NONCE_SIZE} bytes, not {len(nonce)}")
        fields["nonce"] = nonce
    return encoding.pack(fields)


TRAFFIC_TYPES = ("pkt", "ack", "retract", "purge")


def is_traffic(entry: bytes) -> bool:
    """Whether `entry` is a traffic record (one with mailbox effects at the broker); False if it does not parse."""
    try:
        return entry_type(entry)[0] in TRAFFIC_TYPES
    except EncodingError:
        return False


def entry_type(entry: bytes) -> tuple[str, dict[str, Any]]:
    """Decode a log entry's type and fields (canonical form enforced); unknown types are returned as is."""
    m = encoding.unpack(entry, what="log entry", max_size=ENTRY_MAX)
    if not isinstance(m, dict) or not isinstance(m.get("t"), str):
        raise EncodingError("log entry has no type field 't'")
    return m["t"], m
