"""The node daemon's protocol handling, driven by a scripted broker: a real `wire.Connection(Role.SERVER)` over trio
memory streams, a real log (MemoryLog + LogService) with real signed checkpoints, real keys and packets."""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from valise import identity, keyfiles, packet, records, tls
from valise.node.daemon import NodeDaemon
from valise.node.home import NodeHome
from valise.node.session import Disconnected
from valise.tlog import cosignature, note
from valise.wire import codes, liveness
from valise.wire import events as ev
from valise.wire.connection import READ_SIZE, Connection, Signal
from valise.wire.state import Role

from .conftest import NOW, seeded_random
from .harness import long_reason_retraction
from .test_node_follower import BROKER_ID, ORIGIN, Log

M = TypeVar("M", bound=ev.Message)


class ScriptedBroker:
    """The broker side of one connection: answers hello and log requests by itself; the test sees the rest."""

    def __init__(self, stream: trio.abc.Stream, log: Log) -> None:
        self.stream = stream
        self.log = log
        self.conn = Connection(Role.SERVER)
        self.lock = trio.Lock()
        self.send_events, self.events = trio.open_memory_channel[ev.Message](64)
        self.entries_served: list[tuple[int, int]] = []

    async def send(self, msg: ev.Message) -> None:
        async with self.lock:
            await self.stream.send_all(self.conn.send(msg))

    async def run(self) -> None:
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):  # the test hung up
            await self._run()

    async def _run(self) -> None:
        while True:
            data = await self.stream.receive_some(READ_SIZE)
            self.conn.receive_data(data)
            while True:
                event = self.conn.next_event()
                if event is Signal.PAUSED:
                    await self.send(ev.Welcome(1, BROKER_ID.member_id, NOW, self.conn.limits))
                    continue
                if isinstance(event, Signal):
                    break
                if isinstance(event, ev.ConnectionClosed):
                    return
                await self.handle(event)

    async def handle(self, msg: ev.Message) -> None:
        if isinstance(msg, ev.GetCheckpoint):
            latest = self.log.service.latest
            assert latest is not None
            await self.send(ev.Checkpoint(msg.rid, latest.note))
        elif isinstance(msg, ev.GetEntries):
            self.entries_served.append((msg.start, msg.end))
            items, hashed, levels = self.log.page(msg.start, msg.end, "FRA")
            await self.send(ev.Entries(msg.rid, msg.start, tuple(items), tuple(hashed), tuple(levels)))
        elif not isinstance(msg, ev.Hello):
            await self.send_events.send(msg)

    async def expect(self, kind: type[M]) -> M:
        msg = await self.events.receive()
        assert isinstance(msg, kind), f"expected {kind.TYPE}, got {msg}"
        return msg


@pytest.fixture
def world(tmp_path: Path, members: dict[str, identity.Identity]) -> dict[str, Any]:
    keyfiles.save_identity(tmp_path / "keys", members["FRA"], None)
    broker_pub = tmp_path / "broker.pub"
    broker_pub.write_bytes(BROKER_ID.bundle.raw)
    log = Log()
    for m in ("FRA", "DEU"):
        log.admit(members[m])
    home = NodeHome.create(tmp_path / "node", tmp_path / "keys", "127.0.0.1:9", broker_pub, log.vkey)
    return {"home": home, "log": log}


class Harness:
    def __init__(self, world: dict[str, Any], fra: identity.Identity) -> None:
        self.log: Log = world["log"]
        self.brokers: trio.MemorySendChannel[ScriptedBroker]
        self.brokers, self.accepted = trio.open_memory_channel[ScriptedBroker](4)
        self.nursery: trio.Nursery | None = None
        self.daemon = NodeDaemon(
            world["home"], fra, connector=self.connect, random=seeded_random(b"node"), wall=lambda: NOW,
            poll_interval=3600,
        )  # fmt: skip

    async def connect(self) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        broker = ScriptedBroker(theirs, self.log)
        assert self.nursery is not None
        self.nursery.start_soon(broker.run)
        await self.brokers.send(broker)
        return ours


async def start(nursery: trio.Nursery, h: Harness) -> ScriptedBroker:
    h.nursery = nursery
    nursery.start_soon(h.daemon.connection_loop)
    broker = await h.accepted.receive()
    await h.daemon.connected_event.wait()
    return broker


def seal(sender: identity.Identity, to: list[identity.Identity], seed: bytes, size: int = 100_000) -> bytes:
    out = io.BytesIO()
    packet.seal(
        io.BytesIO(bytes(size)), out, sender=sender, recipients=[t.bundle for t in to], tlp="AMBER",
        now=NOW, random=seeded_random(seed),
    )  # fmt: skip
    return out.getvalue()


def sealed(sender: identity.Identity, to: list[identity.Identity], seed: bytes) -> tuple[bytes, packet.Head]:
    """A small packet and its parsed head."""
    data = seal(sender, to, seed, size=10)
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return data, head


async def wait_for(condition: Any) -> None:
    with trio.fail_after(10):  # a safety net against a hang, not a timed assertion
        while not condition():  # noqa: ASYNC110 - polling state the daemon keeps in SQLite and memory
            await trio.sleep(0.001)


async def test_hello_welcome_then_the_node_follows_the_log(world: dict[str, Any], members: dict[str, Any]) -> None:
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        hello = broker.conn.hello
        assert hello is not None
        assert (hello.member, hello.role, hello.seen) == ("FRA", "node", 0)
        await wait_for(lambda: h.daemon.follower.size == 3)
        assert h.daemon.follower.member_key("DEU") == members["DEU"].bundle.sign_key
        nursery.cancel_scope.cancel()
    # A restart resumes from the stored verified state: hello says what it has seen.
    h2 = Harness(world, members["FRA"])
    assert h2.daemon.follower.size == 3
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h2)
        assert broker.conn.hello is not None
        assert broker.conn.hello.seen == 3
        nursery.cancel_scope.cancel()
    assert broker.entries_served == []  # nothing refetched


async def test_submit_gets_a_verified_receipt(world: dict[str, Any], members: dict[str, Any]) -> None:
    h = Harness(world, members["FRA"])
    data = seal(members["FRA"], [members["DEU"]], b"p1")
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        store = h.daemon.store
        store.enqueue(head.core.packet_id, head.digest, ["DEU"], NOW, head.core.expires, data)
        h.daemon.wake_outbox()
        begin = await broker.expect(ev.SubmitBegin)
        assert begin.head == data[: head.head_size]
        assert begin.size == len(data) - head.head_size
        got = b""
        while True:
            msg = await broker.events.receive()
            if isinstance(msg, ev.SubmitEnd):
                break
            assert isinstance(msg, ev.SubmitChunk)
            got += msg.data
            await broker.send(ev.Credit(len(msg.data)))  # keep the window open, as the broker does
        assert begin.head + got == data
        # The packet entry goes into the log at index 3; the receipt promises it.
        h.log.add(records.packet_entry(head.header.raw, head.signature, NOW))
        receipt = records.Receipt.make(BROKER_ID.signing, ORIGIN, 3, head.digest, head.core.packet_id, "FRA", NOW)
        await broker.send(ev.Receipt(begin.rid, head.core.packet_id, 3, head.digest, receipt.raw))
        row = await h.daemon.wait_outcome(head.core.packet_id, 10)
        assert row is not None
        assert (row.state, row.log_index, row.receipt) == ("receipted", 3, receipt.raw)
        # Once the node verifies a checkpoint covering index 3, the receipt is checked against the log.
        assert h.daemon.session is not None
        await h.daemon.sync(h.daemon.session)
        row = store.outbox_get(head.core.packet_id)
        assert row is not None
        assert row.in_log == 1
        assert store.alarms() == []
        nursery.cancel_scope.cancel()


async def test_an_early_denial_cancels_the_upload(world: dict[str, Any], members: dict[str, Any]) -> None:
    h = Harness(world, members["FRA"])
    data = seal(members["FRA"], [members["DEU"]], b"p2", size=3_000_000)  # more than one window
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        h.daemon.store.enqueue(head.core.packet_id, head.digest, ["DEU"], NOW, head.core.expires, data)
        h.daemon.wake_outbox()
        begin = await broker.expect(ev.SubmitBegin)
        await broker.send(ev.Deny(begin.rid, head.core.packet_id, (ev.DenyReason("DEU", "no acceptance"),)))
        while not isinstance(msg := await broker.events.receive(), ev.SubmitCancel):
            assert isinstance(msg, ev.SubmitChunk)  # chunks already under way within the window
        row = await h.daemon.wait_outcome(head.core.packet_id, 10)
        assert row is not None
        assert row.state == "denied"
        assert row.outcome is not None
        assert "no acceptance" in row.outcome
        nursery.cancel_scope.cancel()


async def test_a_delivery_is_verified_stored_and_acknowledged(world: dict[str, Any], members: dict[str, Any]) -> None:
    h = Harness(world, members["FRA"])
    data = seal(members["DEU"], [members["FRA"]], b"d1", size=1_500_000)
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await broker.send(ev.DeliverBegin(0, data[: head.head_size], len(data) - head.head_size))
        pos = head.head_size
        credit = 0
        while pos < len(data):
            room = min(broker.conn.send_window, 256 * 1024, len(data) - pos)
            if room == 0:
                credit += (await broker.expect(ev.Credit)).amount
                continue
            await broker.send(ev.DeliverChunk(0, data[pos : pos + room]))
            pos += room
        await broker.send(ev.DeliverEnd(0))
        while not isinstance(msg := await broker.events.receive(), ev.Ack):
            assert isinstance(msg, ev.Credit)
        assert credit > 0  # the node re-opened the window as it wrote
        ack = records.Ack.verified(msg.ack, members["FRA"].bundle.sign_key)
        assert (ack.packet_id, ack.digest, ack.sender, ack.recipient) == (
            head.core.packet_id,
            head.digest,
            "DEU",
            "FRA",
        )
        (row,) = h.daemon.store.inbox_all()
        assert (row.sender, row.acked, row.state) == ("DEU", True, "new")
        assert h.daemon.store.inbox_path(row.digest).read_bytes() == data
        nursery.cancel_scope.cancel()


async def test_a_forged_delivery_is_not_acknowledged(world: dict[str, Any], members: dict[str, Any]) -> None:
    h = Harness(world, members["FRA"])
    data = bytearray(seal(members["DEU"], [members["FRA"]], b"d2", size=1000))
    head = packet.parse_head(bytes(data))
    assert isinstance(head, packet.Head)
    data[-1] ^= 1  # the ciphertext no longer matches the signed hash
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await broker.send(ev.DeliverBegin(0, bytes(data[: head.head_size]), len(data) - head.head_size))
        await broker.send(ev.DeliverChunk(0, bytes(data[head.head_size :])))
        await broker.send(ev.DeliverEnd(0))
        refusal = await broker.expect(ev.Refuse)  # refused, not acknowledged (wire.md rule 13)
        assert (refusal.seq, refusal.code) == (0, "hash-mismatch")
        assert "does not match" in h.daemon.store.alarms()[0].message
        assert h.daemon.store.inbox_all() == []
        assert broker.conn.unconfirmed == frozenset()
        nursery.cancel_scope.cancel()


async def test_a_delivery_this_member_cannot_read_is_not_acknowledged(
    world: dict[str, Any], members: dict[str, Any]
) -> None:
    """A crypto review: DEU signs a packet whose stanza for FRA is sealed to a key that is not FRA's (a bug, or
    on purpose). Its signature and hash hold, so FRA's node took it and signed an acknowledgement, which the log
    shows as the delivery; FRA found it unreadable only at `valise read`. The stanza is now opened, and the key
    checked against the signed commitment, before anything is acknowledged."""
    h = Harness(world, members["FRA"])
    not_fra = identity.generate("FRA", seeded_random(b"someone else's keys"), NOW)
    data = seal(members["DEU"], [not_fra], b"unreadable", size=1000)
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await broker.send(ev.DeliverBegin(0, data[: head.head_size], len(data) - head.head_size))
        await broker.send(ev.DeliverChunk(0, data[head.head_size :]))
        await broker.send(ev.DeliverEnd(0))
        refusal = await broker.expect(ev.Refuse)
        assert (refusal.seq, refusal.code) == (0, "bad-packet")
        assert "the stanza for FRA does not open" in refusal.message
        (alarm,) = h.daemon.store.alarms()
        assert "the stanza for FRA does not open" in alarm.message
        assert h.daemon.store.inbox_all() == []
        nursery.cancel_scope.cancel()


async def test_cosign_request_is_answered_after_following(world: dict[str, Any], members: dict[str, Any]) -> None:
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        new_note = h.log.admit(members["ITA"])
        proof = h.log.service.consistency_proof(3)
        await broker.send(ev.CosignRequest(7, 3, tuple(proof), new_note))
        resp = await broker.expect(ev.CosignResponse)
        assert resp.rid == 7
        assert broker.entries_served[-1] == (3, 4)
        cosigned = note.parse_note(new_note).text.encode() + b"\n" + resp.cosignature
        verifier = cosignature.CosignatureVerifier("FRA", members["FRA"].bundle.sign_key)
        opened = note.open_note(cosigned, [verifier])
        assert [s.name for s in opened.verified] == ["FRA"]
        assert h.daemon.follower.member_key("ITA") == members["ITA"].bundle.sign_key
        nursery.cancel_scope.cancel()


async def test_a_forked_checkpoint_is_refused_and_kept(world: dict[str, Any], members: dict[str, Any]) -> None:
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        fork = Log()  # same log key and genesis, a different third entry
        fork.admit(members["FRA"])
        fork_note = fork.admit(members["ITA"])
        await broker.send(ev.CosignRequest(8, 3, (), fork_note))
        err = await broker.expect(ev.ErrorMessage)
        assert (err.rid, err.code) == (8, "conflict")
        (alarm,) = h.daemon.store.alarms()
        assert (alarm.kind, alarm.evidence) == ("fork", fork_note)
        assert h.daemon.follower.size == 3
        nursery.cancel_scope.cancel()


async def _answer_consistency(broker: ScriptedBroker, h: Harness) -> None:
    ask = await broker.expect(ev.GetConsistency)
    await broker.send(ev.Consistency(ask.rid, tuple(h.log.service.consistency_proof(ask.old, ask.new))))


async def test_a_cosigning_request_overtaken_by_a_newer_tree_is_refused_without_alarm(
    world: dict[str, Any], members: dict[str, Any]
) -> None:
    """The broker asks about checkpoint N; before the node gets to it, it has followed N+1 (an honest race: the
    request waited behind a delivery). Refused as C2SP witnesses do (conflict); no fork alarm for a note that
    fits the verified tree."""
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        note4 = h.log.admit(members["ITA"])
        proof_3_4 = h.log.service.consistency_proof(3)
        h.log.admit(members["NGA"])
        assert h.daemon.session is not None
        await h.daemon.sync(h.daemon.session)
        assert h.daemon.follower.size == 5
        await broker.send(ev.CosignRequest(9, 3, tuple(proof_3_4), note4))
        await _answer_consistency(broker, h)
        err = await broker.expect(ev.ErrorMessage)
        assert (err.rid, err.code) == (9, "conflict")
        assert "older than the verified size 5" in err.message
        assert h.daemon.store.alarms() == []
        # An older note that does not fit the verified tree is a fork all the same.
        fork = Log()
        for m in ("FRA", "ITA", "NGA"):
            fork_note = fork.admit(members[m])
        await broker.send(ev.CosignRequest(10, 3, (), fork_note))
        await _answer_consistency(broker, h)
        err = await broker.expect(ev.ErrorMessage)
        assert (err.rid, err.code) == (10, "conflict")
        (alarm,) = h.daemon.store.alarms()
        assert (alarm.kind, alarm.evidence) == ("fork", fork_note)
        nursery.cancel_scope.cancel()


async def test_transient_errors_retry_later_and_final_ones_stop(world: dict[str, Any], members: dict[str, Any]) -> None:
    h = Harness(world, members["FRA"])
    store = h.daemon.store
    heads = []
    for seed in (b"t1", b"t2"):
        data = seal(members["FRA"], [members["DEU"]], seed, size=10)
        head = packet.parse_head(data)
        assert isinstance(head, packet.Head)
        store.enqueue(head.core.packet_id, head.digest, ["DEU"], NOW, head.core.expires, data)
        heads.append(head)
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        for head, code in zip(heads, ("internal", "replay"), strict=True):
            begin = await broker.expect(ev.SubmitBegin)
            assert begin.head[-64:] == head.signature
            while not isinstance(await broker.events.receive(), ev.SubmitEnd):
                pass
            await broker.send(ev.ErrorMessage(begin.rid, code, f"{code} happened"))
        await wait_for(lambda: store.outbox_get(heads[1].core.packet_id).state != "queued")  # type: ignore[union-attr]
        retry, final = (store.outbox_get(hd.core.packet_id) for hd in heads)
        assert retry is not None
        assert final is not None
        assert (retry.state, retry.attempts) == ("queued", 1)
        assert NOW < retry.next_try <= NOW + 1  # the first retry waits up to 1 s (full jitter)
        assert "internal happened" in (retry.outcome or "")
        assert final.state == "denied"
        assert "replay happened" in (final.outcome or "")
        nursery.cancel_scope.cancel()


async def test_forwarded_acks_and_retractions_are_verified(world: dict[str, Any], members: dict[str, Any]) -> None:
    h = Harness(world, members["FRA"])
    fra, deu = members["FRA"], members["DEU"]
    data, head = sealed(deu, [fra], b"r1")
    pid = head.core.packet_id
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        # DEU acknowledges a packet FRA sent it.
        sent_data, sent = sealed(fra, [deu], b"s1")
        h.daemon.store.enqueue(sent.core.packet_id, sent.digest, ["DEU"], NOW, NOW + 3600, sent_data)
        ack = records.Ack.make(deu.signing, sent.core.packet_id, sent.digest, "FRA", "DEU", NOW)
        await broker.send(ev.AckForward(0, sent.core.packet_id, "DEU", 5, ack.raw))
        assert (await broker.expect(ev.Seen)).seq == 0
        assert h.daemon.store.acks_for(sent.core.packet_id) == {"DEU": ack.raw}
        # An acknowledgement signed by someone else than it claims is refused (`refuse`, not `seen`).
        forged = records.Ack.make(fra.signing, bytes([1]) * 16, bytes(32), "FRA", "DEU", NOW)
        await broker.send(ev.AckForward(1, bytes([1]) * 16, "DEU", 6, forged.raw))
        refusal = await broker.expect(ev.Refuse)
        assert (refusal.seq, refusal.code) == (1, "bad-signature")
        # So is one DEU did sign, but for a packet FRA never sent.
        unsent = records.Ack.make(deu.signing, bytes([2]) * 16, bytes(32), "FRA", "DEU", NOW)
        await broker.send(ev.AckForward(2, bytes([2]) * 16, "DEU", 9, unsent.raw))
        refusal = await broker.expect(ev.Refuse)
        assert (refusal.seq, refusal.code) == (2, "bad-packet")
        assert "which this node did not send" in refusal.message
        # DEU delivers a packet, then retracts it.
        await broker.send(ev.DeliverBegin(3, data[: head.head_size], len(data) - head.head_size))
        await broker.send(ev.DeliverChunk(3, data[head.head_size :]))
        await broker.send(ev.DeliverEnd(3))
        assert (await broker.expect(ev.Ack)).seq == 3
        # With a reason over today's 512 bytes, as a broker before the limit could log and queue it: taken all the
        # same (refused, it would come back at every connection and the packet never show as retracted).
        retraction = long_reason_retraction(deu.signing, pid, head.digest, "DEU")
        await broker.send(ev.RetractForward(4, pid, "DEU", 7, retraction))
        assert (await broker.expect(ev.Seen)).seq == 4
        (row,) = h.daemon.store.inbox_all()
        assert (row.state, row.retraction) == ("retracted", "x" * 600)
        assert ["seq 1 refused" in a.message or "seq 2 refused" in a.message for a in h.daemon.store.alarms()] == [
            True,
            True,
        ]
        assert broker.conn.unconfirmed == frozenset()  # the refusals confirmed them
        assert h.daemon.store.acks_for(bytes([1]) * 16) == {}
        assert h.daemon.store.acks_for(bytes([2]) * 16) == {}
        nursery.cancel_scope.cancel()


async def test_acknowledgements_the_broker_logged_reach_the_sender_through_the_log(
    world: dict[str, Any], members: dict[str, Any]
) -> None:
    """A broker that logs a recipient's acknowledgement but never forwards it cannot hide it: the sender's node
    reads it in the verified log. One that is not a recipient's answer to a packet this node sent is an alarm,
    with the entry as evidence, and does not shadow the real one."""
    h = Harness(world, members["FRA"])
    fra, deu = members["FRA"], members["DEU"]
    data, head = sealed(fra, [deu], b"a1")
    pid = head.core.packet_id
    h.daemon.store.enqueue(pid, head.digest, ["DEU"], NOW, NOW + 3600, data)
    ack = records.Ack.make(deu.signing, pid, head.digest, "FRA", "DEU", NOW)
    bad = {
        "another digest": records.Ack.make(deu.signing, pid, bytes(32), "FRA", "DEU", NOW),
        "forged": records.Ack.make(fra.signing, pid, head.digest, "FRA", "DEU", NOW),
        "not sent": records.Ack.make(deu.signing, bytes([1]) * 16, bytes(32), "FRA", "DEU", NOW),
        "not addressed": records.Ack.make(fra.signing, pid, head.digest, "FRA", "FRA", NOW),
    }
    # FRA's own acknowledgement of a packet of DEU's: not one of FRA's packets, and not in FRA's inbox either (as
    # after a restore of node.db from an older backup): the sender will never send it again.
    others = records.Ack.make(fra.signing, bytes([2]) * 16, bytes(32), "DEU", "FRA", NOW)
    async with trio.open_nursery() as nursery:
        await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        h.log.add(
            records.packet_entry(head.header.raw, head.signature, NOW),
            *(records.ack_entry(a) for a in bad.values()),  # the wrong digest first: it must not shadow the ack
            records.ack_entry(ack),
            records.ack_entry(others),
        )
        assert h.daemon.session is not None
        await h.daemon.sync(h.daemon.session)
        assert h.daemon.follower.size == 10
        assert h.daemon.store.acks_for(pid) == {"DEU": ack.raw}
        assert h.daemon.store.ack_count() == 1
        alarms = h.daemon.store.alarms()
        assert [a.kind for a in alarms] == ["log", "log", "ack", "ack", "ack"]
        assert alarms[0].message.startswith("log entry 5 is an acknowledgement that does not verify")
        assert alarms[1].message.startswith(
            f"1 packet(s) this member acknowledged are not in this node's inbox (the first: log entry 9, packet "
            f"{bytes([2]).hex() * 16} from DEU)"
        )
        held = "the log holds an acknowledgement by"
        assert alarms[2].message.startswith(f"{held} DEU of packet {pid.hex()} names header digest 0000000000000000")
        assert alarms[3].message.startswith(f"{held} DEU of packet {bytes([1]).hex() * 16}")
        assert alarms[4].message.startswith(f"{held} FRA of packet {pid.hex()}")
        assert "which this node did not send" in alarms[3].message
        assert "which was not addressed to FRA" in alarms[4].message
        assert alarms[0].evidence == records.ack_entry(bad["forged"])
        assert alarms[1].evidence == records.ack_entry(others)
        assert [a.evidence for a in alarms[2:]] == [bad[k].raw for k in ("another digest", "not sent", "not addressed")]
        nursery.cancel_scope.cancel()


async def connections_ended_with(nursery: trio.Nursery, h: Harness, ending: ev.Message, n: int) -> list[float]:
    """Run the node's connection loop; end each of its first `n` connections with `ending`, as soon as it is
    up. Returns when each of them began (trio's clock: a test's mock clock makes these virtual times)."""
    h.nursery = nursery
    nursery.start_soon(h.daemon.connection_loop)
    accepted = []
    for _ in range(n):
        broker = await h.accepted.receive()
        accepted.append(trio.current_time())
        await h.daemon.connected_event.wait()
        await broker.send(ending)
    return accepted


async def test_a_node_replaced_again_and_again_alarms_and_backs_off(
    world: dict[str, Any],
    members: dict[str, Any],
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two nodes running with one identity take turns at the broker, each replacing the other within a second,
    for ever. After three replacements in five minutes the node says so in an alarm and waits a minute between
    connections (on trio's mock clock: virtual time, nothing timed on this machine)."""
    mock_clock.autojump_threshold = 0
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        ended = ev.ErrorMessage(None, codes.REPLACED, "replaced by a newer connection of FRA")
        accepted = await connections_ended_with(nursery, h, ended, 4)
        gaps = [b - a for a, b in itertools.pairwise(accepted)]
        assert max(gaps[:2]) < 30  # the usual reconnection backoff at first
        assert gaps[2] >= 60  # then a minute between connections
        # Each recovery is said at the level its loss was, so that a default (warnings only) log shows both.
        recovered = [r for r in caplog.records if r.getMessage().startswith("reconnected to broker")]
        assert len(recovered) == 3
        assert {r.levelname for r in recovered} == {"WARNING"}
        (alarm,) = h.daemon.store.alarms()
        assert alarm.kind == "identity"
        assert "is a second node running with this identity?" in alarm.message
        nursery.cancel_scope.cancel()


async def test_an_acknowledgement_kept_when_forwarded_is_not_verified_again_from_the_log(
    world: dict[str, Any], members: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same signed bytes, verified once already: reading them again in the log costs no Ed25519 check."""
    h = Harness(world, members["FRA"])
    fra, deu = members["FRA"], members["DEU"]
    data, head = sealed(fra, [deu], b"k1")
    pid = head.core.packet_id
    h.daemon.store.enqueue(pid, head.digest, ["DEU"], NOW, NOW + 3600, data)
    h.daemon.store.outbox_receipted(pid, b"receipt", 3, NOW)  # sent earlier: the outbox does not send it again
    ack = records.Ack.make(deu.signing, pid, head.digest, "FRA", "DEU", NOW)
    checks: list[bytes] = []
    verified = records.Ack.verified

    def counted(raw: bytes, key: bytes) -> records.Ack:  # the real check, counted
        checks.append(raw)
        return verified(raw, key)

    monkeypatch.setattr(records.Ack, "verified", staticmethod(counted))
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        await broker.send(ev.AckForward(0, pid, "DEU", 4, ack.raw))
        assert (await broker.expect(ev.Seen)).seq == 0
        assert checks == [ack.raw]  # the forwarded one is checked
        h.log.add(records.packet_entry(head.header.raw, head.signature, NOW), records.ack_entry(ack))
        assert h.daemon.session is not None
        await h.daemon.sync(h.daemon.session)
        assert h.daemon.follower.size == 5
        assert checks == [ack.raw]  # and not again when the log shows it
        assert h.daemon.store.acks_for(pid) == {"DEU": ack.raw}
        assert h.daemon.store.alarms() == []
        nursery.cancel_scope.cancel()


async def test_connects_over_real_mutual_tls_and_pins_the_broker(
    tmp_path: Path, world: dict[str, Any], members: dict[str, Any]
) -> None:
    keyfiles.save_identity(tmp_path / "bkeys", BROKER_ID, None)
    bdir = tmp_path / "bkeys"
    server_ctx = tls.server_context(bdir / "broker.tls.crt", bdir / "broker.tls.key", [members["FRA"].bundle.cert_der])
    brokers, accepted = trio.open_memory_channel[ScriptedBroker](1)

    async def handler(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        await stream.do_handshake()
        broker = ScriptedBroker(stream, world["log"])
        await brokers.send(broker)
        await broker.run()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        home = NodeHome.create(
            tmp_path / "tlsnode", tmp_path / "keys", f"127.0.0.1:{port}", tmp_path / "broker.pub", world["log"].vkey
        )
        daemon = NodeDaemon(home, members["FRA"], random=seeded_random(b"t"), wall=lambda: NOW, poll_interval=3600)
        nursery.start_soon(daemon.connection_loop)
        broker = await accepted.receive()
        await daemon.connected_event.wait()
        await wait_for(lambda: daemon.follower.size == 3)
        assert broker.conn.hello is not None
        assert broker.conn.hello.member == "FRA"
        nursery.cancel_scope.cancel()


async def test_the_node_reconnects_after_the_broker_goes_away(world: dict[str, Any], members: dict[str, Any]) -> None:
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        first = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        await first.send(ev.Goodbye("restarting"))
        await first.stream.aclose()
        second = await h.accepted.receive()  # the daemon came back by itself, after a jittered backoff
        await wait_for(lambda: h.daemon.session is not None and h.daemon.session.stream is not first.stream)
        assert second.conn.hello is not None
        assert second.conn.hello.seen == 3
        nursery.cancel_scope.cancel()


FAR = 10**12  # a log index no test log reaches


async def _receipted_far_ahead(
    h: Harness, broker: ScriptedBroker, members: dict[str, Any], seed: bytes, created: int
) -> bytes:
    """FRA's node sends a packet (queued at `created` by its own clock) and the broker receipts it at index FAR,
    dated NOW by the broker's clock; returns the receipt."""
    data = seal(members["FRA"], [members["DEU"]], seed, size=10)
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    await wait_for(lambda: h.daemon.follower.size == 3)
    h.daemon.store.enqueue(head.core.packet_id, head.digest, ["DEU"], created, head.core.expires, data)
    h.daemon.wake_outbox()
    begin = await broker.expect(ev.SubmitBegin)
    while not isinstance(await broker.events.receive(), ev.SubmitEnd):
        pass
    receipt = records.Receipt.make(BROKER_ID.signing, ORIGIN, FAR, head.digest, head.core.packet_id, "FRA", NOW)
    await broker.send(ev.Receipt(begin.rid, head.core.packet_id, FAR, head.digest, receipt.raw))
    row = await h.daemon.wait_outcome(head.core.packet_id, 10)
    assert row is not None
    assert row.state == "receipted"
    return receipt.raw


async def test_a_receipt_whose_index_the_log_never_reaches_is_an_alarm(
    world: dict[str, Any], members: dict[str, Any]
) -> None:
    """The receipt promises the next checkpoint holds the entry. One for an index far beyond the tree took the
    packet out of the outbox and was never checked; checkpoints followed well after it now raise an alarm."""
    h = Harness(world, members["FRA"])
    clock = [NOW]
    h.daemon.wall = lambda: clock[0]
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        receipt = await _receipted_far_ahead(h, broker, members, b"far", NOW)
        session = h.daemon.session
        assert session is not None
        h.log.admit(members["ITA"])
        clock[0] = NOW + 60  # a minute on: checkpoints may lag, no alarm yet
        await h.daemon.sync(session)
        assert h.daemon.store.alarms() == []
        h.log.admit(members["NGA"])
        clock[0] = NOW + 3600  # an hour on, the log still short of the index: the promise was broken
        await h.daemon.sync(session)
        (alarm,) = h.daemon.store.alarms()
        assert alarm.kind == "receipt"
        assert f"promised log index {FAR}" in alarm.message
        assert alarm.evidence == receipt
        nursery.cancel_scope.cancel()


async def test_the_receipt_grace_runs_across_restarts(world: dict[str, Any], members: dict[str, Any]) -> None:
    """The grace ran from when this run first saw the receipt, so a node restarted more often than every five
    minutes never raised the alarm. The store keeps when the node had the receipt."""
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        receipt = await _receipted_far_ahead(h, broker, members, b"restarts", NOW)
        nursery.cancel_scope.cancel()
    h.daemon.store.close()

    async def alarms_of_a_run_at(wall: int) -> list[Any]:
        again = Harness(world, members["FRA"])
        again.daemon.wall = lambda: wall
        async with trio.open_nursery() as nursery:
            await start(nursery, again)
            await wait_for(lambda: again.daemon.follower.size == 3)
            session = again.daemon.session
            assert session is not None
            await again.daemon.sync(session)
            alarms = again.daemon.store.alarms()
            nursery.cancel_scope.cancel()
        again.daemon.store.close()
        return alarms

    assert await alarms_of_a_run_at(NOW + 240) == []  # each run lasts less than the grace
    alarms = await alarms_of_a_run_at(NOW + 480)  # this one starts past it
    (alarm,) = alarms
    assert alarm.kind == "receipt"
    assert f"promised log index {FAR}" in alarm.message
    assert alarm.evidence == receipt


async def test_a_node_whose_clock_is_ahead_raises_no_receipt_alarm_and_a_broken_promise_only_once(
    world: dict[str, Any], members: dict[str, Any]
) -> None:
    """A review (time semantics): the grace before the alarm ran from the receipt's `at`, the broker's clock, so a
    node 400 s fast raised it seconds after an honest receipt, and again at each checkpoint (its text named the
    seconds). The grace runs on the node's own clock, from when it first saw the receipt."""
    h = Harness(world, members["FRA"])
    clock = [NOW + 400]  # the broker's clock says NOW
    h.daemon.wall = lambda: clock[0]
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await _receipted_far_ahead(h, broker, members, b"fast", NOW - 400)
        session = h.daemon.session
        assert session is not None
        for member in ("ITA", "NGA"):  # two checkpoints within seconds of the receipt, by the node's clock
            h.log.admit(members[member])
            clock[0] += 1
            await h.daemon.sync(session)
        assert h.daemon.store.alarms() == []
        for member in ("ACME", "BEL", "CHE"):  # well past the grace: the promise was broken, said once
            h.log.admit(members.get(member) or identity.generate(member, seeded_random(member.encode()), NOW))
            clock[0] += 400
            await h.daemon.sync(session)
        (alarm,) = h.daemon.store.alarms()
        assert alarm.kind == "receipt"
        assert f"promised log index {FAR}" in alarm.message
        nursery.cancel_scope.cancel()


async def test_a_request_the_broker_leaves_unanswered_ends_the_connection(
    world: dict[str, Any], members: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker keeps the connection (it would answer pings) but not a request: the caller is not held for good;
    the node gives the connection up and reconnects (specs/wire.md, "Timeouts"; shortened here)."""
    monkeypatch.setattr(liveness, "STALL", 0.3)
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        first = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        session = h.daemon.session
        assert session is not None
        with pytest.raises(Disconnected, match="left get-consistency unanswered"), trio.fail_after(10):
            await session.request(lambda rid: ev.GetConsistency(rid, 1, 3))
        assert isinstance(await first.expect(ev.GetConsistency), ev.GetConsistency)
        second = await h.accepted.receive()  # it came back by itself
        assert second is not first
        assert h.daemon.last_error is not None
        assert "unanswered" in h.daemon.last_error
        nursery.cancel_scope.cancel()


async def test_a_backlog_is_sent_with_several_packets_in_flight(world: dict[str, Any], members: dict[str, Any]) -> None:
    """The node does not wait for each answer before the next upload: the scripted broker sees all three
    submissions before it answers any (it would wait forever for the second if the node waited)."""
    h = Harness(world, members["FRA"])
    packets = [seal(members["FRA"], [members["DEU"]], b"q%d" % i, size=1000) for i in range(3)]
    heads = [packet.parse_head(d) for d in packets]
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        for data, head in zip(packets, heads, strict=True):
            assert isinstance(head, packet.Head)
            h.daemon.store.enqueue(head.core.packet_id, head.digest, ["DEU"], NOW, head.core.expires, data)
        h.daemon.wake_outbox()
        begins = []
        with trio.fail_after(10):
            while len(begins) < 3:
                msg = await broker.events.receive()
                if isinstance(msg, ev.SubmitBegin):
                    begins.append(msg)
                elif isinstance(msg, ev.SubmitChunk):
                    await broker.send(ev.Credit(len(msg.data)))
        for begin, head in zip(begins, heads, strict=True):
            assert isinstance(head, packet.Head)
            await broker.send(ev.Deny(begin.rid, head.core.packet_id, (ev.DenyReason("DEU", "not today"),)))
        for head in heads:
            assert isinstance(head, packet.Head)
            row = await h.daemon.wait_outcome(head.core.packet_id, 10)
            assert row is not None
            assert row.state == "denied"
        nursery.cancel_scope.cancel()


async def test_a_cosigning_request_overtaken_while_it_waits_for_the_log_is_no_fork(
    world: dict[str, Any], members: dict[str, Any]
) -> None:
    """The request for N passes the witness's first size check; while it waits for the log lock, the poller
    follows N+1. That was a fork alarm (following a tree smaller than the verified one), raised on an honest log
    after reconnections by the crash review; now it is refused as overtaken, with no alarm."""
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        note4 = h.log.admit(members["ITA"])
        proof_3_4 = h.log.service.consistency_proof(3)
        note5 = h.log.admit(members["NGA"])
        async with h.daemon._sync_lock:  # the poller is following
            await broker.send(ev.CosignRequest(9, 3, tuple(proof_3_4), note4))
            await trio.testing.wait_all_tasks_blocked()  # the request has passed the first check, waits for the lock
            update = h.daemon.follower.begin(note5)
            assert update is not None
            while (want := update.wanted()) is not None:
                items, hashed, levels = h.log.page(*want, "FRA")
                update.add(want[0], items, hashed, levels)
            h.daemon._persist(h.daemon.follower.commit(update))
        await _answer_consistency(broker, h)
        err = await broker.expect(ev.ErrorMessage)
        assert (err.rid, err.code) == (9, "conflict")
        assert "older than the verified size 5" in err.message
        assert h.daemon.store.alarms() == []
        nursery.cancel_scope.cancel()


async def test_a_request_in_flight_when_the_connection_ends_fails_at_once(
    world: dict[str, Any], members: dict[str, Any]
) -> None:
    """A control client waiting for the broker's answer (`valise retract`, say) was held for the full 60 s stall
    timeout after the connection dropped, though the node reconnected within a second."""
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        session = h.daemon.session
        assert session is not None
        outcome: list[BaseException] = []

        async def ask() -> None:
            try:
                await session.request(lambda rid: ev.GetInclusion(rid, 0, 1))
            except Disconnected as exc:
                outcome.append(exc)

        with trio.fail_after(10):  # a safety net against a hang, not a timed assertion
            async with trio.open_nursery() as asking:
                asking.start_soon(ask)
                await broker.expect(ev.GetInclusion)  # sent, never answered
                await broker.stream.aclose()
        (lost,) = outcome
        assert "the connection to broker" in str(lost)
        nursery.cancel_scope.cancel()
