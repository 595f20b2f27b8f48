"""Races between a member's frames and the broker's group commit, and a log store that refuses a write: the real
broker, real TLS and real SQLite (a second connection holding the log's write lock is the store failure)."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from valise import packet, records
from valise.store import sqlite as sqlite_store
from valise.store.sqlite import SqliteLog
from valise.wire import codes
from valise.wire import events as ev
from valise.wire.connection import Connection, Role
from valise.wire.limits import DEFAULT_LIMITS, SUPPORTED_VERSIONS

from .harness import WireClient, World, make_world, running_broker, seal


def _world(tmp_path: Path) -> World:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    return world


@contextmanager
def log_write_locked(world: World) -> Iterator[None]:
    """Hold the log's write lock from another connection, as an operator command in the middle of a write would:
    the broker's appends fail once their busy timeout runs out."""
    holder = sqlite3.connect(world.home.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def _head(data: bytes) -> packet.Head:
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return head


def _kinds(world: World) -> list[str]:
    with SqliteLog.open(world.home.db_path) as store:
        return [records.entry_type(e)[0] for e in store.entries(0, store.size())]


async def _ack(client: WireClient, world: World, seq: int, head: packet.Head) -> None:
    member = world.members[client.member]
    ack = records.Ack.make(member.signing, head.core.packet_id, head.digest, "FRA", client.member, int(time.time()))
    await client.send(ev.Ack(seq, head.core.packet_id, ack.raw))
    await client.send(ev.Ping(7))
    await client.next_of(ev.Pong)  # frames are handled in order: the broker has taken the ack


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 200)


async def test_a_failed_log_write_is_answered_and_leaves_nothing_for_the_next_batch(
    tmp_path: Path, short_busy_timeout: None
) -> None:
    world = _world(tmp_path)
    first, second = seal(world, "FRA", ["DEU"], b"one"), seal(world, "FRA", ["DEU"], b"two")
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        before = len(_kinds(world))
        with log_write_locked(world):
            refused = await fra.submit(first)
        assert isinstance(refused, ev.ErrorMessage), refused
        assert refused.code == codes.INTERNAL
        # The broker goes on, and the failed batch's entry does not ride along with the next one.
        ok = await fra.submit(second)
        assert isinstance(ok, ev.Receipt), ok
        with SqliteLog.open(world.home.db_path) as store:
            added = store.entries(before, store.size())
        assert [records.entry_type(e)[0] for e in added] == ["pkt"]
        assert records.entry_type(added[0])[1]["header"] == _head(second).header.raw


async def test_a_failed_batch_holding_the_ack_of_a_member_that_left_does_not_stop_the_broker(
    tmp_path: Path, short_busy_timeout: None
) -> None:
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"indicator")
    head = _head(data)
    async with (
        running_broker(world, flush_interval=0.3) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        assert isinstance(await fra.submit(data), ev.Receipt)
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            seq, _ = await deu.receive_delivery()
            await _ack(deu, world, seq, head)
        with log_write_locked(world):  # the ack's batch commits 0.3 s after it came, with DEU gone: it fails
            # Held until the broker has given up on that batch: the acknowledgement is no longer pending and the
            # packet is still in DEU's mailbox (a batch that succeeded would have taken it out).
            with trio.fail_after(10):
                while broker.acks_pending or not broker.mail.pending("DEU"):  # noqa: ASYNC110 - polls the broker
                    await trio.sleep(0.05)
        # Still serving: DEU comes back, is pushed the packet again, and its acknowledgement reaches FRA.
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            seq, got = await deu.receive_delivery()
            assert got == data
            await _ack(deu, world, seq, head)
            forwarded = await fra.next_of(ev.AckForward)
            assert isinstance(forwarded, ev.AckForward)
            assert forwarded.id == head.core.packet_id
    assert _kinds(world).count("ack") == 1


async def test_an_ack_repeated_after_a_reconnection_is_logged_and_forwarded_once(tmp_path: Path) -> None:
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"indicator")
    head = _head(data)
    async with running_broker(world, flush_interval=0.3) as broker:
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            assert isinstance(await fra.submit(data), ev.Receipt)
        for _ in range(2):  # the second connection comes before the first ack's batch commits: pushed again
            async with WireClient.connect(world, "DEU", broker.port) as deu:
                seq, got = await deu.receive_delivery()
                assert got == data
                await _ack(deu, world, seq, head)
        await trio.sleep(0.8)
        assert [i.kind for i in broker.mail.pending("FRA")] == ["ack"]
        assert broker.mail.pending("DEU") == []
    assert _kinds(world).count("ack") == 1


async def test_two_uploads_of_one_packet_id_in_flight_get_one_receipt_and_one_replay(tmp_path: Path) -> None:
    """Both pass submit-begin (neither is logged yet); whichever ends second must not get a receipt that names
    its digest at the index the log gave the other."""
    world = _world(tmp_path)
    packet_id = b"\x01" * 16
    one = seal(world, "FRA", ["DEU"], b"one", packet_id=packet_id)
    two = seal(world, "FRA", ["DEU"], b"two, longer", packet_id=packet_id)
    h1, h2 = _head(one), _head(two)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        r1, r2 = fra.conn.new_rid(), fra.conn.new_rid()
        await fra.send(ev.SubmitBegin(r1, one[: h1.head_size], len(one) - h1.head_size))
        await fra.send(ev.SubmitBegin(r2, two[: h2.head_size], len(two) - h2.head_size))
        await fra.send(ev.SubmitChunk(r1, one[h1.head_size :]))
        await fra.send(ev.SubmitEnd(r1))
        receipt = await fra.next_of(ev.Receipt)
        assert isinstance(receipt, ev.Receipt)
        assert receipt.digest == h1.digest
        await fra.send(ev.SubmitChunk(r2, two[h2.head_size :]))
        await fra.send(ev.SubmitEnd(r2))
        answer = await fra.next_of(ev.ErrorMessage)
        assert isinstance(answer, ev.ErrorMessage)
        assert (answer.rid, answer.code) == (r2, codes.REPLAY)
    assert _kinds(world).count("pkt") == 1


async def test_a_full_push_window_goes_on_as_the_member_confirms(tmp_path: Path) -> None:
    """A member that allows two unconfirmed pushes still gets all five packets, in order: the pusher waits while
    the window is full and each acknowledgement wakes it (a wake only when it waits: specs/wire.md, `pushes`)."""
    world = _world(tmp_path)
    packets = [seal(world, "FRA", ["DEU"], f"indicator {i}".encode()) for i in range(5)]
    async with running_broker(world) as broker:
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            for data in packets:
                assert isinstance(await fra.submit(data), ev.Receipt)
        async with WireClient.connect(world, "DEU", broker.port, hello=False) as deu:
            deu.conn = Connection(Role.CLIENT, dataclasses.replace(DEFAULT_LIMITS, pushes=2))
            await deu.send(ev.Hello(SUPPORTED_VERSIONS, "DEU", "node", 0, deu.conn.limits))
            assert isinstance(await deu.next(), ev.Welcome)
            got = []
            for _ in packets:
                seq, data = await deu.receive_delivery()
                head = _head(data)
                key = world.members["DEU"].signing
                ack = records.Ack.make(key, head.core.packet_id, head.digest, "FRA", "DEU", int(time.time()))
                await deu.send(ev.Ack(seq, head.core.packet_id, ack.raw))
                got.append(data)
    assert got == packets


async def test_a_statement_waiting_for_the_policy_lock_holds_up_nothing_else_of_its_member(tmp_path: Path) -> None:
    """A concurrency review: a statement waited for the lock operator commands hold (flock, in a thread that
    could not be cancelled) inside its member's reader, so that member's pings went unanswered (its node would
    give the connection up), and a suspended operator command held the broker's shutdown for good. The lock is
    held here as an operator command holds it, in this process but through its own open file."""
    import fcntl

    from valise.policy import records as prec

    world = make_world(tmp_path)
    fra = world.members["FRA"]
    statement = prec.grant(fra.signing, origin=world.home.config().origin, author="FRA", created=int(time.time()),
                           to="DEU", tlp="AMBER")  # fmt: skip
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as client:
        client.refuse_cosign = True
        with open(world.home.policy_lock_path, "a+b") as held:  # noqa: ASYNC230 - a lock file, as the CLI opens it
            fcntl.flock(held, fcntl.LOCK_EX)
            rid = client.conn.new_rid()
            await client.send(ev.Statement(rid, statement))
            await client.sync()  # a ping answered while the statement waits
            fcntl.flock(held, fcntl.LOCK_UN)
        with trio.fail_after(10):
            result = await client.next_of(ev.StatementResult)
        assert isinstance(result, ev.StatementResult)
        assert result.rid == rid
