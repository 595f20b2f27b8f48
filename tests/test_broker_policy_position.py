"""Policy as of a packet's log position (protocol.md, neutrality contract 3): a record that lands ahead of a
packet after the packet was decided on, whether another writer's (an operator command) or a member's in the same
commit batch, is in force for it. Real broker, real TLS, real SQLite; the broker's commit is slowed down
(`flush_interval`) so that the record reliably lands in between."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from valise import identity, packet, records
from valise.broker import relay
from valise.broker.daemon import BrokerDaemon
from valise.policy import records as prec
from valise.store.sqlite import SqliteLog
from valise.wire import codes
from valise.wire import events as ev

from .conftest import seeded_random
from .harness import ORIGIN, WireClient, World, make_world, running_broker, seal

SLOW_COMMIT = {"flush_interval": 0.3, "policy_poll": 60.0}  # the broker folds others' records only when it commits


async def _answer(client: WireClient, rid: int) -> ev.Event:
    while True:
        event = await client.next()
        if getattr(event, "rid", None) == rid:
            return event


def _kinds_from(world: World, start: int) -> list[str]:
    with SqliteLog.open(world.home.db_path) as store:
        return [records.entry_type(e)[0] for e in store.entries(start, store.size())]


async def _queued(broker: BrokerDaemon, n: int) -> None:
    """Wait until `n` entries wait for the broker's next commit."""
    with trio.fail_after(10):
        while len(broker._waiters) < n:  # noqa: ASYNC110 - polling the daemon's own state
            await trio.sleep(0.005)


def _log_size(world: World) -> int:
    with SqliteLog.open(world.home.db_path) as store:
        return store.size()


async def test_an_operator_ban_appended_before_the_commit_denies_a_packet_already_decided(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    data = seal(world, "FRA", ["DEU"], b"decided before the ban, logged after it")
    async with running_broker(world, **SLOW_COMMIT) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        await fra.sync()
        rid = await fra.submit_frames(data)
        await fra.sync()  # the broker has decided (allowed) and queued the packet; its batch has not committed
        ban_at = _log_size(world)
        world.rule("ban-category", category="malware")  # another writer, straight into the store
        answer = await _answer(fra, rid)
        assert isinstance(answer, ev.Deny), answer
        assert [(r.to, "malware" in r.reason) for r in answer.reasons] == [("DEU", True)]
        await fra.sync()
    assert "pkt" not in _kinds_from(world, ban_at)


async def test_a_revoke_in_the_same_batch_denies_the_packet_queued_behind_it(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    now = int(time.time())
    grant = prec.grant(world.members["FRA"].signing, origin=ORIGIN, author="FRA", created=now, to="DEU", tlp="AMBER")
    accept = prec.accept(
        world.members["DEU"].signing, origin=ORIGIN, author="DEU", created=now, source="FRA", tlp="AMBER"
    )
    world.append(grant)
    world.append(accept)
    revoke = prec.revoke(
        world.members["DEU"].signing, origin=ORIGIN, author="DEU", created=now, statement=prec.parse(accept).id
    )
    async with (
        running_broker(world, **SLOW_COMMIT) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
        WireClient.connect(world, "DEU", broker.port) as deu,
    ):
        fra.refuse_cosign = deu.refuse_cosign = True
        statement_rid = deu.conn.new_rid()
        await deu.send(ev.Statement(statement_rid, revoke))
        await _queued(broker, 1)  # the revoke waits for the batch; the packet, decided before it applies, joins it
        packet_rid = await fra.submit_frames(seal(world, "FRA", ["DEU"], b"behind the revoke"))
        answer = await _answer(fra, packet_rid)
        assert isinstance(answer, ev.Deny), answer
        logged = await _answer(deu, statement_rid)
        assert isinstance(logged, ev.StatementResult), logged
        await fra.sync()
    assert "pkt" not in _kinds_from(world, logged.index)


async def test_a_statement_is_refused_if_its_author_is_suspended_before_it_lands(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    grant = prec.grant(
        world.members["DEU"].signing, origin=ORIGIN, author="DEU", created=int(time.time()), to="FRA", tlp="AMBER"
    )
    async with running_broker(world, **SLOW_COMMIT) as broker, WireClient.connect(world, "DEU", broker.port) as deu:
        deu.refuse_cosign = True
        await deu.sync()
        rid = deu.conn.new_rid()
        await deu.send(ev.Statement(rid, grant))
        await _queued(broker, 1)  # checked under the policy lock, and waiting for the batch
        suspended_at = _log_size(world)
        # A writer that did not take the policy lock: only the broker's commit-time check stands in its way.
        world.operator("member-suspend", id="DEU", reason="compromised")
        answer = await _answer(deu, rid)
        assert isinstance(answer, ev.ErrorMessage), answer
        assert answer.code == codes.REFUSED
        assert "DEU" in answer.message
    assert _kinds_from(world, suspended_at) == ["dir"]


def _consenting_world_and_packet(tmp_path: Path, payload: bytes) -> tuple[World, bytes, packet.Head]:
    """FRA may send to DEU; a packet from FRA to DEU, and its head."""
    world = make_world(tmp_path)
    world.consent("FRA", "DEU")
    data = seal(world, "FRA", ["DEU"], payload)
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return world, data, head


def _rekey(world: World, member: str) -> bytes:
    """A member-rekey record moving `member` to a new identity, handed over with its old key (as policy.md
    defines it; no command issues one yet)."""
    new = identity.generate(member, seeded_random(b"new keys of " + member.encode()), int(time.time()))
    sig = world.members[member].signing.sign(prec.REKEY_DOMAIN, prec.rekey_message(member, ORIGIN, new.bundle.raw))
    world.seq += 1
    return prec.dir_record(world.home.operator_key(), ORIGIN, world.seq, int(time.time()), "member-rekey",
                           id=member, bundle=new.bundle.raw, rekey_sig=sig)  # fmt: skip


async def test_an_acknowledgement_and_a_retraction_are_checked_again_behind_a_rekey(tmp_path: Path) -> None:
    """A review: a member's acknowledgement or retraction, checked under its key, was logged behind a rekey of
    that member that landed before the commit, where it no longer verifies (ack-signature in an honest log)."""
    world, data, head = _consenting_world_and_packet(tmp_path, b"acknowledged under the old key")
    pid = head.core.packet_id
    async with (
        running_broker(world, **SLOW_COMMIT) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
        WireClient.connect(world, "DEU", broker.port) as deu,
    ):
        fra.refuse_cosign = deu.refuse_cosign = True
        assert isinstance(await fra.submit(data), ev.Receipt)
        seq, _ = await deu.receive_delivery()
        ack = records.Ack.make(world.members["DEU"].signing, pid, head.digest, "FRA", "DEU", int(time.time()))
        await deu.send(ev.Ack(seq, pid, ack.raw))
        retraction = records.Retraction.make(world.members["FRA"].signing, pid, head.digest, "FRA", "", 1)
        rid = fra.conn.new_rid()
        await fra.send(ev.Retract(rid, pid, retraction.raw))
        await _queued(broker, 2)
        rekeyed_at = _log_size(world)
        world.append(_rekey(world, "DEU"))
        world.append(_rekey(world, "FRA"))
        closed = await deu.next_of(ev.ErrorMessage)
        assert isinstance(closed, ev.ErrorMessage)
        assert closed.code == codes.BAD_SIGNATURE
        refused = await _answer(fra, rid)
        assert isinstance(refused, ev.ErrorMessage), refused
        assert refused.code == codes.BAD_SIGNATURE
    assert _kinds_from(world, rekeyed_at) == ["dir", "dir"]


async def test_two_retractions_of_one_packet_in_flight_at_once_are_logged_once(tmp_path: Path) -> None:
    """A review: the "already retracted?" lookup ran before the append with nothing held in between, so a
    retraction sent on a replaced connection and one on its replacement could both be logged."""
    world, data, head = _consenting_world_and_packet(tmp_path, b"retracted twice at once")
    pid = head.core.packet_id
    retraction = records.Retraction.make(world.members["FRA"].signing, pid, head.digest, "FRA", "twice", 1)
    async with (
        running_broker(world, **SLOW_COMMIT) as broker,
        WireClient.connect(world, "FRA", broker.port) as first,
    ):
        first.refuse_cosign = True
        assert isinstance(await first.submit(data), ev.Receipt)
        size = _log_size(world)
        await first.send(ev.Retract(first.conn.new_rid(), pid, retraction.raw))
        await _queued(broker, 1)
        old_session = broker.sessions["FRA"]
        async with WireClient.connect(world, "FRA", broker.port) as second:  # replaces the first
            second.refuse_cosign = True
            replaced = await first.next_of(ev.ErrorMessage)
            assert isinstance(replaced, ev.ErrorMessage)
            assert replaced.code == codes.REPLACED
            with trio.fail_after(10):  # its tasks, the one waiting for the retraction's commit among them, are gone
                while old_session.ready:  # noqa: ASYNC110 - the daemon's own state
                    await trio.sleep(0.01)
            rid = second.conn.new_rid()
            await second.send(ev.Retract(rid, pid, retraction.raw))
            answer = await _answer(second, rid)
            assert isinstance(answer, ev.RetractResult), answer
            assert answer.index == size
    assert _kinds_from(world, size) == ["retract"]


async def test_a_packet_is_logged_at_the_time_it_was_decided_at(tmp_path: Path, monkeypatch: Any) -> None:
    """A review (time semantics): the broker decided with one reading of its clock and dated the entry with
    another. When the second ticked between them, on the second a grant ends, an honest broker logged a relay that
    the auditor, replaying the decision at the entry's `at`, denies. The clock here ticks over the grant's end
    just after the submit-end decision (the real decision, watched); the entry must carry the decision's time."""
    world = make_world(tmp_path)
    ends = int(time.time()) + 100
    now = int(time.time())
    fra, deu = world.members["FRA"], world.members["DEU"]
    world.append(prec.grant(fra.signing, origin=ORIGIN, author="FRA", created=now, to="DEU", tlp="AMBER",
                            valid_until=ends))  # fmt: skip
    world.append(prec.accept(deu.signing, origin=ORIGIN, author="DEU", created=now, source="FRA", tlp="AMBER"))
    clock = [float(ends - 1)]
    decide = relay.admit

    def watched(*args: Any, **kwargs: Any) -> Any:
        outcome = decide(*args, **kwargs)
        if "signature_checked_with" in kwargs:  # the decision at submit-end: the second ticks over right after
            clock[0] = float(ends)
        return outcome

    monkeypatch.setattr(relay, "admit", watched)
    data = seal(world, "FRA", ["DEU"], b"decided in the grant's last second")
    start = _log_size(world)
    async with (
        running_broker(world, clock=lambda: clock[0]) as broker,
        WireClient.connect(world, "FRA", broker.port) as c,
    ):
        c.refuse_cosign = True
        answer = await c.submit(data)
        assert isinstance(answer, ev.Receipt), answer
        assert clock[0] == ends  # the decision was watched
    with SqliteLog.open(world.home.db_path) as store:
        kinds = [records.entry_type(e) for e in store.entries(start, store.size())]
    (at,) = [fields["at"] for kind, fields in kinds if kind == "pkt"]
    assert at == ends - 1  # within the grant, as decided; the auditor's replay allows it
    receipt = records.Receipt.verified(answer.receipt, world.home.broker_identity().bundle.sign_key)
    assert receipt.at == at
