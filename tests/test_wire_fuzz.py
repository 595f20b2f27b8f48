"""Fuzzing the wire: whatever a peer sends, the only exception is a WireError and the buffer stays bounded."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valise.errors import RemoteProtocolError, WireError
from valise.wire import Connection, Role, Signal, State, frame
from valise.wire import events as ev
from valise.wire.codec import encode
from valise.wire.limits import HANDSHAKE_FRAME, LENGTH_SIZE, KiB, Limits, MiB
from valise.wire.pair import ConnectionPair

from .test_wire_codec import SAMPLES

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = Limits(frame=64 * KiB + 4 * KiB, chunk=4 * KiB, packet=1 * MiB, requests=2, window=8 * KiB, pushes=2)


def pump(conn: Connection, pieces: list[bytes]) -> None:
    """Feed `pieces` as a daemon would (drain between reads); check the invariants after every step."""
    first = True
    try:
        for piece in pieces:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if isinstance(event, Signal):
                    break
                if isinstance(event, ev.ConnectionClosed):
                    return
            # Between reads, at most one partial frame is held (or, while PAUSED, what arrived behind the hello).
            limit = LENGTH_SIZE + (HANDSHAKE_FRAME if first else conn.limits.frame)
            assert conn.buffered <= max(limit, 2 * (LENGTH_SIZE + conn.limits.frame))
            if event is Signal.NEED_DATA:
                assert conn.buffered < LENGTH_SIZE + conn.limits.frame
        conn.receive_data(b"")
        conn.next_event()
    except WireError:
        assert conn.state is State.ERROR
        assert conn.buffered == 0


pieces = st.lists(st.binary(max_size=2048), max_size=20)


@FUZZ
@given(pieces)
def test_random_bytes_to_a_fresh_server(data: list[bytes]) -> None:
    pump(Connection(Role.SERVER), data)


@FUZZ
@given(pieces)
def test_random_bytes_to_a_fresh_client_after_hello(data: list[bytes]) -> None:
    pair = ConnectionPair()
    pair.client.send(pair.hello())
    pump(pair.client, data)


@FUZZ
@given(st.sampled_from([Role.CLIENT, Role.SERVER]), pieces)
def test_random_bytes_after_the_handshake(receiver: Role, data: list[bytes]) -> None:
    pair = ConnectionPair(SMALL, SMALL)
    pair.handshake()
    pump(pair.conn(receiver), data)


@FUZZ
@given(
    st.sampled_from([Role.CLIENT, Role.SERVER]),
    st.lists(st.sampled_from(SAMPLES), max_size=30),
    st.integers(min_value=1, max_value=300),
)
def test_valid_messages_in_random_order(receiver: Role, msgs: list[ev.Message], step: int) -> None:
    """Well-formed frames in any order: each is accepted or refused with a protocol error, nothing else."""
    pair = ConnectionPair(SMALL, SMALL)
    pair.handshake(role="node")
    stream = b"".join(frame(encode(m)) for m in msgs if not isinstance(m, ev.Hello | ev.Welcome))
    pump(pair.conn(receiver), [stream[i : i + step] for i in range(0, len(stream), step)])


@FUZZ
@given(
    st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=8),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=4),
)
def test_mutated_frames(msgs: list[ev.Message], flips: list[tuple[int, int]]) -> None:
    pair = ConnectionPair(SMALL, SMALL)
    hello = frame(encode(pair.hello()))
    stream = bytearray(hello + b"".join(frame(encode(m)) for m in msgs))
    for where, value in flips:
        stream[where % len(stream)] = value
    pump(pair.server, [bytes(stream)])


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=SMALL.frame + 1, max_value=2**32 - 1), st.binary(max_size=64))
def test_any_oversized_prefix_is_refused_before_its_body(size: int, tail: bytes) -> None:
    pair = ConnectionPair(SMALL, SMALL)
    pair.handshake()
    with pytest.raises(RemoteProtocolError, match="over the limit") as info:
        pair.server.receive_data(size.to_bytes(4, "big") + tail)
    assert info.value.code == "frame-too-large"
    assert pair.server.buffered == 0


def test_limits_used_by_the_fuzzers_are_valid() -> None:
    assert Connection(Role.SERVER, SMALL).limits == SMALL
