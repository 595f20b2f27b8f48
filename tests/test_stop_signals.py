"""How the daemons stop on SIGINT/SIGTERM (valise/stopsignals.py): a concurrency review sent a second SIGTERM
while the broker stopped, and it was killed before its last commit batch and the closing of its stores."""

from __future__ import annotations

import signal
from pathlib import Path

import trio
import trio.testing

from valise import stopsignals
from valise.wire import events as ev
from valise.wire.limits import DEFAULT_LIMITS

from .harness import WireClient, make_world, seal


async def test_a_second_signal_cuts_the_graceful_stop_short_and_later_ones_are_dropped() -> None:
    send, receive = trio.open_memory_channel[int](8)
    finished: list[str] = []

    async def graceful_stop() -> None:
        await trio.sleep_forever()  # sessions that never go: only the grace period, or a second signal, ends it
        finished.append("stop")

    async with trio.open_nursery() as nursery:
        daemon = trio.CancelScope()
        nursery.start_soon(stopsignals.stop_when_signalled, receive, graceful_stop, daemon, "test")
        await trio.testing.wait_all_tasks_blocked()
        assert not daemon.cancel_called  # no signal yet
        await send.send(signal.SIGTERM)
        await trio.testing.wait_all_tasks_blocked()
        assert not daemon.cancel_called  # stopping gracefully
        await send.send(signal.SIGTERM)
    assert daemon.cancel_called
    assert finished == []  # cut short, not waited for
    await send.send(signal.SIGINT)
    await send.send(signal.SIGTERM)
    await stopsignals.drop_pending(receive, "test")
    assert receive.statistics().current_buffer_used == 0


async def test_a_broker_signalled_twice_while_a_member_reads_nothing_still_stops_cleanly(tmp_path: Path) -> None:
    """FRA takes nothing while the broker pushes it more than the sockets hold: the broker's write to it waits,
    so its session outlives the goodbye and the grace period runs. A second SIGTERM then cut short the stop by
    killing the broker (exit -15, no last commit, stores left open); now it ends the grace period, and the
    broker stops as after one."""
    import dataclasses

    from .harness import BrokerProcess

    world = make_world(tmp_path)
    world.consent("DEU", "FRA")
    log = tmp_path / "broker.log"
    proc = BrokerProcess(world.home.root, log)
    try:
        await proc.started()
        async with WireClient.connect(world, "DEU", proc.port) as deu:
            deu.refuse_cosign = True
            for i in range(24):
                answer = await deu.submit(seal(world, "DEU", ["FRA"], bytes([i]) * (1 << 20)))
                assert isinstance(answer, ev.Receipt), answer
        wide = dataclasses.replace(DEFAULT_LIMITS, window=2**31 - 1)
        async with WireClient.connect(world, "FRA", proc.port, limits=wide):
            await trio.sleep(1.0)  # the broker pushes until its write waits on FRA, which reads nothing
            proc.proc.send_signal(signal.SIGTERM)
            await trio.sleep(0.5)
            proc.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                code = await trio.to_thread.run_sync(proc.proc.wait)
        text = log.read_text()
        assert code == 0, text[-2000:]
        assert "signal 15 again: stopping now" in text
    finally:
        proc.kill()
