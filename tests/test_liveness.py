"""The wire's timeouts in the daemons (specs/wire.md, "Timeouts"), with real sockets and, for the node, a real
broker process that is stopped (SIGSTOP) as a vanished host would be. The timeouts are shortened here; the rule
itself is tested with the time passed in (test_wire_liveness.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from valise.packet import Head, parse_head
from valise.wire import codes, liveness
from valise.wire import events as ev

from .harness import (
    WireClient,
    World,
    broker_process,
    close_gracefully,
    expect_fatal,
    make_world,
    running_broker,
    running_node,
    seal,
)


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liveness, "IDLE", 0.4)
    monkeypatch.setattr(liveness, "ANSWER", 0.4)
    monkeypatch.setattr(liveness, "STALL", 0.8)
    monkeypatch.setattr(liveness, "CHECK_EVERY", 0.05)


def _world(tmp_path: Path) -> World:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    return world


def _head(data: bytes) -> Head:
    head = parse_head(data)
    assert isinstance(head, Head)
    return head


async def _wait_for(condition: object) -> None:
    with trio.fail_after(10):  # a safety net against a hang, not a timed assertion
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - polling the daemon's state
            await trio.sleep(0.02)


async def test_a_member_that_goes_silent_is_pinged_then_closed_and_its_uploads_go(tmp_path: Path, quick: None) -> None:
    world = _world(tmp_path)
    spool = world.home.root / "spool"
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        for i in range(4):  # large uploads begun, never finished: each holds a file in the spool
            data = seal(world, "FRA", ["DEU"], b"%d" % i * 100_000)
            head = _head(data)
            await fra.send(ev.SubmitBegin(fra.conn.new_rid(), data[: head.head_size], len(data) - head.head_size))
        await fra.sync()
        assert len(list(spool.glob("*.part"))) == 4
        # Then silence: the broker pings, gets nothing back, and gives the member up.
        fatal = await expect_fatal(fra, codes.TIMEOUT)
        assert "not even the answer to a ping" in fatal.message
        await _wait_for(lambda: "FRA" not in broker.sessions)
        assert not list(spool.glob("*.part"))


async def test_a_live_member_is_pinged_and_kept(tmp_path: Path, quick: None) -> None:
    world = _world(tmp_path)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        for _ in range(3):  # three quiet spells, each answered
            ping = await fra.next_of(ev.Ping)
            assert isinstance(ping, ev.Ping)
            await fra.send(ev.Pong(ping.n))
        assert broker.sessions.get("FRA") is not None
        await close_gracefully(fra)


async def test_an_upload_that_stops_getting_data_is_abandoned(tmp_path: Path, quick: None) -> None:
    """The member stays alive (it answers pings) but one upload gets no more data: that one is given up."""
    world = _world(tmp_path)
    spool = world.home.root / "spool"
    data = seal(world, "FRA", ["DEU"], b"stalled" * 20_000)
    head = _head(data)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        rid = fra.conn.new_rid()
        await fra.send(ev.SubmitBegin(rid, data[: head.head_size], len(data) - head.head_size))
        await fra.send(ev.SubmitChunk(rid, data[head.head_size : head.head_size + 4096]))
        while True:
            event = await fra.next()
            if isinstance(event, ev.Ping):
                await fra.send(ev.Pong(event.n))
                continue
            break
        assert isinstance(event, ev.ErrorMessage)
        assert (event.rid, event.code) == (rid, codes.TIMEOUT)
        assert "no data for this upload" in event.message
        assert not list(spool.glob("*.part"))
        await fra.send(ev.SubmitCancel(rid))
        # The connection is fine: the same packet, sent whole now, gets its receipt.
        answer = await fra.submit(data)
        assert isinstance(answer, ev.Receipt)
        assert broker.sessions.get("FRA") is not None
        await close_gracefully(fra)


async def test_a_member_that_grants_no_credit_is_closed_and_its_packet_kept(tmp_path: Path, quick: None) -> None:
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"x" * 3_000_000)  # more than DEU's window: the delivery needs credit
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        assert isinstance(await fra.submit(data), ev.Receipt)
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            begin = await deu.next_of(ev.DeliverBegin)
            assert isinstance(begin, ev.DeliverBegin)
            while True:  # take the chunks, grant nothing, answer pings (alive, just not reading on)
                event = await deu.next()
                if isinstance(event, ev.Ping):
                    await deu.send(ev.Pong(event.n))
                elif not isinstance(event, ev.DeliverChunk):
                    break
            assert isinstance(event, ev.ErrorMessage)
            assert (event.rid, event.code) == (None, codes.TIMEOUT)
            assert "no credit" in event.message
        async with WireClient.connect(world, "DEU", broker.port) as deu:  # the packet was kept for the next time
            deu.refuse_cosign = True
            _, got = await deu.receive_delivery()
            assert got == data
            await close_gracefully(deu)
        await close_gracefully(fra)


async def test_a_node_gives_up_a_stopped_broker_and_comes_back(tmp_path: Path, quick: None) -> None:
    """The broker's process is stopped (no close, no reset: a vanished host). The node's requests would wait for
    good; instead it pings, gives the connection up, and reconnects once the broker runs again."""
    world = _world(tmp_path)
    async with (
        broker_process(world.home.root, tmp_path / "broker.log") as proc,
        running_node(world, proc.port, tmp_path / "node", poll_interval=3600) as daemon,
    ):
        first = daemon.session
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            await _wait_for(lambda: daemon.session is not first)
            # Given up by the silence (no pong) or by an unanswered request, whichever came first.
            assert daemon.last_error is not None
            assert "not answering" in daemon.last_error or "unanswered" in daemon.last_error
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        await _wait_for(lambda: daemon.session is not None and daemon.session is not first)
