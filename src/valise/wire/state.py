"""The grammar of a valise connection (specs/wire.md, "State machine").

Everything that decides whether a message may be sent or received in the current state lives in this file, and
nothing else does: `Grammar.process(sender, message)` either accepts the message and updates the state, or raises
LocalProtocolError with the error code to report. The same call checks what we are about to send and what the
peer sent; the connection (connection.py) turns errors about received messages into RemoteProtocolError.

The state is small and bounded by the announced limits:
- the handshake: `hello` (client, first), then `welcome` or a fatal `error` (server);
- requests in flight per direction (`rid` → kind, upload progress, answered?), at most `requests` of the receiver;
- the flow-control window per direction (bytes of chunk data the sender may still send);
- the broker's pushes: at most one open delivery, the last `seq`, the items pushed but not confirmed;
- pings in flight per direction; which sides have said their last word (`goodbye` or a fatal `error`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from valise.errors import LocalProtocolError
from valise.wire import codes
from valise.wire import events as ev
from valise.wire.limits import MAX_PINGS, MAX_WINDOW, SUPPORTED_VERSIONS, Limits


class Role(enum.Enum):
    CLIENT = "client"  # a node or an auditor
    SERVER = "server"  # the broker

    @property
    def other(self) -> Role:
        return Role.SERVER if self is Role.CLIENT else Role.CLIENT


class State(enum.Enum):
    HANDSHAKE = "handshake"  # until `welcome` (or a fatal error) has passed
    OPEN = "open"
    CLOSING = "closing"  # one side has said its last word
    CLOSED = "closed"  # both sides have
    ERROR = "error"  # a protocol error happened; only a fatal `error` frame may still be sent (sticky)


CLIENT_SENDS = frozenset(
    {
        ev.Hello,
        ev.SubmitBegin,
        ev.SubmitChunk,
        ev.SubmitEnd,
        ev.SubmitCancel,
        ev.Ack,
        ev.Seen,
        ev.Refuse,
        ev.Retract,
        ev.Statement,
        ev.GetCheckpoint,
        ev.GetInclusion,
        ev.GetConsistency,
        ev.GetEntries,
        ev.CosignResponse,
    }
)
SERVER_SENDS = frozenset(
    {
        ev.Welcome,
        ev.Receipt,
        ev.Deny,
        ev.DeliverBegin,
        ev.DeliverChunk,
        ev.DeliverEnd,
        ev.DeliverCancel,
        ev.AckForward,
        ev.RetractForward,
        ev.RetractResult,
        ev.StatementResult,
        ev.Checkpoint,
        ev.Inclusion,
        ev.Consistency,
        ev.Entries,
        ev.CosignRequest,
    }
)
# Messages that exist only between the broker and a member node: an auditor reads the log and witnesses it.
NODE_ONLY = frozenset(
    {
        ev.SubmitBegin,
        ev.SubmitChunk,
        ev.SubmitEnd,
        ev.SubmitCancel,
        ev.Ack,
        ev.Seen,
        ev.Refuse,
        ev.Retract,
        ev.Statement,
        ev.Receipt,
        ev.Deny,
        ev.DeliverBegin,
        ev.DeliverChunk,
        ev.DeliverEnd,
        ev.DeliverCancel,
        ev.AckForward,
        ev.RetractForward,
        ev.RetractResult,
        ev.StatementResult,
    }
)
# Request type → the message types that answer it (besides an `error` with its rid).
ANSWERS: dict[type[ev.Message], tuple[type[ev.Message], ...]] = {
    ev.SubmitBegin: (ev.Receipt, ev.Deny),
    ev.Retract: (ev.RetractResult,),
    ev.Statement: (ev.StatementResult,),
    ev.GetCheckpoint: (ev.Checkpoint,),
    ev.GetInclusion: (ev.Inclusion,),
    ev.GetConsistency: (ev.Consistency,),
    ev.GetEntries: (ev.Entries,),
    ev.CosignRequest: (ev.CosignResponse,),
}
REQUESTS = frozenset(ANSWERS)
ANSWER_TYPES = frozenset(t for ts in ANSWERS.values() for t in ts)


def _unexpected(what: str) -> LocalProtocolError:
    return LocalProtocolError(what, code=codes.UNEXPECTED_FRAME)


@dataclass(slots=True)
class Transfer:
    """The ciphertext of one packet in transit (a submission's upload or a delivery)."""

    size: int
    received: int = 0


@dataclass(slots=True)
class Request:
    """A request in flight; a submission also carries its upload, open until `submit-end` or `submit-cancel`."""

    kind: type[ev.Message]
    upload: Transfer | None = None
    ended: bool = False  # `submit-end` passed: a receipt may now answer
    answered: bool = False


@dataclass(slots=True)
class Grammar:
    state: State = State.HANDSHAKE
    hello: ev.Hello | None = None
    welcome: ev.Welcome | None = None
    limits: dict[Role, Limits] = field(default_factory=dict)  # what each side announced it accepts
    requests: dict[Role, dict[int, Request]] = field(default_factory=lambda: {Role.CLIENT: {}, Role.SERVER: {}})
    window: dict[Role, int] = field(default_factory=lambda: {Role.CLIENT: 0, Role.SERVER: 0})  # may still send
    pings: dict[Role, set[int]] = field(default_factory=lambda: {Role.CLIENT: set(), Role.SERVER: set()})
    finished: set[Role] = field(default_factory=set)  # said `goodbye` or sent a fatal `error`
    delivery: tuple[int, Transfer] | None = None  # the open delivery: (seq, progress)
    last_seq: int = -1
    unacked: dict[int, type[ev.Message]] = field(default_factory=dict)  # seq → DeliverBegin / AckForward / ...

    # --- queries for the connection and the daemon ------------------------------------------------------------

    @property
    def awaiting_welcome(self) -> bool:
        """The server has received `hello` and owes `welcome` (or a fatal error) before reading anything else."""
        return self.hello is not None and self.welcome is None and Role.SERVER not in self.finished

    def push_room(self) -> int:
        """How many more mailbox items the server may push before the client confirms some."""
        if Role.CLIENT not in self.limits:
            return 0
        held = len(self.unacked) + (1 if self.delivery else 0)
        return max(0, self.limits[Role.CLIENT].pushes - held)

    def request_room(self, sender: Role) -> int:
        """How many more requests `sender` may start now."""
        receiver = sender.other
        if receiver not in self.limits:
            return 0
        return max(0, self.limits[receiver].requests - len(self.requests[sender]))

    # --- the one entry point ------------------------------------------------------------------------------------

    def process(self, sender: Role, msg: ev.Message) -> None:
        """Accept `msg` from `sender` and update the state, or raise LocalProtocolError (state unchanged)."""
        if sender in self.finished:
            raise _unexpected(f"{msg.TYPE} from the {sender.value} after its last word (goodbye or error)")
        if self.state is State.HANDSHAKE:
            self._handshake(sender, msg)
            return
        kind = type(msg)
        if (kind in CLIENT_SENDS and sender is not Role.CLIENT) or (kind in SERVER_SENDS and sender is not Role.SERVER):
            raise _unexpected(f"{msg.TYPE} may not be sent by the {sender.value}")
        if kind in (ev.Hello, ev.Welcome):
            raise _unexpected(f"{msg.TYPE} after the handshake")
        if kind in NODE_ONLY and self.hello is not None and self.hello.role != "node":
            raise LocalProtocolError(f"{msg.TYPE} is not allowed with an {self.hello.role}", code=codes.NOT_ALLOWED)
        if kind in REQUESTS:
            self._request(sender, msg)
        elif kind in ANSWER_TYPES:
            self._answer(sender.other, getattr(msg, "rid"), msg)  # noqa: B009 - every answer type has a rid
        else:
            self._other(sender, msg)

    # --- handshake ----------------------------------------------------------------------------------------------

    def _handshake(self, sender: Role, msg: ev.Message) -> None:
        if self.hello is None:
            if sender is Role.SERVER:
                if isinstance(msg, ev.ErrorMessage) and msg.rid is None:
                    # The server gave up waiting for hello (wire.md, Timeouts): its one and last word.
                    self._finish(Role.SERVER)
                    return
                raise _unexpected(f"{msg.TYPE} from the server before the client's hello (the client speaks first)")
            if not isinstance(msg, ev.Hello):
                raise LocalProtocolError(
                    f"expected hello as the first frame, got {msg.TYPE}", code=codes.EXPECTED_HELLO
                )
            self.hello = msg
            self.limits[Role.CLIENT] = msg.limits
            return
        if sender is Role.CLIENT:
            raise _unexpected(f"{msg.TYPE} from the client before the server's welcome")
        if isinstance(msg, ev.ErrorMessage) and msg.rid is None:
            self._finish(Role.SERVER)
            return
        if not isinstance(msg, ev.Welcome):
            raise LocalProtocolError(
                f"expected welcome or error in answer to hello, got {msg.TYPE}", code=codes.EXPECTED_WELCOME
            )
        if msg.version not in self.hello.versions or msg.version not in SUPPORTED_VERSIONS:
            raise LocalProtocolError(
                f"welcome chose version {msg.version}; offered {list(self.hello.versions)}, "
                f"supported {list(SUPPORTED_VERSIONS)}",
                code=codes.UNSUPPORTED_VERSION,
            )
        self.welcome = msg
        self.limits[Role.SERVER] = msg.limits
        self.window[Role.CLIENT] = msg.limits.window
        self.window[Role.SERVER] = self.hello.limits.window
        self.state = State.OPEN

    def _finish(self, sender: Role) -> None:
        self.finished.add(sender)
        self.state = State.CLOSED if len(self.finished) == 2 else State.CLOSING

    # --- requests and answers -----------------------------------------------------------------------------------

    def _request(self, sender: Role, msg: ev.Message) -> None:
        rid: int = getattr(msg, "rid")  # noqa: B009 - every request type has a rid
        mine = self.requests[sender]
        if rid in mine:
            raise LocalProtocolError(f"{msg.TYPE} reuses rid {rid}, still in flight", code=codes.DUPLICATE_REQUEST)
        if self.request_room(sender) == 0:
            raise LocalProtocolError(
                f"{msg.TYPE} rid {rid} would be request {len(mine) + 1} in flight, over the limit of "
                f"{self.limits[sender.other].requests}",
                code=codes.TOO_MANY_REQUESTS,
            )
        request = Request(type(msg))
        if isinstance(msg, ev.SubmitBegin):
            self._check_size(msg.TYPE, msg.size, sender.other)
            request.upload = Transfer(msg.size)
        mine[rid] = request

    def _answer(self, requester: Role, rid: int, msg: ev.Message) -> None:
        request = self.requests[requester].get(rid)
        if request is None or request.answered:
            raise _unexpected(f"{msg.TYPE} for rid {rid}, which is not awaiting an answer")
        if not isinstance(msg, ev.ErrorMessage):
            if type(msg) not in ANSWERS[request.kind]:
                raise _unexpected(f"{msg.TYPE} does not answer {request.kind.TYPE} (rid {rid})")
            if isinstance(msg, ev.Receipt) and not request.ended:
                raise _unexpected(f"receipt for rid {rid} before its upload ended")
        request.answered = True
        self._retire(requester, rid, request)

    def _retire(self, requester: Role, rid: int, request: Request) -> None:
        if request.answered and request.upload is None:
            del self.requests[requester][rid]

    def _upload(self, msg: ev.SubmitChunk | ev.SubmitEnd | ev.SubmitCancel) -> tuple[Request, Transfer]:
        request = self.requests[Role.CLIENT].get(msg.rid)
        if request is None or request.upload is None:
            raise _unexpected(f"{msg.TYPE} for rid {msg.rid}, which has no open upload")
        return request, request.upload

    # --- everything else ------------------------------------------------------------------------------------------

    def _other(self, sender: Role, msg: ev.Message) -> None:
        receiver = sender.other
        if isinstance(msg, ev.SubmitChunk):
            _, upload = self._upload(msg)
            self._consume(sender, upload, msg.data, f"submit-chunk rid {msg.rid}")
        elif isinstance(msg, ev.SubmitEnd | ev.SubmitCancel):
            request, upload = self._upload(msg)
            if isinstance(msg, ev.SubmitEnd):
                self._check_complete(upload, f"submit-end rid {msg.rid}")
                request.ended = True
            request.upload = None
            self._retire(sender, msg.rid, request)
        elif isinstance(msg, ev.DeliverBegin):
            if self.delivery is not None:
                raise _unexpected(f"deliver-begin seq {msg.seq} while seq {self.delivery[0]} is still open")
            self._check_push(msg.TYPE, msg.seq)
            self._check_size(msg.TYPE, msg.size, receiver)
            self.delivery = (msg.seq, Transfer(msg.size))
            self.last_seq = msg.seq
        elif isinstance(msg, ev.DeliverChunk | ev.DeliverEnd | ev.DeliverCancel):
            if self.delivery is None or self.delivery[0] != msg.seq:
                raise _unexpected(f"{msg.TYPE} for seq {msg.seq}, which is not the open delivery")
            transfer = self.delivery[1]
            if isinstance(msg, ev.DeliverChunk):
                self._consume(sender, transfer, msg.data, f"deliver-chunk seq {msg.seq}")
                return
            if isinstance(msg, ev.DeliverEnd):
                self._check_complete(transfer, f"deliver-end seq {msg.seq}")
                self.unacked[msg.seq] = ev.DeliverBegin
            self.delivery = None
        elif isinstance(msg, ev.AckForward | ev.RetractForward):
            self._check_push(msg.TYPE, msg.seq)
            self.last_seq = msg.seq
            self.unacked[msg.seq] = type(msg)
        elif isinstance(msg, ev.Ack | ev.Seen | ev.Refuse):
            pushed = self.unacked.get(msg.seq)
            wanted = isinstance(msg, ev.Refuse) or isinstance(msg, ev.Ack) == (pushed is ev.DeliverBegin)
            if pushed is None or not wanted:
                what = {ev.Ack: "a delivered packet", ev.Seen: "a forwarded notice"}.get(type(msg), "a pushed item")
                raise _unexpected(f"{msg.TYPE} for seq {msg.seq}, which is not {what} awaiting confirmation")
            del self.unacked[msg.seq]
        elif isinstance(msg, ev.Credit):
            if self.window[receiver] + msg.amount > MAX_WINDOW:
                raise LocalProtocolError(
                    f"credit of {msg.amount} would open the window to "
                    f"{self.window[receiver] + msg.amount}, over {MAX_WINDOW}",
                    code=codes.FLOW_CONTROL,
                )
            self.window[receiver] += msg.amount
        elif isinstance(msg, ev.Ping):
            if msg.n in self.pings[sender]:
                raise LocalProtocolError(f"ping {msg.n} is already in flight", code=codes.DUPLICATE_REQUEST)
            if len(self.pings[sender]) >= MAX_PINGS:
                raise LocalProtocolError(f"more than {MAX_PINGS} pings in flight", code=codes.TOO_MANY_REQUESTS)
            self.pings[sender].add(msg.n)
        elif isinstance(msg, ev.Pong):
            if msg.n not in self.pings[receiver]:
                raise _unexpected(f"pong {msg.n} answers no ping")
            self.pings[receiver].discard(msg.n)
        elif isinstance(msg, ev.ErrorMessage):
            if msg.rid is None:
                self._finish(sender)
            else:
                self._answer(receiver, msg.rid, msg)
        elif isinstance(msg, ev.Goodbye):
            self._finish(sender)
        else:  # pragma: no cover - every message type is handled above
            raise _unexpected(f"{msg.TYPE} has no rule")

    def _check_size(self, what: str, size: int, receiver: Role) -> None:
        limit = self.limits[receiver].packet
        if size > limit:
            raise LocalProtocolError(
                f"{what} declares {size} bytes, over the limit of {limit}", code=codes.LIMIT_EXCEEDED
            )

    def _check_push(self, what: str, seq: int) -> None:
        if seq <= self.last_seq:
            raise _unexpected(f"{what} seq {seq} does not follow seq {self.last_seq}")
        if self.push_room() == 0:
            raise LocalProtocolError(
                f"{what} seq {seq} is over the limit of {self.limits[Role.CLIENT].pushes} unconfirmed pushes",
                code=codes.FLOW_CONTROL,
            )

    def _consume(self, sender: Role, transfer: Transfer, data: bytes, what: str) -> None:
        chunk = self.limits[sender.other].chunk
        if len(data) > chunk:
            raise LocalProtocolError(
                f"{what} carries {len(data)} bytes, over the chunk limit of {chunk}", code=codes.LIMIT_EXCEEDED
            )
        if len(data) > self.window[sender]:
            raise LocalProtocolError(
                f"{what} carries {len(data)} bytes, but the window has only {self.window[sender]}",
                code=codes.FLOW_CONTROL,
            )
        if transfer.received + len(data) > transfer.size:
            raise LocalProtocolError(
                f"{what} brings {transfer.received + len(data)} bytes, over the declared {transfer.size}",
                code=codes.LENGTH_MISMATCH,
            )
        self.window[sender] -= len(data)
        transfer.received += len(data)

    @staticmethod
    def _check_complete(transfer: Transfer, what: str) -> None:
        if transfer.received != transfer.size:
            raise LocalProtocolError(
                f"{what} after {transfer.received} of the declared {transfer.size} bytes", code=codes.LENGTH_MISMATCH
            )
