"""valise.wire.Connection: the grammar, flow control and sticky errors, between two peers in memory."""

from __future__ import annotations

import dataclasses

import pytest

from valise.errors import FrameTooLarge, LocalProtocolError, RemoteError, RemoteProtocolError
from valise.wire import NEED_DATA, PAUSED, Connection, Role, State, codes, frame
from valise.wire import events as ev
from valise.wire.codec import decode, encode
from valise.wire.limits import DEFAULT_LIMITS, HANDSHAKE_FRAME, KiB, Limits, MiB, choose_version
from valise.wire.pair import ConnectionPair, drain, feed

C, S = Role.CLIENT, Role.SERVER
PID = bytes(range(16))
DIGEST = bytes(32)
SMALL = Limits(frame=64 * KiB + 4 * KiB, chunk=4 * KiB, packet=1 * MiB, requests=2, window=8 * KiB, pushes=2)


def opened(client: Limits = DEFAULT_LIMITS, server: Limits = DEFAULT_LIMITS, role: str = "node") -> ConnectionPair:
    pair = ConnectionPair(client, server)
    pair.handshake(role=role)
    return pair


def violation(pair: ConnectionPair, sender: Role, *msgs: ev.Message) -> RemoteProtocolError:
    """Send `msgs` from `sender` *as raw frames* (bypassing its own checks); return the receiver's error."""
    data = b"".join(frame(encode(m)) for m in msgs)
    receiver = pair.conn(sender.other)
    with pytest.raises(RemoteProtocolError) as info:
        feed(receiver, data)
    assert receiver.state is State.ERROR
    return info.value


def refused_locally(conn: Connection, msg: ev.Message) -> LocalProtocolError:
    with pytest.raises(LocalProtocolError) as info:
        conn.send(msg)
    assert conn.state is State.ERROR
    return info.value


# --- handshake ---------------------------------------------------------------------------------------------------


def test_handshake_opens_both_sides() -> None:
    pair = ConnectionPair()
    assert pair.client.state is State.HANDSHAKE
    got = pair.send(C, pair.hello(member="DEU", seen=12))
    assert got == [pair.hello(member="DEU", seen=12)]
    assert pair.server.next_event() is PAUSED  # the server must answer before reading on
    got = pair.send(S, pair.welcome(time=1234))
    assert got == [pair.welcome(time=1234)]
    assert pair.client.state is pair.server.state is State.OPEN
    assert pair.client.version == pair.server.version == 1
    assert pair.server.hello is not None
    assert pair.server.hello.member == "DEU"
    assert pair.client.peer_limits == pair.server.limits
    assert pair.client.send_window == pair.server.receive_window == DEFAULT_LIMITS.window
    assert pair.server.next_event() is NEED_DATA


def test_first_frame_must_be_hello() -> None:
    pair = ConnectionPair()
    err = violation(pair, C, ev.Ping(1))
    assert err.code == codes.EXPECTED_HELLO
    assert "expected hello as the first frame, got ping" in str(err)
    # The daemon answers with the code, once; nothing else can be sent any more.
    reply = pair.server.send(ev.ErrorMessage(None, err.code, err.what))
    assert decode(reply[4:]) == ev.ErrorMessage(None, "expected-hello", err.what)
    with pytest.raises(LocalProtocolError, match="already sent"):
        pair.server.send(ev.ErrorMessage(None, err.code, err.what))
    with pytest.raises(LocalProtocolError, match="connection failed"):
        pair.server.send(ev.Ping(1))


def test_client_must_send_hello_before_anything() -> None:
    pair = ConnectionPair()
    err = refused_locally(pair.client, ev.GetCheckpoint(1))
    assert err.code == codes.EXPECTED_HELLO


def test_server_does_not_speak_first_and_client_waits_for_welcome() -> None:
    pair = ConnectionPair()
    assert refused_locally(pair.server, pair.welcome()).code == codes.UNEXPECTED_FRAME
    pair = ConnectionPair()
    pair.send(C, pair.hello())
    assert refused_locally(pair.client, ev.Ping(1)).code == codes.UNEXPECTED_FRAME


def test_server_reads_nothing_past_hello_until_it_answers() -> None:
    pair = ConnectionPair()
    # A client that sends before welcome breaks the rule on its side (see above); the server cannot tell it from
    # one that waited, but it parses nothing more until it has chosen the version and announced its limits.
    data = frame(encode(pair.hello())) + frame(encode(ev.Ping(1)))
    pair.server.receive_data(data)
    assert isinstance(pair.server.next_event(), ev.Hello)
    assert pair.server.next_event() is PAUSED
    assert pair.server.next_event() is PAUSED
    pair.server.send(pair.welcome())
    assert pair.server.next_event() == ev.Ping(1)


def test_server_first_frame_must_be_welcome_or_error() -> None:
    pair = ConnectionPair()
    pair.send(C, pair.hello())
    err = violation(pair, S, ev.Ping(1))
    assert err.code == codes.EXPECTED_WELCOME


def test_unsupported_version() -> None:
    assert choose_version((2, 3)) is None
    assert choose_version((1, 2)) == 1
    pair = ConnectionPair()
    got = pair.send(C, pair.hello(versions=(2, 3)))
    assert isinstance(got[0], ev.Hello)
    assert choose_version(got[0].versions) is None
    # The server refuses with a fatal error; the client sees it and a clean close.
    got = pair.send(S, ev.ErrorMessage(None, codes.UNSUPPORTED_VERSION, "this broker speaks version 1"))
    assert isinstance(got[0], ev.ErrorMessage)
    assert isinstance(got[0].as_exception(), RemoteError)
    assert got[0].as_exception().code == "unsupported-version"
    pair.client.receive_data(b"")
    assert pair.client.next_event() == ev.ConnectionClosed(clean=True)
    # A welcome that picks a version the client did not offer is refused.
    pair = ConnectionPair()
    pair.send(C, pair.hello())
    assert violation(pair, S, pair.welcome(version=2)).code == codes.UNSUPPORTED_VERSION


def test_hello_and_welcome_must_announce_the_connection_limits() -> None:
    pair = ConnectionPair()
    hello = dataclasses.replace(pair.hello(), limits=SMALL)
    assert refused_locally(pair.client, hello).code == codes.BAD_FIELD


def test_handshake_frames_are_small() -> None:
    for role in (C, S):
        pair = ConnectionPair()
        with pytest.raises(FrameTooLarge):
            pair.conn(role).receive_data((HANDSHAKE_FRAME + 1).to_bytes(4, "big"))
        assert pair.conn(role).state is State.ERROR


def test_hello_and_welcome_after_the_handshake_are_refused() -> None:
    pair = opened()
    assert violation(pair, C, pair.hello()).code == codes.UNEXPECTED_FRAME
    pair = opened()
    assert violation(pair, S, pair.welcome()).code == codes.UNEXPECTED_FRAME


# --- submissions -------------------------------------------------------------------------------------------------


def test_submit_in_chunks_then_receipt() -> None:
    pair = opened()
    data = bytes(range(256)) * 4000  # 1,024,000 bytes: under the 1 MiB default window
    chunk = DEFAULT_LIMITS.chunk
    msgs: list[ev.Message] = [ev.SubmitBegin(7, b"HEAD", len(data))]
    msgs += [ev.SubmitChunk(7, data[i : i + chunk]) for i in range(0, len(data), chunk)]
    msgs.append(ev.SubmitEnd(7))
    got = pair.send(C, *msgs)
    assert got == msgs
    assert b"".join(m.data for m in got if isinstance(m, ev.SubmitChunk)) == data
    assert pair.server.peer_requests == {7}
    assert pair.client.send_window == DEFAULT_LIMITS.window - len(data)
    receipt = ev.Receipt(7, PID, 41, DIGEST, b"signed")
    assert pair.send(S, receipt) == [receipt]
    assert pair.client.pending_requests == pair.server.peer_requests == frozenset()


def test_chunk_outside_a_submission() -> None:
    pair = opened()
    err = violation(pair, C, ev.SubmitChunk(3, b"x"))
    assert err.code == codes.UNEXPECTED_FRAME
    assert "submit-chunk for rid 3, which has no open upload" in err.what
    pair = opened()
    assert violation(pair, C, ev.SubmitEnd(3)).code == codes.UNEXPECTED_FRAME
    pair = opened()
    pair.send(C, ev.SubmitBegin(1, b"h", 1), ev.SubmitChunk(1, b"x"), ev.SubmitEnd(1))
    assert violation(pair, C, ev.SubmitChunk(1, b"y")).code == codes.UNEXPECTED_FRAME


def test_second_begin_with_the_same_rid() -> None:
    pair = opened()
    pair.send(C, ev.SubmitBegin(1, b"h", 10))
    err = violation(pair, C, ev.SubmitBegin(1, b"h", 10))
    assert err.code == codes.DUPLICATE_REQUEST
    # The rid stays busy until both the upload is closed and the answer has come.
    pair = opened()
    pair.send(C, ev.SubmitBegin(1, b"h", 0), ev.SubmitEnd(1))
    assert refused_locally(pair.client, ev.GetCheckpoint(1)).code == codes.DUPLICATE_REQUEST


def test_end_with_a_different_byte_count() -> None:
    pair = opened()
    pair.send(C, ev.SubmitBegin(1, b"h", 10), ev.SubmitChunk(1, b"123456789"))
    err = violation(pair, C, ev.SubmitEnd(1))
    assert err.code == codes.LENGTH_MISMATCH
    assert "after 9 of the declared 10 bytes" in err.what
    pair = opened()
    pair.send(C, ev.SubmitBegin(1, b"h", 10), ev.SubmitChunk(1, b"123456789"))
    err = violation(pair, C, ev.SubmitChunk(1, b"ab"))
    assert err.code == codes.LENGTH_MISMATCH
    assert "brings 11 bytes, over the declared 10" in err.what


def test_too_many_requests_in_flight() -> None:
    pair = opened(server=SMALL)
    pair.send(C, ev.SubmitBegin(1, b"h", 5), ev.GetCheckpoint(2))
    assert pair.client.request_room == 0
    err = violation(pair, C, ev.SubmitBegin(3, b"h", 5))
    assert err.code == codes.TOO_MANY_REQUESTS
    pair = opened(server=SMALL)
    pair.send(C, ev.SubmitBegin(1, b"h", 5), ev.GetCheckpoint(2))
    assert refused_locally(pair.client, ev.GetCheckpoint(3)).code == codes.TOO_MANY_REQUESTS
    # An answer frees room.
    pair = opened(server=SMALL)
    pair.send(C, ev.GetCheckpoint(1), ev.GetCheckpoint(2))
    pair.send(S, ev.Checkpoint(2, b"cp"))
    assert pair.client.request_room == 1
    pair.send(C, ev.GetCheckpoint(2))


def test_declared_size_and_chunk_size_limits() -> None:
    pair = opened(server=SMALL)
    assert violation(pair, C, ev.SubmitBegin(1, b"h", SMALL.packet + 1)).code == codes.LIMIT_EXCEEDED
    pair = opened(server=SMALL)
    pair.send(C, ev.SubmitBegin(1, b"h", 8 * KiB))
    assert violation(pair, C, ev.SubmitChunk(1, b"x" * (SMALL.chunk + 1))).code == codes.LIMIT_EXCEEDED


def test_flow_control_window_and_credit() -> None:
    pair = opened(server=SMALL)
    size = 3 * SMALL.window
    pair.send(C, ev.SubmitBegin(1, b"h", size))
    sent = 0
    while pair.client.send_window >= SMALL.chunk:
        pair.send(C, ev.SubmitChunk(1, b"x" * SMALL.chunk))
        sent += SMALL.chunk
    assert sent == SMALL.window
    assert pair.server.receive_window == 0
    # The client's own state machine refuses to overrun the window ...
    client_copy = ConnectionPair(DEFAULT_LIMITS, SMALL)
    client_copy.handshake()
    client_copy.send(C, ev.SubmitBegin(1, b"h", size))
    client_copy.send(C, *[ev.SubmitChunk(1, b"x" * SMALL.chunk)] * (SMALL.window // SMALL.chunk))
    assert refused_locally(client_copy.client, ev.SubmitChunk(1, b"x")).code == codes.FLOW_CONTROL
    # ... and the server refuses a peer that does not.
    assert violation(pair, C, ev.SubmitChunk(1, b"x")).code == codes.FLOW_CONTROL


def test_credit_reopens_the_window() -> None:
    pair = opened(server=SMALL)
    pair.send(C, ev.SubmitBegin(1, b"h", 2 * SMALL.window))
    pair.send(C, *[ev.SubmitChunk(1, b"x" * SMALL.chunk)] * (SMALL.window // SMALL.chunk))
    assert pair.send(S, ev.Credit(SMALL.window)) == [ev.Credit(SMALL.window)]
    assert pair.client.send_window == SMALL.window
    pair.send(C, *[ev.SubmitChunk(1, b"x" * SMALL.chunk)] * (SMALL.window // SMALL.chunk), ev.SubmitEnd(1))
    assert pair.server.receive_window == 0


def test_credit_overflow() -> None:
    pair = opened()
    assert violation(pair, S, ev.Credit(2**31 - 1)).code == codes.FLOW_CONTROL


def test_receipt_before_end_and_early_deny() -> None:
    pair = opened()
    pair.send(C, ev.SubmitBegin(1, b"h", 4), ev.SubmitChunk(1, b"ab"))
    err = violation(pair, S, ev.Receipt(1, PID, 1, DIGEST, b"r"))
    assert err.code == codes.UNEXPECTED_FRAME
    assert "before its upload ended" in err.what
    # A deny may come as soon as the head is known; the client then closes the upload (cancel or end).
    pair = opened()
    pair.send(C, ev.SubmitBegin(1, b"h", 4), ev.SubmitChunk(1, b"ab"))
    deny = ev.Deny(1, PID, (ev.DenyReason("DEU", "DEU has not accepted AMBER from FRA"),))
    assert pair.send(S, deny) == [deny]
    assert pair.client.pending_requests == {1}
    pair.send(C, ev.SubmitCancel(1))
    assert pair.client.pending_requests == pair.server.peer_requests == frozenset()


def test_cancel_is_answered_and_frees_the_rid() -> None:
    pair = opened()
    pair.send(C, ev.SubmitBegin(1, b"h", 4), ev.SubmitChunk(1, b"ab"), ev.SubmitCancel(1))
    assert pair.server.peer_requests == {1}
    pair.send(S, ev.ErrorMessage(1, codes.CANCELLED, "upload cancelled"))
    assert pair.client.pending_requests == frozenset()
    assert violation(pair, S, ev.ErrorMessage(1, codes.CANCELLED, "twice")).code == codes.UNEXPECTED_FRAME


def test_answers_must_match_their_request() -> None:
    pair = opened()
    pair.send(C, ev.GetInclusion(1, 3, 10))
    err = violation(pair, S, ev.Consistency(1, ()))
    assert err.code == codes.UNEXPECTED_FRAME
    assert "consistency does not answer get-inclusion" in err.what
    pair = opened()
    assert violation(pair, S, ev.Checkpoint(9, b"cp")).code == codes.UNEXPECTED_FRAME


def test_every_request_and_its_answer() -> None:
    pair = opened()
    exchanges: list[tuple[ev.Message, ev.Message]] = [
        (ev.Retract(1, PID, b"signed"), ev.RetractResult(1, 50, b"receipt")),
        (ev.Statement(2, b"signed"), ev.StatementResult(2, 51, b"receipt")),
        (ev.GetCheckpoint(3), ev.Checkpoint(3, b"checkpoint")),
        (ev.GetInclusion(4, 50, 52), ev.Inclusion(4, (b"\x01" * 32,))),
        (ev.GetConsistency(5, 40, 52), ev.Consistency(5, (b"\x02" * 32,) * 3)),
        (ev.GetEntries(7, 0, 3), ev.Entries(7, 0, (b"entry", b"\x04" * 32), (1,), (1,))),
        (ev.Statement(6, b"bad"), ev.ErrorMessage(6, codes.REFUSED, "statement signed by the wrong key")),
    ]
    for request, answer in exchanges:
        assert pair.send(C, request) == [request]
        assert pair.send(S, answer) == [answer]
    assert pair.client.pending_requests == frozenset()
    # The broker asks a witness to cosign; the witness answers (rid spaces are per direction).
    pair.send(C, ev.GetCheckpoint(0))
    cosign = ev.CosignRequest(0, 40, (b"\x03" * 32,), b"checkpoint")
    assert pair.send(S, cosign) == [cosign]
    assert pair.send(C, ev.CosignResponse(0, b"cosignature")) == [ev.CosignResponse(0, b"cosignature")]
    assert pair.send(S, ev.Checkpoint(0, b"cp")) == [ev.Checkpoint(0, b"cp")]


def test_messages_in_the_wrong_direction() -> None:
    pair = opened()
    assert violation(pair, S, ev.SubmitBegin(1, b"h", 1)).code == codes.UNEXPECTED_FRAME
    pair = opened()
    assert violation(pair, C, ev.DeliverBegin(1, b"h", 1)).code == codes.UNEXPECTED_FRAME
    pair = opened()
    assert violation(pair, C, ev.CosignRequest(1, 0, (), b"c")).code == codes.UNEXPECTED_FRAME


def test_auditor_may_read_and_witness_but_not_send() -> None:
    pair = opened(role="auditor")
    pair.send(C, ev.GetCheckpoint(1))
    pair.send(S, ev.CosignRequest(1, 0, (), b"c"))
    err = violation(pair, C, ev.SubmitBegin(2, b"h", 1))
    assert err.code == codes.NOT_ALLOWED
    assert "not allowed with an auditor" in err.what
    pair = opened(role="auditor")
    assert refused_locally(pair.server, ev.DeliverBegin(1, b"h", 1)).code == codes.NOT_ALLOWED


# --- deliveries and notices --------------------------------------------------------------------------------------


def test_delivery_ack_and_notices() -> None:
    pair = opened()
    push: list[ev.Message] = [ev.DeliverBegin(10, b"HEAD", 6), ev.DeliverChunk(10, b"abc"), ev.DeliverChunk(10, b"def")]
    assert pair.send(S, *push) == push
    assert pair.server.open_delivery == 10
    # Notices may be pushed while a delivery's chunks are still flowing.
    notice = ev.AckForward(11, PID, "DEU", 60, b"signed ack")
    assert pair.send(S, notice) == [notice]
    assert pair.send(S, ev.DeliverEnd(10)) == [ev.DeliverEnd(10)]
    assert pair.client.unconfirmed == {10, 11}
    assert pair.client.receive_window == DEFAULT_LIMITS.window - 6
    pair.send(C, ev.Ack(10, PID, b"signed ack"), ev.Seen(11), ev.Credit(6))
    assert pair.server.unconfirmed == frozenset()
    assert pair.server.send_window == DEFAULT_LIMITS.window


def test_deliveries_are_in_order_and_one_at_a_time() -> None:
    pair = opened()
    pair.send(S, ev.DeliverBegin(5, b"h", 0), ev.DeliverEnd(5))
    err = violation(pair, S, ev.DeliverBegin(5, b"h", 0))
    assert err.code == codes.UNEXPECTED_FRAME
    assert "seq 5 does not follow seq 5" in err.what
    pair = opened()
    pair.send(S, ev.DeliverBegin(5, b"h", 3))
    err = violation(pair, S, ev.DeliverBegin(6, b"h", 3))
    assert "while seq 5 is still open" in err.what
    pair = opened()
    pair.send(S, ev.DeliverBegin(5, b"h", 3))
    assert violation(pair, S, ev.DeliverChunk(4, b"x")).code == codes.UNEXPECTED_FRAME
    pair = opened()
    pair.send(S, ev.DeliverBegin(5, b"h", 3), ev.DeliverChunk(5, b"x"))
    assert violation(pair, S, ev.DeliverEnd(5)).code == codes.LENGTH_MISMATCH


def test_cancelled_delivery_needs_no_ack() -> None:
    pair = opened()
    pair.send(S, ev.DeliverBegin(5, b"h", 3), ev.DeliverChunk(5, b"x"), ev.DeliverCancel(5, codes.INTERNAL))
    assert pair.client.open_delivery is None
    assert pair.client.unconfirmed == frozenset()
    assert violation(pair, C, ev.Ack(5, PID, b"a")).code == codes.UNEXPECTED_FRAME


def test_ack_and_seen_must_match_what_was_pushed() -> None:
    pair = opened()
    pair.send(S, ev.DeliverBegin(1, b"h", 0), ev.DeliverEnd(1), ev.RetractForward(2, PID, "FRA", 9, b"r"))
    assert violation(pair, C, ev.Seen(1)).code == codes.UNEXPECTED_FRAME
    pair = opened()
    pair.send(S, ev.DeliverBegin(1, b"h", 0), ev.DeliverEnd(1), ev.RetractForward(2, PID, "FRA", 9, b"r"))
    assert violation(pair, C, ev.Ack(2, PID, b"a")).code == codes.UNEXPECTED_FRAME
    pair = opened()
    pair.send(S, ev.DeliverBegin(1, b"h", 3))
    assert violation(pair, C, ev.Ack(1, PID, b"a")).code == codes.UNEXPECTED_FRAME  # not delivered in full yet


def test_a_refusal_confirms_any_pushed_item_once_and_frees_its_slot() -> None:
    """`refuse` confirms a delivery or a notice the node will not take (it stays in the broker's mailbox)."""
    pair = opened(client=SMALL)
    pair.send(S, ev.DeliverBegin(1, b"h", 0), ev.DeliverEnd(1), ev.AckForward(2, PID, "DEU", 1, b"a"))
    assert pair.server.push_room == 0
    refusals = [ev.Refuse(1, codes.BAD_SIGNATURE, "forged"), ev.Refuse(2, codes.BAD_SIGNATURE, "forged ack")]
    assert pair.send(C, *refusals) == refusals
    assert pair.server.unconfirmed == frozenset()
    assert pair.server.push_room == 2
    assert violation(pair, C, ev.Refuse(1, codes.REFUSED, "twice")).code == codes.UNEXPECTED_FRAME
    pair = opened()
    pair.send(S, ev.DeliverBegin(1, b"h", 3))
    assert violation(pair, C, ev.Refuse(1, codes.BAD_PACKET, "early")).code == codes.UNEXPECTED_FRAME  # still open
    pair = opened()
    pair.send(S, ev.DeliverBegin(1, b"h", 0), ev.DeliverEnd(1))
    assert refused_locally(pair.server, ev.Refuse(1, codes.REFUSED, "x")).code == codes.UNEXPECTED_FRAME  # C→S only


def test_unconfirmed_pushes_are_bounded() -> None:
    pair = opened(client=SMALL)
    pair.send(S, ev.DeliverBegin(1, b"h", 0), ev.DeliverEnd(1), ev.AckForward(2, PID, "DEU", 1, b"a"))
    assert pair.server.push_room == 0
    assert violation(pair, S, ev.AckForward(3, PID, "DEU", 1, b"a")).code == codes.FLOW_CONTROL
    pair = opened(client=SMALL)
    pair.send(S, ev.DeliverBegin(1, b"h", 0), ev.DeliverEnd(1), ev.AckForward(2, PID, "DEU", 1, b"a"))
    pair.send(C, ev.Seen(2))
    assert pair.server.push_room == 1
    pair.send(S, ev.DeliverBegin(3, b"h", 0))
    assert pair.server.push_room == 0  # an open delivery counts


def test_delivery_size_over_the_client_limit() -> None:
    pair = opened(client=SMALL)
    assert violation(pair, S, ev.DeliverBegin(1, b"h", SMALL.packet + 1)).code == codes.LIMIT_EXCEEDED


# --- ping, goodbye, end of stream ----------------------------------------------------------------------------------


def test_ping_pong_both_ways() -> None:
    pair = opened()
    pair.send(C, ev.Ping(1))
    assert pair.client.outstanding_pings == {1}
    pair.send(S, ev.Ping(1), ev.Pong(1))
    pair.send(C, ev.Pong(1))
    assert pair.client.outstanding_pings == pair.server.outstanding_pings == frozenset()
    assert violation(pair, S, ev.Pong(2)).code == codes.UNEXPECTED_FRAME


def test_ping_flood_is_refused() -> None:
    pair = opened()
    pair.send(C, *[ev.Ping(n) for n in range(4)])
    assert violation(pair, C, ev.Ping(4)).code == codes.TOO_MANY_REQUESTS
    pair = opened()
    pair.send(C, ev.Ping(1))
    assert violation(pair, C, ev.Ping(1)).code == codes.DUPLICATE_REQUEST


def test_goodbye_then_clean_close() -> None:
    pair = opened()
    assert pair.send(C, ev.Goodbye("bye")) == [ev.Goodbye("bye")]
    assert pair.client.state is pair.server.state is State.CLOSING
    assert refused_locally(pair.client, ev.Ping(1)).code == codes.UNEXPECTED_FRAME
    pair = opened()
    pair.send(C, ev.Goodbye("bye"))
    pair.send(S, ev.Goodbye("bye"))
    assert pair.client.state is pair.server.state is State.CLOSED
    pair.server.receive_data(b"")
    assert pair.server.next_event() == ev.ConnectionClosed(clean=True)
    assert pair.server.next_event() == ev.ConnectionClosed(clean=True)


def test_frames_after_goodbye_are_refused() -> None:
    pair = opened()
    pair.send(C, ev.Goodbye("bye"))
    assert violation(pair, C, ev.Ping(1)).code == codes.UNEXPECTED_FRAME


def test_eof_without_goodbye_is_unclean_and_eof_inside_a_frame_is_truncated() -> None:
    pair = opened()
    pair.server.receive_data(b"")
    assert pair.server.next_event() == ev.ConnectionClosed(clean=False)
    pair = opened()
    data = frame(encode(ev.Ping(1)))
    pair.server.receive_data(data[:-1])
    assert pair.server.next_event() is NEED_DATA
    pair.server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="stream ended inside a frame") as info:
        pair.server.next_event()
    assert info.value.code == codes.TRUNCATED


# --- limits on sent frames, sticky errors -------------------------------------------------------------------------


def test_oversized_frame_is_refused_by_prefix_after_the_handshake() -> None:
    pair = opened(server=SMALL)
    with pytest.raises(FrameTooLarge):
        pair.server.receive_data((SMALL.frame + 1).to_bytes(4, "big"))
    assert pair.server.buffered == 0
    with pytest.raises(RemoteProtocolError, match="already failed"):
        pair.server.next_event()
    with pytest.raises(RemoteProtocolError, match="already failed"):
        pair.server.receive_data(b"more")


def test_sender_respects_the_peer_frame_limit() -> None:
    pair = opened(client=SMALL)
    pair.send(C, ev.SubmitBegin(1, b"h", 1))
    reasons = tuple(ev.DenyReason(f"M{i}", "r" * 1000) for i in range(100))  # ~100 KiB, over SMALL.frame
    err = refused_locally(pair.server, ev.Deny(1, PID, reasons))
    assert err.code == codes.FRAME_TOO_LARGE
    assert "over the peer's limit of 69632" in err.what


def test_local_error_is_sticky() -> None:
    pair = opened()
    err = refused_locally(pair.client, ev.SubmitEnd(1))
    assert err.code == codes.UNEXPECTED_FRAME
    with pytest.raises(LocalProtocolError, match="already failed"):
        pair.client.next_event()
    # Telling the peer is still possible, once.
    got = feed(pair.server, pair.client.send(ev.ErrorMessage(None, codes.INTERNAL, "bug")))
    assert got == [ev.ErrorMessage(None, codes.INTERNAL, "bug")]
    assert pair.server.state is State.CLOSING


def test_fields_that_are_wrong_on_the_wire() -> None:
    pair = opened()
    bad = frame(b"\x83\xa4data\xa3abc\xa3rid\x01\xa1t\xacsubmit-chunk")  # data as str, not bin
    with pytest.raises(RemoteProtocolError, match="'data' must be bytes") as info:
        feed(pair.server, bad)
    assert info.value.code == codes.BAD_FIELD


def test_new_rid_skips_ids_in_flight() -> None:
    pair = opened()
    pair.send(C, ev.GetCheckpoint(0), ev.GetCheckpoint(1))
    assert pair.client.new_rid() == 2
    pair.send(S, ev.Checkpoint(0, b"c"))
    assert pair.client.new_rid() == 3


def test_drain_stops_at_need_data() -> None:
    pair = opened()
    assert drain(pair.server) == []


def test_the_server_may_give_up_before_hello_with_one_fatal_error_only() -> None:
    """wire.md, Timeouts: a server that waited in vain for hello says `timeout` and closes; nothing else may come."""
    pair = ConnectionPair()
    timeout = ev.ErrorMessage(None, codes.TIMEOUT, "no hello within 10 s")
    assert pair.send(Role.SERVER, timeout) == [timeout]
    assert pair.server.state is State.CLOSING
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError, match="before the client's hello"):
        pair.server.send(ev.Pong(1))
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError, match="before the client's hello"):
        pair.server.send(ev.ErrorMessage(3, codes.TIMEOUT, "an answer to no request"))
