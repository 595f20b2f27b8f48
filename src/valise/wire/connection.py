"""A sans-IO wire connection: bytes in → events out, events in → bytes out (specs/wire.md).

The daemon owns the socket and the clock; this object owns the protocol. Typical read loop:

    conn.receive_data(await stream.receive_some(READ_SIZE))   # b"" at end of stream
    while (event := conn.next_event()) is not NEED_DATA:
        if event is PAUSED: ...answer the hello, then continue
        handle(event)

and to write: `await stream.send_all(conn.send(message))`. Any protocol violation raises, and the connection
stays in State.ERROR from then on (like h11): a RemoteProtocolError means the peer broke the rules — send it
`conn.send(ErrorMessage(None, exc.code, exc.what))` and close; a LocalProtocolError means this side tried to send
something the protocol forbids (a bug).

No timeouts here: the daemon decides them from `state` (handshake), `pending_requests`, `outstanding_pings` and
`send_window` (a peer that never grants credit), with its own clock.
"""

from __future__ import annotations

import enum

from valise.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from valise.wire import codec, codes
from valise.wire import events as ev
from valise.wire.frames import FrameReader, frame
from valise.wire.limits import DEFAULT_LIMITS, HANDSHAKE_FRAME, MAX_RID, Limits
from valise.wire.state import Grammar, Role, State

# Read at most this much per receive (and never more than `limits.frame`): see FrameReader.max_buffer.
READ_SIZE = 64 * 1024


class Signal(enum.Enum):
    NEED_DATA = "need-data"  # no complete frame buffered: read more (or the stream ended: see ConnectionClosed)
    PAUSED = "paused"  # the server must answer `hello` before any further frame is parsed


NEED_DATA = Signal.NEED_DATA
PAUSED = Signal.PAUSED


class Connection:
    """One side of one connection. `limits` are what this side accepts, announced in its hello / welcome."""

    def __init__(self, role: Role, limits: Limits = DEFAULT_LIMITS) -> None:
        codec.check_limits(limits, "our")
        self.our_role = role
        self.their_role = role.other
        self.limits = limits
        self._grammar = Grammar()
        self._reader = FrameReader(HANDSHAKE_FRAME, limits.frame)
        self._error: ProtocolError | None = None
        self._closed: ev.ConnectionClosed | None = None
        self._sent_frames = 0
        self._sent_fatal = False
        self._next_rid = 0

    # --- state, for the daemon ------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return State.ERROR if self._error is not None else self._grammar.state

    @property
    def error(self) -> ProtocolError | None:
        """The protocol error that put the connection in State.ERROR, if any."""
        return self._error

    @property
    def hello(self) -> ev.Hello | None:
        return self._grammar.hello

    @property
    def welcome(self) -> ev.Welcome | None:
        return self._grammar.welcome

    @property
    def version(self) -> int | None:
        return self._grammar.welcome.version if self._grammar.welcome else None

    @property
    def peer_limits(self) -> Limits | None:
        """What the peer accepts (from its hello / welcome); None until it has said."""
        return self._grammar.limits.get(self.their_role)

    @property
    def peer_finished(self) -> bool:
        """The peer has said its last word (goodbye or a fatal error)."""
        return self.their_role in self._grammar.finished

    @property
    def send_window(self) -> int:
        """Bytes of chunk data this side may send now (the peer grants more with `credit`)."""
        return self._grammar.window[self.our_role]

    @property
    def receive_window(self) -> int:
        """Bytes of chunk data the peer may still send; grant more with `send(Credit(n))` as data is consumed."""
        return self._grammar.window[self.their_role]

    @property
    def request_room(self) -> int:
        """How many more requests this side may start now."""
        return self._grammar.request_room(self.our_role)

    @property
    def pending_requests(self) -> frozenset[int]:
        """rids of this side's requests still in flight (unanswered, or with an open upload)."""
        return frozenset(self._grammar.requests[self.our_role])

    @property
    def peer_requests(self) -> frozenset[int]:
        """rids of the peer's requests still in flight (this side owes an answer, or the upload is open)."""
        return frozenset(self._grammar.requests[self.their_role])

    @property
    def push_room(self) -> int:
        """(Server) how many more mailbox items may be pushed before the client confirms some."""
        return self._grammar.push_room()

    @property
    def open_delivery(self) -> int | None:
        """The seq of the delivery whose chunks are flowing, if any."""
        return self._grammar.delivery[0] if self._grammar.delivery else None

    @property
    def unconfirmed(self) -> frozenset[int]:
        """seqs pushed in full and not yet confirmed by `ack` / `seen`."""
        return frozenset(self._grammar.unacked)

    @property
    def outstanding_pings(self) -> frozenset[int]:
        """This side's pings not yet answered."""
        return frozenset(self._grammar.pings[self.our_role])

    @property
    def buffered(self) -> int:
        """Bytes received and held (never more than 2 × (4 + limits.frame))."""
        return self._reader.buffered

    def new_rid(self) -> int:
        """A request id not in flight on this side (ids count up and wrap)."""
        in_flight = self._grammar.requests[self.our_role]
        while self._next_rid in in_flight:
            self._next_rid = (self._next_rid + 1) & MAX_RID
        rid = self._next_rid
        self._next_rid = (rid + 1) & MAX_RID
        return rid

    # --- bytes in → events out --------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the stream (`b""` at end of stream). A bad length prefix raises at once."""
        self._check_not_failed()
        try:
            self._reader.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def next_event(self) -> ev.Event | Signal:
        """The next event, NEED_DATA, or PAUSED (server: send welcome or error first)."""
        self._check_not_failed()
        if self._closed is not None:
            return self._closed
        if self.our_role is Role.SERVER and self._grammar.awaiting_welcome:
            return PAUSED
        payload = self._reader.next_frame()
        if payload is None:
            if not self._reader.eof:
                return NEED_DATA
            if self._reader.has_partial:
                exc = RemoteProtocolError(
                    f"stream ended inside a frame ({self._reader.buffered} bytes buffered)", code=codes.TRUNCATED
                )
                self._fail(exc)
                raise exc
            self._closed = ev.ConnectionClosed(clean=self.peer_finished)
            return self._closed
        try:
            msg = codec.decode(payload)
            self._grammar.process(self.their_role, msg)
        except LocalProtocolError as exc:
            remote = RemoteProtocolError(exc.what, code=exc.code, hint=exc.hint)
            self._fail(remote)
            raise remote from None
        return msg

    # --- events in → bytes out --------------------------------------------------------------------------------------

    def send(self, msg: ev.Message) -> bytes:
        """The frame for `msg`, after checking it is allowed now; raises LocalProtocolError if not."""
        if self._error is not None:
            return self._send_after_error(msg)
        try:
            payload = codec.encode(msg)
            self._check_frame_size(msg, payload)
            if isinstance(msg, ev.Hello | ev.Welcome) and msg.limits != self.limits:
                raise LocalProtocolError(
                    f"{msg.TYPE} must announce this connection's limits", code=codes.BAD_FIELD, hint="use conn.limits"
                )
            self._grammar.process(self.our_role, msg)
        except LocalProtocolError as exc:
            self._fail(exc)
            raise
        self._sent_frames += 1
        return frame(payload)

    def _send_after_error(self, msg: ev.Message) -> bytes:
        # After a protocol error, the one useful thing left is to tell the peer why, once.
        assert self._error is not None
        if not (isinstance(msg, ev.ErrorMessage) and msg.rid is None):
            raise LocalProtocolError(
                f"cannot send {msg.TYPE}: the connection failed ({self._error.what})", code=self._error.code
            )
        if self._sent_fatal or self.our_role in self._grammar.finished:
            raise LocalProtocolError("the fatal error frame was already sent", code=self._error.code)
        payload = codec.encode(msg)
        self._check_frame_size(msg, payload)
        self._sent_fatal = True
        self._sent_frames += 1
        return frame(payload)

    def _check_frame_size(self, msg: ev.Message, payload: bytes) -> None:
        peer = self.peer_limits
        limit = HANDSHAKE_FRAME if self._sent_frames == 0 or peer is None else peer.frame
        if len(payload) > limit:
            raise LocalProtocolError(
                f"{msg.TYPE} frame of {len(payload)} bytes is over the peer's limit of {limit}",
                code=codes.FRAME_TOO_LARGE,
            )

    # --- errors ----------------------------------------------------------------------------------------------------

    def _fail(self, exc: ProtocolError) -> None:
        if self._error is None:
            self._error = exc
        self._reader = FrameReader(HANDSHAKE_FRAME, self.limits.frame)  # drop what was buffered

    def _check_not_failed(self) -> None:
        if self._error is not None:
            cls = RemoteProtocolError if isinstance(self._error, RemoteProtocolError) else LocalProtocolError
            raise cls(f"the connection already failed: {self._error.what}", code=self._error.code)
