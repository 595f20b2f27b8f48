"""What one member can make the broker do at will is rate-limited (broker/ratelimit.py), after a hostile-member
review: its statements over the wire (granting and revoking in a loop grew the broker's and every node's memory by
~1 GB an hour; the live-statement limit does not bound that, as each revoke frees its slot), and the log lines its
frames cause."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from valise.broker.ratelimit import BURST, RATE, LogBudget, MemberBuckets, quoted
from valise.policy import records as prec
from valise.store.sqlite import SqliteLog
from valise.wire import codes
from valise.wire import events as ev

from .harness import ORIGIN, WireClient, make_world, running_broker, seal


def test_a_bucket_gives_its_burst_then_fills_at_its_rate() -> None:
    budget = MemberBuckets(burst=3, rate=0.5)  # one token every 2 s
    assert [budget.take("FRA", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.take("FRA", 100.0) == pytest.approx(2.0)  # empty: the next token in 2 s
    assert budget.take("DEU", 100.0) == 0.0  # each member its own bucket
    assert budget.take("FRA", 101.0) == pytest.approx(1.0)
    assert budget.take("FRA", 102.0) == 0.0
    assert budget.take("FRA", 1000.0) == 0.0  # full again, never past the burst
    assert [budget.take("FRA", 1000.0) for _ in range(2)] == [0.0, 0.0]
    assert budget.take("FRA", 1000.0) > 0


def test_the_burst_covers_joining_a_network_of_196() -> None:
    """A grant and an acceptance for each of 195 partners at once must go through."""
    budget = MemberBuckets(BURST, RATE)
    assert all(budget.take("NEW", 0.0) == 0.0 for _ in range(2 * 195))


async def test_statements_past_a_member_s_budget_are_refused_before_any_check_and_not_logged(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    now = int(time.time())
    fra = world.members["FRA"]
    statements = [
        prec.grant(fra.signing, origin=ORIGIN, author="FRA", created=now + i, to="DEU", tlp="AMBER") for i in range(3)
    ]
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as client:
        client.refuse_cosign = True
        broker.statement_budget = MemberBuckets(burst=2, rate=1 / 3600)
        with SqliteLog.open(world.home.db_path) as store:
            before = store.size()
        answers = []
        for statement in statements:
            rid = client.conn.new_rid()
            await client.send(ev.Statement(rid, statement))
            answers.append(await client.next_of(ev.StatementResult | ev.ErrorMessage))  # type: ignore[arg-type]
        assert [type(a) for a in answers] == [ev.StatementResult, ev.StatementResult, ev.ErrorMessage]
        refused = answers[2]
        assert isinstance(refused, ev.ErrorMessage)
        assert refused.code == codes.REFUSED
        assert "FRA has sent more statements than the broker takes" in refused.message
        assert "send this one again in 3600 s" in refused.message
        await client.sync()
        with SqliteLog.open(world.home.db_path) as store:
            assert store.size() == before + 2


def test_a_member_s_log_lines_have_a_budget_and_its_text_is_cut() -> None:
    budget = LogBudget(burst=2, rate=0.5)
    assert [budget.allow("EVL", 0.0) for _ in range(4)] == [0, 0, None, None]
    assert budget.allow("FRA", 0.0) == 0  # another member's lines are its own
    assert budget.allow("EVL", 2.0) == 2  # written again, saying how many were held back
    assert budget.allow("EVL", 2.0) is None
    assert budget.flush("EVL") == 1  # said when its connection ends, whatever the bucket holds
    assert budget.flush("EVL") == 0
    assert quoted("x" * 1000) == repr("x" * 200 + "… (1000 characters)")
    assert quoted("a\nb") == "'a\\nb'"


async def test_refusals_with_long_texts_do_not_flood_the_broker_s_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The review answered every pushed item with a 1 KiB `refuse`, reconnecting to have them pushed again: the
    broker's log grew by 11 MB a second."""
    world = make_world(tmp_path)
    world.consent("DEU", "FRA")
    async with running_broker(world) as broker:
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            for i in range(30):
                assert isinstance(await deu.submit(seal(world, "DEU", ["FRA"], b"%d" % i)), ev.Receipt)
        caplog.clear()
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            fra.refuse_cosign = True
            for _ in range(30):
                seq, _ = await fra.receive_delivery()
                await fra.send(ev.Refuse(seq, codes.BAD_PACKET, "x" * 1000))
            await fra.sync()
        assert broker.refusals == 30
    lines = [r.getMessage() for r in caplog.records if r.name == "valise.broker"]
    refusals = [line for line in lines if "FRA refused packet" in line]
    assert len(refusals) == LogBudget().burst
    assert all(len(line) < 400 and "… (1000 characters)" in line for line in refusals)
    # What was held back is said when the connection ends (a review: a member that went quiet left no trace).
    assert f"FRA: {30 - LogBudget().burst} more warnings its frames caused were not written" in lines
    # (Its refusals to cosign, when the broker asks it as a witness, have a budget of their own: a witness's
    # conflict, the operator's sign of a fork, is not lost behind refusals of pushed items; a review's finding.)
