"""No member can crowd the others out of the broker's one thread (broker/fairshare.py). A hostile-member review
flooded the broker with requests that cost it much and the member little (heads with 250 recipients to be denied,
`get-entries` of the whole log on five connections at once) and cut an honest exchange to a quarter of its
speed. Under contention, a member over its share now waits before its next frame is read."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio

from valise.broker import fairshare
from valise.broker.fairshare import BUSY, FLOOR, MAX_PAUSE, CpuShares
from valise.wire import events as ev

from .harness import WireClient, make_world, running_broker

LN2 = 0.6931471805599453


def test_a_member_s_rate_is_its_decayed_use() -> None:
    shares = CpuShares()
    shares.charge("EVL", 1.0, 10.0)
    assert shares.rate("EVL", 10.0) == pytest.approx(LN2)  # one second of use within a half-life of 1 s
    assert shares.rate("EVL", 11.0) == pytest.approx(LN2 / 2)
    shares.charge("EVL", 1.0, 11.0)
    assert shares.rate("EVL", 11.0) == pytest.approx(LN2 * 1.5)
    assert shares.rate("FRA", 11.0) == 0.0


def test_nobody_waits_while_the_thread_has_room() -> None:
    shares = CpuShares()
    shares.charge("EVL", 10.0, 0.0)
    assert shares.pause("EVL", 0.0, busy=BUSY - 0.01, members=lambda: 3) == 0.0


def test_under_contention_the_member_over_its_share_waits_and_the_others_do_not() -> None:
    shares = CpuShares()
    shares.charge("EVL", 1.2, 0.0)  # rate 0.83: its requests keep the thread to themselves
    shares.charge("FRA", 0.05, 0.0)  # honest members: their requests cost little
    shares.charge("DEU", 0.05, 0.0)
    share = 1.5 * 1.0 / 3  # half again an even split among the three connected
    decayed = math.log(1.2 * LN2 / share) / LN2  # when EVL's rate will have fallen to its share
    assert shares.pause("EVL", 0.0, busy=1.0, members=lambda: 3) == pytest.approx(min(MAX_PAUSE, decayed))
    assert shares.pause("EVL", decayed - 0.2, busy=1.0, members=lambda: 3) == pytest.approx(0.2)
    assert shares.pause("FRA", 0.0, busy=1.0, members=lambda: 3) == 0.0
    assert shares.pause("DEU", 0.0, busy=1.0, members=lambda: 3) == 0.0
    assert shares.pause("EVL", decayed + 0.01, busy=1.0, members=lambda: 3) == 0.0  # decayed to its share


def test_the_split_is_among_the_connected_members_not_those_charged_much() -> None:
    """The f2 flood of the hostile-member review: the honest exchange's requests cost the broker almost nothing
    that is charged (their work is pushes, commits and TLS), so counting only members charged for much left the
    flooding member alone in the split, its share the whole thread, and it was never held back."""
    shares = CpuShares()
    shares.charge("EVL", 1.2, 0.0)
    assert shares.pause("EVL", 0.0, busy=0.9, members=lambda: 1) == 0.0  # alone: the thread is its to use
    assert shares.pause("EVL", 0.0, busy=0.9, members=lambda: 3) > 0  # FRA and DEU are connected, exchanging


def test_a_lone_heavy_member_and_two_equal_ones_are_not_held_back() -> None:
    """A member using the thread beside quiet ones, or two using it evenly, take it as they need."""
    shares = CpuShares()
    shares.charge("FRA", 1.3, 0.0)  # rate 0.9: nine tenths of the thread
    assert shares.pause("FRA", 0.0, busy=1.0, members=lambda: 1) == 0.0
    shares = CpuShares()
    shares.charge("FRA", 0.65, 0.0)  # rate 0.45 each
    shares.charge("DEU", 0.65, 0.0)
    assert shares.pause("FRA", 0.0, busy=1.0, members=lambda: 2) == 0.0
    assert shares.pause("DEU", 0.0, busy=1.0, members=lambda: 2) == 0.0


def test_a_member_never_waits_below_the_floor_and_members_gone_quiet_are_forgotten() -> None:
    shares = CpuShares()
    shares.charge("EVL", FLOOR / LN2 * 0.99, 0.0)
    assert shares.pause("EVL", 0.0, busy=1.0, members=lambda: 196) == 0.0  # a thin split, but the floor holds
    shares.charge("EVL", 1.0, 0.0)
    assert shares.pause("EVL", 0.0, busy=1.0, members=lambda: 196) > 0
    shares.charge("FRA", 0.02, 0.0)
    shares.forget(60.0)  # a minute on, nobody's use is kept: not an entry for every member ever seen
    assert shares.members() == []


async def test_a_broker_under_contention_holds_back_the_member_over_its_share_and_answers_everyone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contention is set up (this machine's load is not the test's): the thread is busy and EVL has used it
    heavily. EVL's next request waits; FRA's does not; both are answered."""
    monkeypatch.setattr(fairshare, "METER_INTERVAL", 3600.0)  # the reading of the load stays as set here
    world = make_world(tmp_path)
    async with (
        running_broker(world) as broker,
        WireClient.connect(world, "ITA", broker.port) as evl,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        evl.refuse_cosign = fra.refuse_cosign = True
        await evl.sync()
        await fra.sync()
        broker.thread_busy = 1.0
        broker.shares.charge("ITA", 5.0, trio.current_time())
        broker.shares.charge("FRA", 0.05, trio.current_time())
        for client in (evl, fra):
            await client.send(ev.GetCheckpoint(client.conn.new_rid()))
        with trio.fail_after(10):
            assert isinstance(await fra.next_of(ev.Checkpoint), ev.Checkpoint)
            assert isinstance(await evl.next_of(ev.Checkpoint), ev.Checkpoint)
        assert broker.sessions["ITA"].held_back >= 1
        assert broker.sessions["FRA"].held_back == 0
