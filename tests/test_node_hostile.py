"""A node facing a hostile broker or a careless local client: the daemon stays up, refuses what it cannot keep, and
its answers stay within the control protocol's frame limit. The broker is the scripted one of test_node_daemon
(over a memory stream); the control socket is real."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from valise import identity, packet
from valise.cli.node import call
from valise.node import control, ops, report
from valise.node import session as session_module
from valise.node.daemon import ALARM_TEXT
from valise.policy import records as policy_records
from valise.wire import codes
from valise.wire import events as ev

from .conftest import NOW, seeded_random
from .test_node_cli import cli, serve_daemon
from .test_node_daemon import ORIGIN, Harness, ScriptedBroker, seal, wait_for, world  # noqa: F401


async def _deliver(broker: ScriptedBroker, seq: int, data: bytes) -> None:
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    await broker.send(ev.DeliverBegin(seq, data[: head.head_size], len(data) - head.head_size))
    await broker.send(ev.DeliverChunk(seq, data[head.head_size :]))
    await broker.send(ev.DeliverEnd(seq))


async def _refused(broker: ScriptedBroker, *codes_in_order: str) -> list[ev.Refuse]:
    """The node answers each item with a `refuse` (never an `ack`), which frees its push slot at the broker."""
    got = []
    for code in codes_in_order:
        msg = await broker.expect(ev.Refuse)
        assert msg.code == code, msg
        got.append(msg)
    return got


@asynccontextmanager
async def _daemon(setup: dict[str, Any], me: identity.Identity) -> AsyncIterator[Harness]:
    """FRA's daemon serving its control socket, connected to the scripted broker, until the block ends."""
    h = Harness(setup, me)
    async with trio.open_nursery() as nursery:
        await serve_daemon(nursery, h)
        yield h
        nursery.cancel_scope.cancel()


MALFORMED: list[dict[str, Any]] = [
    {"op": "statement", "build": {"kind": "revoke", "statement": 5}},
    {"op": "statement", "build": {"kind": "grant", "to": "DEU", "tlp": "AMBER", "categories": 3}},
    {"op": "statement", "build": {"kind": "accept", "from": ["x"], "tlp": "AMBER"}},
    {"op": "statement", "build": {"kind": "grant", "to": 5, "tlp": 7}},
    {"op": 5},
    {"op": "inbox", "after": "x"},
]


async def test_malformed_control_requests_leave_the_daemon_running(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    async with _daemon(world, members["FRA"]) as h:
        for request in MALFORMED:
            with trio.fail_after(10):
                reply = await call(h.daemon.home.root, request)
            assert reply["ok"] is False, request
            assert reply["error"], request
        with trio.fail_after(10):
            status = await call(h.daemon.home.root, {"op": "status"})
        assert status["ok"]
        assert status["connected"]


async def test_many_long_alarms_still_fit_a_status_answer(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Alarm text is mostly the broker's or a sender's: each is bounded, and status shows the latest ones."""
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        await serve_daemon(nursery, h)
        for i in range(400):
            h.daemon.alarm("delivery", f"refused packet {i}: " + "recipient-" * 2000)
        assert await cli("status", "--node", str(h.daemon.home.root), "--json") == 0
        status = json.loads(capsys.readouterr().out)
        assert status["alarms_total"] == 400
        assert len(status["alarms"]) == report.STATUS_ALARMS
        assert status["alarms"][-1]["message"].startswith("refused packet 399: ")
        assert all(len(a["message"]) < ALARM_TEXT + 40 for a in status["alarms"])
        assert await cli("status", "--node", str(h.daemon.home.root)) == 0
        assert f"alarms     400 (the latest {report.STATUS_ALARMS} below)" in capsys.readouterr().out
        nursery.cancel_scope.cancel()


async def test_an_inbox_of_any_size_is_listed_page_by_page(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """1,200 packets with long (signed, sender-chosen) labels: over a megabyte of listing, more than one frame."""
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        await serve_daemon(nursery, h)
        store = h.daemon.store
        labels = {"tlp": "AMBER", "categories": ["malware"], "note": "n" * 2000}
        for i in range(1200):
            spool = store.tmp_path(f"{i}.part")
            spool.write_bytes(b"ciphertext")
            store.inbox_add_file(i.to_bytes(32, "big"), i.to_bytes(16, "big"), "DEU", NOW, labels, spool)
        assert await cli("inbox", "--node", str(h.daemon.home.root), "--json") == 0
        items = json.loads(capsys.readouterr().out)
        assert [it["id"] for it in items] == [i.to_bytes(16, "big").hex() for i in range(1200)]
        assert (await call(h.daemon.home.root, {"op": "status"}))["ok"]
        nursery.cancel_scope.cancel()


async def test_an_expired_packet_is_refused_not_acknowledged(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    h = Harness(world, members["FRA"])
    out = io.BytesIO()
    packet.seal(io.BytesIO(b"old"), out, sender=members["DEU"], recipients=[members["FRA"].bundle], tlp="AMBER",
                now=NOW - 86400 * 60, random=seeded_random(b"old"))  # fmt: skip
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        await _deliver(broker, 0, out.getvalue())
        (refusal,) = await _refused(broker, codes.STALE)
        assert refusal.seq == 0
        (alarm,) = h.daemon.store.alarms()
        assert "expired at" in alarm.message
        assert alarm.message.startswith("refused packet ")  # named by the packet, whose head parses
        assert refusal.message == alarm.message
        assert h.daemon.store.inbox_all() == []
        nursery.cancel_scope.cancel()


async def test_a_packet_that_expired_a_moment_ago_is_refused_without_an_alarm(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    """The broker purges by its own clock every few seconds, and honest clocks may be minutes apart: a delivery
    whose packet expired a moment ago is routine (refused, not acknowledged, no alarm); the test above is the
    broker that should have purged it weeks ago."""
    h = Harness(world, members["FRA"])
    out = io.BytesIO()
    packet.seal(io.BytesIO(b"just late"), out, sender=members["DEU"], recipients=[members["FRA"].bundle],
                tlp="AMBER", now=NOW - 3600, expires=NOW - 30, random=seeded_random(b"late"))  # fmt: skip
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        await _deliver(broker, 0, out.getvalue())
        (refusal,) = await _refused(broker, codes.STALE)
        assert "expired at" in refusal.message
        assert h.daemon.store.alarms() == []
        assert h.daemon.store.inbox_all() == []
        nursery.cancel_scope.cancel()


async def test_a_second_packet_under_one_packet_id_is_refused_and_not_kept(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    h = Harness(world, members["FRA"])
    first = seal(members["DEU"], [members["FRA"]], b"same", size=10)
    other = seal(members["DEU"], [members["FRA"]], b"same", size=20)  # same randomness: same id, another header
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        await _deliver(broker, 0, first)
        assert isinstance(await broker.expect(ev.Ack), ev.Ack)
        for seq in (1, 2):  # pushed again after a reconnection: still one alarm
            await _deliver(broker, seq, other)
            await _refused(broker, codes.REPLAY)
        (alarm,) = h.daemon.store.alarms()
        assert "already in the inbox for another packet" in alarm.message
        (row,) = h.daemon.store.inbox_all()
        assert row.digest == packet.parse_head(first).digest  # type: ignore[union-attr]
        assert len(list((h.daemon.store.root / "inbox").iterdir())) == 1
        nursery.cancel_scope.cancel()


async def test_a_packet_from_a_member_removed_since_is_still_read_with_a_note(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Sent while DEU was a member (the broker takes packets from active members only), delivered after its
    removal: taken, acknowledged, and readable, with the removal and its reason shown beside it."""
    h = Harness(world, members["FRA"])
    h.log.seq += 1
    removal = policy_records.dir_record(h.log.operator, ORIGIN, h.log.seq, NOW, "member-remove", id="DEU",
                                        reason="key stolen")  # fmt: skip
    h.log.add(removal)
    data = seal(members["DEU"], [members["FRA"]], b"before the removal", size=10)
    async with trio.open_nursery() as nursery:
        h.nursery = nursery
        await nursery.start(h.daemon.run)
        broker = await h.accepted.receive()
        await wait_for(lambda: h.daemon.follower.size == 4)
        await _deliver(broker, 0, data)
        assert isinstance(await broker.expect(ev.Ack), ev.Ack)
        (row,) = h.daemon.store.inbox_all()
        out = tmp_path / "out.bin"
        code = await cli("read", "--node", str(h.daemon.home.root), row.packet_id.hex(), "-o", str(out))
        assert code == 0
        assert out.read_bytes() == bytes(10)
        assert "the sender has since been removed from the directory (key stolen)" in capsys.readouterr().err
        nursery.cancel_scope.cancel()


async def test_integers_past_what_the_node_stores_are_refused_by_name(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    """msgpack carries integers up to 2**64-1, SQLite up to 2**63-1: this was "internal error: OverflowError"."""
    async with _daemon(world, members["FRA"]) as h:
        for request, field in (
            ({"op": "inbox", "after": 2**63}, "after"),
            ({"op": "inbox", "after": -1}, "after"),
            ({"op": "send", "to": ["DEU"], "tlp": "AMBER", "size": 2**64 - 1}, "size"),
        ):
            with trio.fail_after(10):
                reply = await call(h.daemon.home.root, request)
            assert reply["ok"] is False
            assert reply["error"].startswith(f"control request field {field!r} is "), reply
            assert reply["error"].endswith("outside 0..9223372036854775807"), reply


async def test_a_send_to_more_names_than_a_packet_holds_is_refused_before_any_lookup(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    async with _daemon(world, members["FRA"]) as h:
        names = [f"M{i}" for i in range(100_000)]
        request = {"op": "send", "to": names, "tlp": "AMBER", "size": 10}
        with trio.fail_after(10):
            reply = await call(h.daemon.home.root, request)
        assert reply["ok"] is False
        assert reply["error"] == "100000 recipients named; a packet has at most 256"


async def test_many_local_clients_at_once_are_all_answered(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    """Scripts run `valise send` and `status` in parallel. Past the socket's accept queue, a connect seemed to
    succeed and the first write failed (ENOTCONN): 24 of 60 concurrent sends printed a traceback."""
    replies: list[dict[str, Any]] = []
    async with _daemon(world, members["FRA"]) as h:

        async def ask() -> None:
            replies.append(await call(h.daemon.home.root, {"op": "status"}))

        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                for _ in range(300):
                    clients.start_soon(ask)
    assert len(replies) == 300
    assert all(r["ok"] for r in replies)


async def test_a_local_client_that_stalls_mid_send_is_dropped(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`send` seals on a worker thread that pulls the payload from the socket: a client that stops sending would
    hold that thread (shared by every send and read) for good. It is dropped after CONTROL_IDLE (shortened)."""
    monkeypatch.setattr(ops, "CONTROL_IDLE", 0.5)
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        await serve_daemon(nursery, h)
        client = await control.connect(control.socket_path(h.daemon.home.root))
        request = {"op": "send", "to": ["DEU"], "tlp": "AMBER", "size": 100_000}
        await control.send_msg(client, request)
        await control.send_msg(client, {"op": "data", "data": bytes(1000)})  # then nothing more
        with trio.fail_after(10):
            reply = await control.MessageReader(client).next()
        assert reply is not None
        assert reply["ok"] is False
        assert "sent nothing for 0.5 s" in reply["error"]
        await client.aclose()
        assert not list((h.daemon.store.root / "tmp").glob("send-*"))
        assert h.daemon.store.outbox_all() == []
        nursery.cancel_scope.cancel()


async def test_a_local_client_that_trickles_its_payload_is_dropped(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under the idle limit but a byte at a time: 45 such clients held the worker threads, and a real `valise
    send` waited for as long as they went on (80 s in the review that found it)."""
    monkeypatch.setattr(ops, "CONTROL_IDLE", 0.5)
    async with _daemon(world, members["FRA"]) as h:
        client = await control.connect(control.socket_path(h.daemon.home.root))
        await control.send_msg(client, {"op": "send", "to": ["DEU"], "tlp": "AMBER", "size": 100_000})
        reader = control.MessageReader(client)
        reply = None
        with trio.fail_after(10):
            for _ in range(40):  # a byte every 0.1 s: never idle for 0.5 s, never nearly 64 KiB/s
                await control.send_msg(client, {"op": "data", "data": b"x"})
                with trio.move_on_after(0.1):
                    reply = await reader.next()
                if reply is not None:
                    break
        assert reply is not None, "the trickling client was never dropped"
        assert reply["ok"] is False
        assert "under the 64 KiB/s a data stream needs" in reply["error"]
        await client.aclose()
        assert h.daemon.store.outbox_all() == []


async def test_deliveries_from_a_sender_the_log_never_shows_are_held_within_bounds_then_refused(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker can name any sender. Deliveries from one the verified log does not show wait for it, unacknowledged,
    at most HOLD_COUNT of them; past HOLD_TIME they are refused with an alarm and their files removed."""
    monkeypatch.setattr(session_module, "HOLD_COUNT", 3)
    monkeypatch.setattr(session_module, "HOLD_TIME", 0.3)
    monkeypatch.setattr(session_module, "HOLD_RECHECK", 0.05)
    h = Harness(world, members["FRA"])
    tmp = h.daemon.store.tmp_path("x").parent
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        for seq in range(3):
            await _deliver(broker, seq, seal(members["ITA"], [members["FRA"]], b"held %d" % seq, size=10))
        await wait_for(lambda: h.daemon.holding() == 3)
        assert len(list(tmp.iterdir())) == 3
        await _deliver(broker, 3, seal(members["ITA"], [members["FRA"]], b"one too many", size=10))
        await _refused(broker, codes.UNKNOWN_MEMBER)
        (alarm,) = h.daemon.store.alarms()
        assert "sender ITA: it is not a member in the verified log, and 3 deliveries" in alarm.message
        refusals = await _refused(broker, *[codes.UNKNOWN_MEMBER] * 3)
        assert sorted(r.seq for r in refusals) == [0, 1, 2]
        assert h.daemon.holding() == 0
        assert (
            sum("still not a member in the verified log after 0.3 s" in a.message for a in h.daemon.store.alarms()) == 3
        )
        assert list(tmp.iterdir()) == []
        assert h.daemon.store.inbox_all() == []
        nursery.cancel_scope.cancel()


async def test_a_held_delivery_is_checked_once_its_sender_is_known_and_a_forged_one_refused(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    """Held unverified, a delivery gets the same checks as any other once the log shows its sender: a forged header
    is refused with an alarm, the genuine packet is taken and acknowledged under its own seq."""
    h = Harness(world, members["FRA"])
    genuine = seal(members["ITA"], [members["FRA"]], b"from a new member", size=10)
    head = packet.parse_head(genuine)
    assert isinstance(head, packet.Head)
    forged = bytearray(seal(members["ITA"], [members["FRA"]], b"forged", size=10))
    forged[head.head_size - 1] ^= 1  # the last byte of the header's signature
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        await _deliver(broker, 0, bytes(forged))
        await _deliver(broker, 1, genuine)
        await wait_for(lambda: h.daemon.holding() == 2)
        h.log.admit(members["ITA"])
        session = h.daemon.session
        assert session is not None
        assert await h.daemon.sync(session)
        (refusal,) = await _refused(broker, codes.BAD_SIGNATURE)
        assert refusal.seq == 0
        ack = await broker.expect(ev.Ack)
        assert (ack.seq, ack.id) == (1, head.core.packet_id)
        (alarm,) = h.daemon.store.alarms()
        assert "packet header from ITA" in alarm.message
        assert h.daemon.holding() == 0
        (row,) = h.daemon.store.inbox_all()
        assert row.digest == head.digest
        nursery.cancel_scope.cancel()


async def test_held_and_partial_deliveries_are_dropped_with_their_connection(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    """Nothing acknowledged them, so the broker pushes them again on the next connection; their files go now (a
    delivery cut off midway left its partial file, and an open file, until the daemon restarted)."""
    h = Harness(world, members["FRA"])
    tmp = h.daemon.store.tmp_path("x").parent
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        await _deliver(broker, 0, seal(members["ITA"], [members["FRA"]], b"held", size=10))
        await wait_for(lambda: h.daemon.holding() == 1)
        partial = seal(members["DEU"], [members["FRA"]], b"cut off", size=1000)
        head = packet.parse_head(partial)
        assert isinstance(head, packet.Head)
        await broker.send(ev.DeliverBegin(1, partial[: head.head_size], len(partial) - head.head_size))
        await broker.send(ev.DeliverChunk(1, partial[head.head_size : head.head_size + 100]))
        await wait_for(lambda: len(list(tmp.iterdir())) == 2)
        await broker.stream.aclose()
        await wait_for(lambda: h.daemon.session is None)
        assert list(tmp.iterdir()) == []
        nursery.cancel_scope.cancel()
