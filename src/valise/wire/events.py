"""The messages of wire protocol version 1, as frozen dataclasses (specs/wire.md, "Messages").

One class per message type; the same objects are sent (`Connection.send`) and received (`Connection.next_event`).
Field names are the wire names. Lists are tuples so that events are hashable and immutable. Signed payloads
(receipts, acknowledgements, retractions, statements, checkpoints, cosignatures) are opaque `bytes`: their
formats belong to specs/protocol.md, specs/policy.md and specs/log.md, and their signatures are checked by the
daemons, not here.

Naming: `rid` is a request id chosen by the side that sends the request (one space per direction); `seq` is the
position of an item in the receiving member's mailbox at the broker (strictly increasing on a connection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from valise.errors import RemoteError
from valise.wire.limits import Limits


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message; `TYPE` is the value of the frame's `t` key."""

    TYPE: ClassVar[str] = ""


# --- handshake -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Client → server, first frame. `seen` is the size of the last checkpoint the client verified (0 if none)."""

    TYPE: ClassVar[str] = "hello"
    versions: tuple[int, ...]
    member: str
    role: str  # "node" or "auditor"
    seen: int
    limits: Limits


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Server → client, answer to `hello`. `time` is the server clock (Unix seconds) for the client to compare."""

    TYPE: ClassVar[str] = "welcome"
    version: int
    broker: str
    time: int
    limits: Limits


# --- submitting a packet (client → server) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitBegin(Message):
    """Opens an upload: `head` is magic ‖ header ‖ signature, `size` the number of ciphertext bytes to follow."""

    TYPE: ClassVar[str] = "submit-begin"
    rid: int
    head: bytes
    size: int


@dataclass(frozen=True, slots=True)
class SubmitChunk(Message):
    TYPE: ClassVar[str] = "submit-chunk"
    rid: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SubmitEnd(Message):
    """Closes an upload; the chunks MUST add up to the declared `size`."""

    TYPE: ClassVar[str] = "submit-end"
    rid: int


@dataclass(frozen=True, slots=True)
class SubmitCancel(Message):
    """Abandons an open upload (the server still answers the request, e.g. with `error` code `cancelled`)."""

    TYPE: ClassVar[str] = "submit-cancel"
    rid: int


@dataclass(frozen=True, slots=True)
class Receipt(Message):
    """Server → client: the packet is logged at `index`; `receipt` is the broker-signed receipt (protocol.md).

    `id`, `index` and `digest` repeat what the signed receipt says, for routing; a client MUST check they agree.
    """

    TYPE: ClassVar[str] = "receipt"
    rid: int
    id: bytes
    index: int
    digest: bytes
    receipt: bytes


@dataclass(frozen=True, slots=True)
class DenyReason:
    to: str
    reason: str


@dataclass(frozen=True, slots=True)
class Deny(Message):
    """Server → client: policy refused the packet (whole), with the reason for every refused recipient."""

    TYPE: ClassVar[str] = "deny"
    rid: int
    id: bytes
    reasons: tuple[DenyReason, ...]


# --- pushing mailbox items (server → client) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliverBegin(Message):
    """Opens the push of a packet (same shape as `submit-begin`)."""

    TYPE: ClassVar[str] = "deliver-begin"
    seq: int
    head: bytes
    size: int


@dataclass(frozen=True, slots=True)
class DeliverChunk(Message):
    TYPE: ClassVar[str] = "deliver-chunk"
    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DeliverEnd(Message):
    TYPE: ClassVar[str] = "deliver-end"
    seq: int


@dataclass(frozen=True, slots=True)
class DeliverCancel(Message):
    """Abandons an open delivery (the item stays in the mailbox and is pushed again later)."""

    TYPE: ClassVar[str] = "deliver-cancel"
    seq: int
    code: str


@dataclass(frozen=True, slots=True)
class AckForward(Message):
    """A recipient's signed acknowledgement (`ack`, logged at `index`) of packet `id`, forwarded to its sender."""

    TYPE: ClassVar[str] = "ack-forward"
    seq: int
    id: bytes
    by: str
    index: int
    ack: bytes


@dataclass(frozen=True, slots=True)
class RetractForward(Message):
    """A sender's signed retraction (logged at `index`) of packet `id`, forwarded to a recipient."""

    TYPE: ClassVar[str] = "retract-forward"
    seq: int
    id: bytes
    by: str
    index: int
    retraction: bytes


# --- confirming pushed items (client → server) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Confirms a delivered packet with the recipient's signed acknowledgement (protocol.md)."""

    TYPE: ClassVar[str] = "ack"
    seq: int
    id: bytes
    ack: bytes


@dataclass(frozen=True, slots=True)
class Seen(Message):
    """Confirms a forwarded notice (`ack-forward` or `retract-forward`)."""

    TYPE: ClassVar[str] = "seen"
    seq: int


@dataclass(frozen=True, slots=True)
class Refuse(Message):
    """Confirms a pushed item (a delivery or a notice) without taking it: it failed the node's checks. The broker
    stops counting it against `pushes` but keeps it in the mailbox (wire.md rule 13)."""

    TYPE: ClassVar[str] = "refuse"
    seq: int
    code: str
    message: str


# --- other requests and their answers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retract(Message):
    TYPE: ClassVar[str] = "retract"
    rid: int
    id: bytes
    retraction: bytes


@dataclass(frozen=True, slots=True)
class RetractResult(Message):
    TYPE: ClassVar[str] = "retract-result"
    rid: int
    index: int
    receipt: bytes


@dataclass(frozen=True, slots=True)
class Statement(Message):
    """A member's signed policy statement (policy.md), to be checked and logged like `broker statement add`."""

    TYPE: ClassVar[str] = "statement"
    rid: int
    statement: bytes


@dataclass(frozen=True, slots=True)
class StatementResult(Message):
    TYPE: ClassVar[str] = "statement-result"
    rid: int
    index: int
    receipt: bytes


@dataclass(frozen=True, slots=True)
class GetCheckpoint(Message):
    TYPE: ClassVar[str] = "get-checkpoint"
    rid: int


@dataclass(frozen=True, slots=True)
class Checkpoint(Message):
    """The latest checkpoint: a signed note with its cosignatures (log.md), as bytes."""

    TYPE: ClassVar[str] = "checkpoint"
    rid: int
    checkpoint: bytes


@dataclass(frozen=True, slots=True)
class GetInclusion(Message):
    """Asks for the inclusion proof of leaf `index` in the tree of `size` leaves (index < size)."""

    TYPE: ClassVar[str] = "get-inclusion"
    rid: int
    index: int
    size: int


@dataclass(frozen=True, slots=True)
class Inclusion(Message):
    TYPE: ClassVar[str] = "inclusion"
    rid: int
    proof: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class GetConsistency(Message):
    """Asks for the consistency proof between trees of `old` and `new` leaves (old ≤ new)."""

    TYPE: ClassVar[str] = "get-consistency"
    rid: int
    old: int
    new: int


@dataclass(frozen=True, slots=True)
class Consistency(Message):
    TYPE: ClassVar[str] = "consistency"
    rid: int
    proof: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class GetEntries(Message):
    """Asks for log entries [start, end) of the signed tree (end - start ≤ MAX_ENTRIES)."""

    TYPE: ClassVar[str] = "get-entries"
    rid: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Entries(Message):
    """Log entries from `start` on, in order. For the offsets listed in `hashed`, the item is instead the 32-byte
    RFC 6962 root of the complete subtree of 2^`levels[i]` entries that starts there (level 0: one entry's leaf
    hash), standing for records the requester may not read: it can still recompute the tree root, at a cost
    that grows with what it may read, not with the log. The server MAY cover less than asked (at least one
    item) to fit a frame.
    """

    TYPE: ClassVar[str] = "entries"
    rid: int
    start: int
    entries: tuple[bytes, ...]
    hashed: tuple[int, ...]
    levels: tuple[int, ...]

    def covered(self) -> int:
        """How many log entries the items stand for."""
        return len(self.entries) - len(self.hashed) + sum(1 << level for level in self.levels)


@dataclass(frozen=True, slots=True)
class CosignRequest(Message):
    """Server → client: please cosign `checkpoint`, consistent with the tree of `old` leaves by `proof`."""

    TYPE: ClassVar[str] = "cosign-request"
    rid: int
    old: int
    proof: tuple[bytes, ...]
    checkpoint: bytes


@dataclass(frozen=True, slots=True)
class CosignResponse(Message):
    """Client → server: the witness cosignature line(s) (C2SP tlog-cosignature) as bytes."""

    TYPE: ClassVar[str] = "cosign-response"
    rid: int
    cosignature: bytes


# --- either direction -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credit(Message):
    """Grants the peer `amount` more bytes of chunk data (flow control)."""

    TYPE: ClassVar[str] = "credit"
    amount: int


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    n: int


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    n: int


@dataclass(frozen=True, slots=True)
class ErrorMessage(Message):
    """An error. With a `rid` it answers that request of the peer; without (`None`), it is fatal and final."""

    TYPE: ClassVar[str] = "error"
    rid: int | None
    code: str
    message: str

    def as_exception(self) -> RemoteError:
        return RemoteError(self.code, f"peer reported {self.code}: {self.message}")


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """The sender's last frame: it sends nothing more; unanswered requests are void."""

    TYPE: ClassVar[str] = "goodbye"
    message: str


# --- not a message ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The byte stream ended at a frame boundary; `clean` when the peer had said `goodbye` or sent a fatal error."""

    clean: bool


MESSAGE_TYPES: tuple[type[Message], ...] = (
    Hello,
    Welcome,
    SubmitBegin,
    SubmitChunk,
    SubmitEnd,
    SubmitCancel,
    Receipt,
    Deny,
    DeliverBegin,
    DeliverChunk,
    DeliverEnd,
    DeliverCancel,
    AckForward,
    RetractForward,
    Ack,
    Seen,
    Refuse,
    Retract,
    RetractResult,
    Statement,
    StatementResult,
    GetCheckpoint,
    Checkpoint,
    GetInclusion,
    Inclusion,
    GetConsistency,
    Consistency,
    GetEntries,
    Entries,
    CosignRequest,
    CosignResponse,
    Credit,
    Ping,
    Pong,
    ErrorMessage,
    Goodbye,
)

Event = Message | ConnectionClosed
