"""The broker's decision on a submitted packet head (pure; specs/protocol.md, "Relaying a packet").

`admit` runs steps 2-6 of the relay order on a head that already passed the frame limits: the peer is the
sender, the signature verifies under the sender's key as of now, the stanzas match `to` (checked by the
header parser), policy allows every recipient, and the packet is not a replay and lies within the time window.
It returns what the daemon should do; it never raises for a bad packet, because every refusal must reach the
sender as an answer with a code, not as a dropped connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from valise.broker.mailbox import PacketRow
from valise.crypto import sign
from valise.errors import Error, SignatureError
from valise.packet import Head, parse_head
from valise.packet.format import HEADER_DOMAIN
from valise.policy.decide import PacketMeta, decide
from valise.policy.state import ACTIVE, PolicyState
from valise.records import ENTRY_MAX
from valise.wire import codes

# How far a packet's `created` may be from the broker's clock. Wide enough for a node whose outbox held a packet
# through a short outage and for loose clocks; narrow enough that a replayed packet cannot come back much later
# (and the (sender, packet id) index refuses it anyway while the packet is known).
DEFAULT_WINDOW = 600
# The packet log entry adds a few fields around the signed header and signature.
ENTRY_OVERHEAD = 256


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the submission with an error code and a message for a person."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Denied:
    """Policy refused it: the reason for every refused recipient."""

    reasons: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The same packet again (same sender, id and header digest): answer with the receipt it already has."""

    row: PacketRow


@dataclass(frozen=True, slots=True)
class Admitted:
    head: Head
    meta: PacketMeta


Outcome = Reject | Denied | Duplicate | Admitted


def parse_submitted_head(head_bytes: bytes, size: int) -> Head | Reject:
    """Parse the `head` of a `submit-begin`: exactly one complete head whose ciphertext length is `size`."""
    try:
        head = parse_head(head_bytes)
    except Error as exc:
        return Reject(codes.BAD_PACKET, f"packet head does not parse: {exc}")
    if not isinstance(head, Head) or head.head_size != len(head_bytes):
        return Reject(codes.BAD_PACKET, "submit-begin must carry exactly the packet head (prefix, header, signature)")
    if head.header.ct_len != size:
        return Reject(codes.BAD_PACKET, f"declared size {size} is not the header's ciphertext length")
    if len(head.header.raw) + len(head.signature) + ENTRY_OVERHEAD > ENTRY_MAX:
        return Reject(codes.BAD_PACKET, f"packet header is too large for a log entry ({ENTRY_MAX} bytes)")
    return head


def meta_of(head: Head) -> PacketMeta:
    core = head.core
    labels = core.labels
    return PacketMeta(
        sender=core.sender,
        to=core.recipients,
        tlp=labels.tlp.label,
        categories=tuple(labels.categories),
        operation=labels.operation,
        size=head.total_size,
        created=core.created,
        expires=core.expires,
    )


def admit(
    state: PolicyState,
    peer: str,
    head: Head,
    known: PacketRow | None,
    now: int,
    window: int = DEFAULT_WINDOW,
    *,
    signature_checked_with: bytes | None = None,
) -> Outcome:
    """Decide on a submitted packet. `signature_checked_with` is the key a previous `admit` of this same `head`
    verified its signature with: deciding again (the policy may have changed while the ciphertext streamed in)
    then checks the signature again only if the sender's key has changed since."""
    core = head.core
    if core.sender != peer:
        return Reject(codes.SENDER_MISMATCH, f"packet is from {core.sender}, but this connection is {peer}'s")
    member = state.members.get(peer)
    if member is None or member.status != ACTIVE:
        return Reject(codes.SUSPENDED if member else codes.UNKNOWN_MEMBER, f"{peer} may not send now")
    if signature_checked_with != member.sign_key:
        try:
            sign.verify(
                member.sign_key, HEADER_DOMAIN, head.header.raw, head.signature, what=f"header signed by {peer}"
            )
        except SignatureError as exc:
            return Reject(codes.BAD_SIGNATURE, str(exc))
    if known is not None and known.digest == head.digest:
        # The same packet again (a retry after a lost receipt): it is in the log already, so it gets its receipt
        # whatever the policy or the clock now say (protocol.md, "Relaying a packet").
        return Duplicate(known)
    meta = meta_of(head)
    decision = decide(state, meta, now)
    if not decision.allowed:
        return Denied(tuple((v.recipient, v.reason) for v in decision.denied))
    if known is not None:
        return Reject(codes.REPLAY, f"packet id {core.packet_id.hex()} was already used by {peer} for another packet")
    if core.expires <= now:
        return Reject(codes.STALE, f"packet expired at {core.expires} (broker time {now})")
    if abs(core.created - now) > window:
        return Reject(codes.STALE, f"packet created at {core.created}, more than {window} s from broker time {now}")
    return Admitted(head, meta)
