"""The broker daemon end to end: real TLS on 127.0.0.1, real SQLite, real packets, the real wire protocol."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from valise import encoding, packet, records
from valise.broker import daemon, session
from valise.broker.daemon import BrokerDaemon
from valise.broker.mailbox import Mailboxes, MailItem
from valise.policy import records as prec
from valise.store.sqlite import SqliteLog
from valise.tlog import merkle
from valise.wire import codes
from valise.wire import events as ev
from valise.wire.limits import DEFAULT_LIMITS

from .harness import ORIGIN, WireClient, World, make_world, running_broker, seal


def _head(data: bytes) -> packet.Head:
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return head


def _world(tmp_path: Path) -> World:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware", "phishing"])
    world.consent("FRA", "ITA", "AMBER", None)
    return world


async def test_submit_deliver_ack_round_trip(tmp_path: Path) -> None:
    world = _world(tmp_path)
    payload = b"indicator " * 20000  # several chunks
    data = seal(world, "FRA", ["DEU", "ITA"], payload)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        answer = await fra.submit(data)
        assert isinstance(answer, ev.Receipt), answer
        receipt = records.Receipt.verified(answer.receipt, world.home.broker_identity().bundle.sign_key)
        assert (receipt.index, receipt.digest, receipt.sender) == (answer.index, answer.digest, "FRA")
        # The log holds the sender's signed header at the receipt's index.
        with SqliteLog.open(world.home.db_path) as store:
            kind, entry = records.entry_type(store.entries(answer.index, answer.index + 1)[0])
        assert kind == "pkt"
        head = packet.parse_head(data)
        assert isinstance(head, packet.Head)
        assert entry["header"] == head.header.raw

        async with WireClient.connect(world, "DEU", broker.port) as deu:
            seq, got = await deu.receive_delivery()
            assert got == data  # relayed byte for byte
            out = io.BytesIO()
            packet.open(
                io.BytesIO(got), out, me=world.members["DEU"], sender=world.members["FRA"].bundle, now=int(time.time())
            )
            assert out.getvalue() == payload
            ack = records.Ack.make(
                world.members["DEU"].signing, head.core.packet_id, head.digest, "FRA", "DEU", int(time.time())
            )
            await deu.send(ev.Ack(seq, head.core.packet_id, ack.raw))
            forwarded = await fra.next_of(ev.AckForward)
            assert isinstance(forwarded, ev.AckForward)
            assert forwarded.by == "DEU"
            assert records.Ack.verified(forwarded.ack, world.members["DEU"].bundle.sign_key).digest == head.digest
            await fra.send(ev.Seen(forwarded.seq))

            # The same packet again (a sender whose receipt was lost): the same receipt, no second log entry.
            again = await fra.submit(data)
            assert isinstance(again, ev.Receipt)
            assert again.index == answer.index

            # A checkpoint covering the packet comes with a verifiable inclusion proof.
            await trio.sleep(0.5)
            rid = fra.conn.new_rid()
            await fra.send(ev.GetCheckpoint(rid))
            cp = await fra.next_of(ev.Checkpoint)
            assert isinstance(cp, ev.Checkpoint)
            size = int(cp.checkpoint.split(b"\n")[1])
            assert size > answer.index
            rid = fra.conn.new_rid()
            await fra.send(ev.GetInclusion(rid, answer.index, size))
            proof = await fra.next_of(ev.Inclusion)
            assert isinstance(proof, ev.Inclusion)
            with SqliteLog.open(world.home.db_path) as store:
                leaf = merkle.hash_leaf(store.entries(answer.index, answer.index + 1)[0])
                root = merkle.tree_hash(size, store)
            merkle.verify_inclusion(leaf, answer.index, size, list(proof.proof), root)

    # ITA never connected: its copy is still queued, durably, after the broker stopped.

    mail = Mailboxes.open(world.home.root / "mailbox.db")
    assert [i.kind for i in mail.pending("ITA")] == ["packet"]
    assert mail.pending("DEU") == []


async def test_refusals_each_have_their_code(tmp_path: Path) -> None:
    world = _world(tmp_path)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        # No consent FRA -> DEU for 'fraud': denied whole, with the reason.
        denied = await fra.submit(seal(world, "FRA", ["DEU"], b"x", categories=("fraud",)))
        assert isinstance(denied, ev.Deny)
        assert [r.to for r in denied.reasons] == ["DEU"]
        assert "fraud" in denied.reasons[0].reason
        # A packet signed by DEU, submitted on FRA's connection.
        wrong = await fra.submit(seal(world, "DEU", ["FRA"], b"x"))
        assert isinstance(wrong, ev.ErrorMessage)
        assert wrong.code == codes.SENDER_MISMATCH
        # A flipped byte in the signature, then one inside the header's core.
        data = seal(world, "FRA", ["DEU"], b"x")
        head = packet.parse_head(data)
        assert isinstance(head, packet.Head)
        forged = bytearray(data)
        forged[head.head_size - 1] ^= 1
        bad = await fra.submit(bytes(forged))
        assert isinstance(bad, ev.ErrorMessage)
        assert bad.code == codes.BAD_SIGNATURE
        forged = bytearray(data)
        forged[data.index(b"malware")] ^= 0x20  # 'Malware': still parses as text, no longer the signed bytes
        bad = await fra.submit(bytes(forged))
        assert isinstance(bad, ev.ErrorMessage)
        assert bad.code in (codes.BAD_SIGNATURE, codes.BAD_PACKET)
        # Same packet id, different packet: a replay.
        first = await fra.submit(seal(world, "FRA", ["DEU"], b"one", packet_id=b"fixed"))
        assert isinstance(first, ev.Receipt)
        replay = await fra.submit(seal(world, "FRA", ["DEU"], b"two", packet_id=b"fixed"))
        assert isinstance(replay, ev.ErrorMessage)
        assert replay.code == codes.REPLAY
        # Tampered ciphertext: the broker cannot decrypt but holds the sender to the signed hash.
        data = bytearray(seal(world, "FRA", ["DEU"], b"y" * 1000))
        data[-5] ^= 1
        mismatch = await fra.submit(bytes(data))
        assert isinstance(mismatch, ev.ErrorMessage)
        assert mismatch.code == codes.HASH_MISMATCH
        # The connection still works after all of that.
        ok = await fra.submit(seal(world, "FRA", ["DEU"], b"fine"))
        assert isinstance(ok, ev.Receipt)


async def test_hello_for_another_member_is_refused(tmp_path: Path) -> None:
    world = _world(tmp_path)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port, hello=False) as fra:
        await fra.send(ev.Hello((1,), "DEU", "node", 0, fra.conn.limits))
        err = await fra.next()
        assert isinstance(err, ev.ErrorMessage)
        assert err.code == codes.UNAUTHENTICATED


async def test_a_peer_that_vanishes_mid_session_does_not_stop_the_broker(tmp_path: Path) -> None:
    """A node killed without closing TLS (a TCP reset) ends its own session only."""
    import socket
    import struct

    world = _world(tmp_path)
    async with running_broker(world) as broker:
        for _ in range(3):
            async with WireClient.connect(world, "DEU", broker.port) as deu:
                # Start an upload, then vanish: RST instead of a TLS close_notify.
                data = seal(world, "DEU", ["FRA"], b"z" * 300_000)
                head = packet.parse_head(data)
                assert isinstance(head, packet.Head)
                await deu.send(ev.SubmitBegin(0, data[: head.head_size], len(data) - head.head_size))
                await deu.send(ev.SubmitChunk(0, data[head.head_size : head.head_size + 1000]))
                raw = deu.stream.transport_stream.socket
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                raw.close()
        await trio.sleep(0.2)
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            ok = await fra.submit(seal(world, "FRA", ["DEU"], b"still serving"))
            assert isinstance(ok, ev.Receipt)
    assert not list((world.home.root / "spool").glob("*.part")), "a cut upload left its temporary file"


async def _relay_short_lived(world: World, broker: BrokerDaemon, expires: int) -> tuple[packet.Head, ev.Receipt]:
    """FRA sends DEU a packet that expires at `expires`; its head and receipt."""
    data = seal(world, "FRA", ["DEU"], b"short-lived", expires=expires)
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    async with WireClient.connect(world, "FRA", broker.port) as fra:
        receipt = await fra.submit(data)
        assert isinstance(receipt, ev.Receipt)
    return head, receipt


def _purges_after(world: World, index: int) -> list[dict[str, object]]:
    with SqliteLog.open(world.home.db_path) as store:
        kinds = [records.entry_type(e) for e in store.entries(index + 1, store.size())]
    return [m for kind, m in kinds if kind == "purge"]


async def test_undelivered_packets_are_purged_at_expiry_and_the_purge_is_logged(tmp_path: Path) -> None:
    world = _world(tmp_path)
    async with running_broker(world, purge_interval=0.2) as broker:
        head, receipt = await _relay_short_lived(world, broker, int(time.time()) + 2)
        with trio.fail_after(10):
            while broker.mail.pending("DEU"):  # noqa: ASYNC110 - polls a table the purger task writes
                await trio.sleep(0.1)
        # DEU connects after expiry: nothing is pushed to it (a cosign request may come; it is no delivery).
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            with trio.move_on_after(0.5):
                while True:
                    event = await deu.next()
                    assert not isinstance(event, ev.DeliverBegin), "an expired packet was still pushed"
    purges = _purges_after(world, receipt.index)
    assert [(m["digest"], m["recipient"]) for m in purges] == [(head.digest, "DEU")]
    # With a random nonce: a co-recipient that knows the digest cannot rebuild the entry (its `at` is within
    # seconds of the expiry) and find it among the public leaf hashes (a hostile-member review did).
    (purge,) = purges
    assert len(purge["nonce"]) == 16
    rebuilt = records.purge_entry(head.digest, "DEU", purge["at"])
    with SqliteLog.open(world.home.db_path) as store:
        assert rebuilt not in store.entries(receipt.index + 1, store.size())
    assert not (world.home.root / "spool" / f"{head.digest.hex()}.pkt").exists()

    assert Mailboxes.open(world.home.root / "mailbox.db").body(head.digest) is None  # the small body went too


async def test_a_packet_that_expired_and_waits_for_the_purger_is_not_pushed(tmp_path: Path) -> None:
    """A review (time semantics): between a packet's expiry and the purger's next sweep, a recipient that connected
    was pushed it, and its node refused it with an alarm. Here the purger does not run; the first packet expires
    while DEU is away, the second does not: DEU is pushed only the second."""
    world = _world(tmp_path)
    expires = int(time.time()) + 60
    async with running_broker(world, purge_interval=3600) as broker:
        expired, _ = await _relay_short_lived(world, broker, expires)
        later, _ = await _relay_short_lived(world, broker, expires + 3600)
        assert [i.digest for i in broker.mail.pending("DEU")] == [expired.digest, later.digest]
        broker.now = lambda: expires  # type: ignore[method-assign]
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            _, data = await deu.receive_delivery()
        head = packet.parse_head(data)
        assert isinstance(head, packet.Head)
        assert head.digest == later.digest
        assert broker.mail.pending("DEU")[0].digest == expired.digest  # left to the purger


async def test_a_purge_is_never_dated_before_its_packet_expires_even_if_the_clock_steps_back(
    tmp_path: Path,
) -> None:
    """Purges are dated when appended (a long sweep runs alongside new packets); if the clock stepped back after
    the packet was picked as expired, that date fell before the expiry, and an auditor named it purge-early."""
    world = _world(tmp_path)
    expires = int(time.time()) + 60
    async with running_broker(world, purge_interval=3600) as broker:
        _, receipt = await _relay_short_lived(world, broker, expires)
        clock = iter([expires + 5, expires - 30])  # picked as expired; then NTP steps the clock back 35 s
        broker.now = lambda: next(clock)  # type: ignore[method-assign]
        await broker.purge_expired()
    (purge,) = _purges_after(world, receipt.index)
    assert purge["at"] >= expires


async def test_a_witness_that_connects_is_asked_to_cosign_the_current_checkpoint(tmp_path: Path) -> None:
    """On a quiet log no new checkpoint comes, so a connecting witness is asked about the current one."""
    from valise.tlog import checkpoint, cosignature

    world = _world(tmp_path)
    async with running_broker(world) as broker, WireClient.connect(world, "DEU", broker.port) as deu:
        request = await deu.next_of(ev.CosignRequest)
        assert isinstance(request, ev.CosignRequest)
        assert request.old == 0  # the size our hello said we verified
        vkey = broker.log.verifier
        cp, _ = checkpoint.open_checkpoint(request.checkpoint, vkey)
        checkpoint.check_newer(checkpoint.Checkpoint(cp.origin, 0, merkle.EMPTY_ROOT), cp, list(request.proof))
        line = cosignature.Cosigner("DEU", world.members["DEU"].signing).cosign(cp, int(time.time())).line()
        await deu.send(ev.CosignResponse(request.rid, line.encode()))
        with trio.fail_after(5):
            while b"\n\xe2\x80\x94 DEU " not in broker.published:  # noqa: ASYNC110 - a value the session sets
                await trio.sleep(0.02)
        witness = cosignature.CosignatureVerifier("DEU", world.members["DEU"].bundle.sign_key)
        checkpoint.open_checkpoint(broker.published, vkey, witnesses=[witness], quorum=1)


@asynccontextmanager
async def _witnessed(world: World) -> AsyncIterator[tuple[BrokerDaemon, WireClient, trio.Nursery]]:
    """A running broker with DEU and ITA connected as witnesses (cosigning every checkpoint), and FRA to send."""
    async with (
        running_broker(world) as broker,
        WireClient.connect(world, "DEU", broker.port) as deu,
        WireClient.connect(world, "ITA", broker.port) as ita,
        WireClient.connect(world, "FRA", broker.port) as fra,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_witness, world, broker, deu)
        nursery.start_soon(_witness, world, broker, ita)
        yield broker, fra, nursery


async def _witness(world: World, broker: BrokerDaemon, client: WireClient) -> None:
    """Cosign every checkpoint the broker asks about, as an honest witness does."""
    from valise.tlog import checkpoint, cosignature

    cosigner = cosignature.Cosigner(client.member, world.members[client.member].signing)
    while True:
        event = await client.next(within=30)
        if isinstance(event, ev.CosignRequest):
            cp, _ = checkpoint.open_checkpoint(event.checkpoint, broker.log.verifier)
            await client.send(ev.CosignResponse(event.rid, cosigner.cosign(cp, int(time.time())).line().encode()))


async def test_witnesses_asked_in_waves_all_cosign_the_new_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round asks its witnesses a wave at a time (here one per wave): every one of them is still asked, and the
    published note carries all their cosignatures."""
    from valise.broker import cosign
    from valise.tlog import checkpoint, cosignature

    monkeypatch.setattr(cosign, "COSIGN_WAVE", 1)
    world = _world(tmp_path)

    async with _witnessed(world) as (broker, fra, nursery):
        receipt = await fra.submit(seal(world, "FRA", ["DEU"], b"indicator"))
        assert isinstance(receipt, ev.Receipt)
        nursery.start_soon(_witness, world, broker, fra)
        verifiers = [
            cosignature.CosignatureVerifier(m, world.members[m].bundle.sign_key) for m in ("DEU", "FRA", "ITA")
        ]
        with trio.fail_after(10):
            while True:
                cp, _ = checkpoint.open_checkpoint(broker.published, broker.log.verifier)
                names = [f"\u2014 {m} ".encode() for m in ("DEU", "FRA", "ITA")]
                if cp.size > receipt.index and all(n in broker.published for n in names):
                    break
                await trio.sleep(0.05)
        checkpoint.open_checkpoint(broker.published, broker.log.verifier, witnesses=verifiers, quorum=3)
        nursery.cancel_scope.cancel()


def test_a_published_checkpoint_carries_at_most_the_note_signature_limit() -> None:
    """196 members may all witness; a note carries at most 100 signature lines (sumdb/note), so the broker keeps
    the log's own and 99 cosignatures instead of failing to publish (which once stopped its checkpoints)."""
    from valise.broker.daemon import BrokerDaemon
    from valise.crypto import sign
    from valise.crypto.seeded import seeded_random
    from valise.tlog import checkpoint, cosignature, note

    rnd = seeded_random(b"witnesses")
    signer = note.Ed25519Signer("test.valise/log", sign.SigningKey(rnd(32)))
    cp = checkpoint.Checkpoint("test.valise/log", 5, merkle.hash_leaf(b"x"))
    signed = checkpoint.sign_checkpoint(cp, signer)
    witnesses = [cosignature.Cosigner(f"W{i:03d}", sign.SigningKey(rnd(32))) for i in range(150)]
    cosigs = [w.cosign(cp, 1_790_000_000) for w in witnesses]
    published = BrokerDaemon._with_cosignatures(signed, cosigs)
    assert len(note.parse_note(published).signatures) == note.MAX_SIGNATURES
    verifiers = [w.verifier() for w in witnesses[:99]]
    checkpoint.open_checkpoint(published, signer.verifier(), witnesses=verifiers, quorum=99)


def test_with_more_witnesses_than_a_note_carries_they_take_turns() -> None:
    """196 witnesses, 99 cosignature lines: each checkpoint asks 99 (no more: the rest would be wasted work on both
    sides), a different window each time, and two turns reach every witness."""
    from valise.broker.cosign import pick_witnesses

    names = [f"N{i:03d}" for i in range(196)]
    first, second = pick_witnesses(names, 0, 99), pick_witnesses(names, 1, 99)
    assert len(first) == len(second) == 99
    assert len(set(first)) == len(set(second)) == 99
    assert set(first) | set(second) == set(names)
    assert pick_witnesses(names, 2, 99) != first  # the window goes on moving (196 is not a multiple of 99)
    assert pick_witnesses(list(reversed(names[:5])), 7, 99) == names[:5]  # few enough: all of them, every time
    assert pick_witnesses(names, 3, 0) == []


def test_a_cosigning_round_is_spread_out_but_done_within_half_a_checkpoint_interval() -> None:
    """99 witnesses at once made a backlog that set the broker's p99 (docs/benchmarks.md, round 6): a round goes
    out in waves COSIGN_PACE apart, except that all its waves must be asked within half the checkpoint interval,
    or the next checkpoint replaces the note before its cosignatures can be added."""
    from valise.broker.cosign import COSIGN_PACE, COSIGN_WAVE, wave_pace

    assert wave_pace(99, 1.0) == COSIGN_PACE  # the benchmark's case: ten waves over ~0.4 s
    assert COSIGN_PACE * 9 <= 0.5
    assert wave_pace(COSIGN_WAVE, 1.0) == 0.0  # one wave: nothing to wait for
    assert wave_pace(0, 1.0) == 0.0
    for witnesses in (COSIGN_WAVE + 1, 50, 99):
        for interval in (0.05, 0.2, 1.0, 30.0):
            waves = -(-witnesses // COSIGN_WAVE)
            pace = wave_pace(witnesses, interval)
            assert 0 < pace <= COSIGN_PACE
            assert (waves - 1) * pace <= interval / 2 + 1e-12
    assert wave_pace(99, 0.2) < COSIGN_PACE  # tests run with short intervals: the cap applies


async def test_a_packet_logged_before_a_crash_is_queued_at_its_index_when_resubmitted(tmp_path: Path) -> None:
    """A crash between the log append and the mailbox commit loses a small packet's body, not the packet: the
    sender (who got no receipt) resubmits, and the broker queues it at the index already logged, adding nothing."""
    world = _world(tmp_path)
    Mailboxes.open(world.home.mailbox_path).close()  # as a broker that served before it crashed left it
    data = seal(world, "FRA", ["DEU"], b"logged, then the broker died")
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    with SqliteLog.open(world.home.db_path) as store:  # what the committer had made durable before the crash
        index = store.append([records.packet_entry(head.header.raw, head.signature, int(time.time()))])
        size = store.size()
    async with running_broker(world) as broker:
        assert broker.orphans[("FRA", head.core.packet_id)][0] == index
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            receipt = await fra.submit(data)
            assert isinstance(receipt, ev.Receipt)
            assert receipt.index == index
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            _, got = await deu.receive_delivery()
            assert got == data
    with SqliteLog.open(world.home.db_path) as store:
        kinds = [records.entry_type(e)[0] for e in store.entries(size, store.size())]
    assert "pkt" not in kinds  # nothing was logged twice


async def test_pipelined_submissions_share_batches_and_the_same_packet_twice_is_logged_once(tmp_path: Path) -> None:
    """The reader does not wait for each commit: 16 submissions in flight land in a few batches, and a packet
    submitted twice while its first copy is still committing gets one log entry and two equal receipts."""
    world = _world(tmp_path)
    packets = [seal(world, "FRA", ["DEU"], b"p%d" % i) for i in range(15)]
    async with (
        running_broker(world, flush_interval=0.05) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        rids = []
        for data in [*packets, packets[0]]:
            rids.append(await fra.submit_frames(data))
        receipts: dict[int, ev.Receipt] = {}
        while len(receipts) < len(rids):
            event = await fra.next()
            if isinstance(event, ev.Receipt):
                receipts[event.rid] = event
        # Waiting for each commit before reading the next submission would take one batch per packet.
        assert broker.batches <= 5, broker.batches
    indexes = [receipts[r].index for r in rids]
    assert indexes[-1] == indexes[0]  # the duplicate got the first copy's index
    assert len(set(indexes)) == 15
    with SqliteLog.open(world.home.db_path) as store:
        kinds = [records.entry_type(e)[0] for e in store.entries(min(indexes), store.size())]
    assert kinds.count("pkt") == 15


async def test_the_sender_gets_every_recipients_acknowledgement(tmp_path: Path) -> None:
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU", "ITA"], b"to two desks")
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        assert isinstance(await fra.submit(data), ev.Receipt)
        for member in ("DEU", "ITA"):
            async with WireClient.connect(world, member, broker.port) as rcpt:
                seq, _ = await rcpt.receive_delivery()
                ack = records.Ack.make(
                    world.members[member].signing, head.core.packet_id, head.digest, "FRA", member, int(time.time())
                )
                await rcpt.send(ev.Ack(seq, head.core.packet_id, ack.raw))
                await rcpt.send(ev.Ping(1))
                await rcpt.next_of(ev.Pong)  # the ack was read before we leave
        by = set()
        for _ in range(2):
            forwarded = await fra.next_of(ev.AckForward)
            assert isinstance(forwarded, ev.AckForward)
            by.add(forwarded.by)
        assert by == {"DEU", "ITA"}


async def test_an_acknowledgement_queued_in_the_older_record_form_is_still_forwarded(tmp_path: Path) -> None:
    """Mailbox records of forwarded acks now carry the packet id and recipient beside the signed ack; one queued
    by an older broker (the ack alone) must still reach its sender with the right fields."""
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"before the upgrade")
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    ack = records.Ack.make(world.members["DEU"].signing, head.core.packet_id, head.digest, "FRA", "DEU", 1)
    async with running_broker(world) as broker:
        broker.mail.post("FRA", "ack", hashlib.sha256(ack.raw).digest(), encoding.pack({"index": 7, "notice": ack.raw}))
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            fra.refuse_cosign = True
            forwarded = await fra.next_of(ev.AckForward)
            assert isinstance(forwarded, ev.AckForward)
            assert (forwarded.id, forwarded.by, forwarded.index, forwarded.ack) == (
                head.core.packet_id, "DEU", 7, ack.raw,
            )  # fmt: skip


async def test_policy_that_changes_while_a_packet_streams_in_is_applied_at_its_end(tmp_path: Path) -> None:
    """The broker decides at submit-begin and again at submit-end: a ban that lands in between denies the packet."""
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"indicator " * 20000, categories=("malware",))
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    async with (
        running_broker(world, policy_poll=0.05) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        rid = fra.conn.new_rid()
        await fra.send(ev.SubmitBegin(rid, data[: head.head_size], len(data) - head.head_size))
        await fra.send(ev.SubmitChunk(rid, data[head.head_size : head.head_size + 1000]))
        await fra.send(ev.Ping(1))
        await fra.next_of(ev.Pong)  # frames are handled in order: the broker has admitted the packet by now
        world.rule("ban-category", category="malware")
        with trio.fail_after(10):
            while "malware" not in broker.policy.banned:  # noqa: ASYNC110 - polling the daemon's own state
                await trio.sleep(0.02)
        pos = head.head_size + 1000
        while pos < len(data):
            while fra.conn.send_window == 0:
                await fra.next_of(ev.Credit)
            n = min(fra.conn.send_window, 16384, len(data) - pos)
            await fra.send(ev.SubmitChunk(rid, data[pos : pos + n]))
            pos += n
        await fra.send(ev.SubmitEnd(rid))
        answer = await fra.next_of(ev.Deny)
        assert isinstance(answer, ev.Deny)
        assert answer.id == head.core.packet_id
        assert [r.to for r in answer.reasons] == ["DEU"]
        assert "malware" in answer.reasons[0].reason


async def test_packets_larger_than_the_window_reach_a_member_that_grants_credit_at_half_window(tmp_path: Path) -> None:
    """The broker waits for credit mid-delivery; a member's credit can arrive while the broker is still writing,
    and must not be missed (the delivery would stall for good)."""
    world = _world(tmp_path)
    # Sizes that are no multiple of the chunk: the window runs out mid-chunk, when the broker has a partial chunk
    # queued and must write it out before it can wait for the credit that writing it will bring.
    payloads = [bytes([i]) * 1_000_000 for i in range(4)] + [bytes([9]) * (3 * 1024 * 1024)]
    sealed = [seal(world, "FRA", ["DEU"], p) for p in payloads]
    async with (
        running_broker(world) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
        WireClient.connect(world, "DEU", broker.port) as deu,
    ):
        for data in sealed:
            assert isinstance(await fra.submit(data), ev.Receipt)
        window = deu.conn.limits.window
        for data in sealed:
            begin = await deu.next_of(ev.DeliverBegin, within=20)
            assert isinstance(begin, ev.DeliverBegin)
            got = bytearray(begin.head)
            while True:
                event = await deu.next(within=20)
                if isinstance(event, ev.DeliverChunk):
                    got += event.data
                    if deu.conn.receive_window <= window // 2:  # as a node grants: half a window at a time
                        await deu.send(ev.Credit(window - deu.conn.receive_window))
                elif isinstance(event, ev.DeliverEnd):
                    break
            assert bytes(got) == data
            head = packet.parse_head(data)
            assert isinstance(head, packet.Head)
            ack = records.Ack.make(
                world.members["DEU"].signing, head.core.packet_id, head.digest, "FRA", "DEU", int(time.time())
            )
            await deu.send(ev.Ack(begin.seq, head.core.packet_id, ack.raw))


async def test_a_refused_delivery_frees_its_push_slot_and_stays_in_the_mailbox(tmp_path: Path) -> None:
    """A member that refuses an item (wire.md rule 13) gets the next one on the same connection, even with a
    single push slot; the refused item is pushed again on its next connection."""
    import dataclasses

    from valise.wire import SUPPORTED_VERSIONS
    from valise.wire.connection import Connection
    from valise.wire.state import Role

    world = _world(tmp_path)
    first, second = (seal(world, "FRA", ["DEU"], p) for p in (b"refused at first", b"taken"))
    async with running_broker(world) as broker:
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            for data in (first, second):
                assert isinstance(await fra.submit(data), ev.Receipt)
        async with WireClient.connect(world, "DEU", broker.port, hello=False) as deu:
            deu.conn = Connection(Role.CLIENT, dataclasses.replace(deu.conn.limits, pushes=1))
            await deu.send(ev.Hello(SUPPORTED_VERSIONS, "DEU", "node", 0, deu.conn.limits))
            assert isinstance(await deu.next(), ev.Welcome)
            seq, data = await deu.receive_delivery()
            assert data == first
            await deu.send(ev.Refuse(seq, codes.BAD_SIGNATURE, "a test that says no"))
            seq2, data = await deu.receive_delivery()  # the slot is free again: the next item comes
            assert seq2 > seq
            assert data == second
            await deu.send(ev.Ack(seq2, *_ack_fields(world, data)))
            await deu.sync()
        assert broker.refusals == 1
        digest = hashlib.sha256(packet.parse_head(first).header.raw).digest()  # type: ignore[union-attr]
        assert broker.mail.has_item("DEU", "packet", digest)
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            _, data = await deu.receive_delivery()
            assert data == first


def _ack_fields(world: World, data: bytes) -> tuple[bytes, bytes]:
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    core = head.core
    ack = records.Ack.make(
        world.members["DEU"].signing, core.packet_id, head.digest, core.sender, "DEU", int(time.time())
    )
    return core.packet_id, ack.raw


async def _follow(client: WireClient, size: int) -> tuple[bytes, list[int], int]:
    """Fetch entries [0, size) as a node does; return the root they give, the indexes served in full, and how
    many items came."""
    r = merkle.CompactRange()
    full: list[int] = []
    items = 0
    while r.size < size:
        await client.send(ev.GetEntries(client.conn.new_rid(), r.size, size))
        answer = await client.next_of(ev.Entries)
        assert isinstance(answer, ev.Entries)
        assert answer.start == r.size
        spans = dict(zip(answer.hashed, answer.levels, strict=True))
        for i, item in enumerate(answer.entries):
            if i in spans:
                r.append_subtree(item, spans[i])
            else:
                full.append(r.size)
                r.append(merkle.hash_leaf(item))
        items += len(answer.entries)
    return r.root(), full, items


async def test_a_member_follows_the_log_at_the_cost_of_what_it_may_read(tmp_path: Path) -> None:
    """Runs of other members' traffic come as a few stored subtree hashes, not one hash per entry: a broker that
    parsed and hashed every entry for every member could not serve 196 following nodes (protocol.md, "Reading
    the log"). What the member may read comes in full, including a record an operator command appended while
    the broker ran, and the items still give the checkpoint's root."""
    from valise.broker.readers import EVERYONE, readers_of

    world = _world(tmp_path)
    async with running_broker(world, checkpoint_interval=3600) as broker:
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            for i in range(120):
                to = ["DEU"] if i == 60 else ["ITA"]
                assert isinstance(await fra.submit(seal(world, "FRA", to, b"%d" % i)), ev.Receipt)
        world.operator("group-create", name="europe", kind="region", start=None, end=None)  # as the CLI, another writer
        await wait_for_fold(broker)
        await broker.publish_checkpoint()
        size = broker.log.latest.size  # type: ignore[union-attr]
        entries = broker.store.entries(0, size)
        mine = [i for i, e in enumerate(entries) if {"DEU", EVERYONE} & set(readers_of(e, lambda _: None))]
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            root, full, items = await _follow(deu, size)
        assert root == broker.log.latest.root  # type: ignore[union-attr]
        assert full == mine
        assert len(mine) < 12  # genesis, three admissions, two consents, DEU's packet, the group
        assert items < len(mine) + 2 * 8 * 3  # a few subtrees per run of ITA's traffic, not 119 leaf hashes
    # A broker directory from before readers were recorded (or a crash before the batch's mailbox commit): the
    # broker records them from the log when it starts.
    with sqlite3.connect(world.home.root / "mailbox.db") as db:
        db.execute("DELETE FROM readers")
        db.execute("DELETE FROM meta")
    async with (
        running_broker(world, checkpoint_interval=3600) as broker,
        WireClient.connect(world, "DEU", broker.port) as deu,
    ):
        deu.refuse_cosign = True
        assert await _follow(deu, size) == (root, full, items)


async def wait_for_fold(broker: BrokerDaemon) -> None:
    with trio.fail_after(10):
        while broker.policy.size < broker.store.size():  # noqa: ASYNC110 - the broker folds on its own poll
            await trio.sleep(0.02)


async def test_a_log_export_carries_the_witnesses_cosignatures(tmp_path: Path) -> None:
    """The store keeps the log's signature only, so an export's checkpoint had no cosignatures and an offline
    audit with a witness quorum refused it (the README's own flow, found by the fresh-user review)."""
    from valise.cli.main import main as cli
    from valise.tlog import checkpoint, cosignature

    world = _world(tmp_path)

    async with _witnessed(world) as (broker, fra, nursery):
        assert isinstance(await fra.submit(seal(world, "FRA", ["DEU"], b"indicator")), ev.Receipt)
        with trio.fail_after(10):
            while not all(f"\u2014 {m} ".encode() in broker.published for m in ("DEU", "ITA")):  # noqa: ASYNC110
                await trio.sleep(0.05)
        size = broker.log.latest.size  # type: ignore[union-attr]
        out = tmp_path / "export"
        assert (
            await trio.to_thread.run_sync(cli, ["log", "export", "--dir", str(world.home.root), "--out", str(out)]) == 0
        )
        nursery.cancel_scope.cancel()
    exported = (out / "checkpoint").read_bytes()
    assert checkpoint.open_checkpoint(exported, broker.log.verifier)[0].size == size
    keys = [cosignature.CosignatureVerifier(m, world.members[m].bundle.sign_key).vkey() for m in ("DEU", "ITA")]
    vkey = broker.log.verifier.vkey()
    argv = ["audit", "verify", "--log", str(out), "--broker-key", vkey, "--witness", keys[0], "--witness", keys[1]]
    assert cli([*argv, "--quorum", "2"]) == 0


async def test_a_second_connection_as_one_member_replaces_the_first_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The older connection is told `replaced` (not `shutting-down`: its node would take the broker for stopping
    and reconnect at once, taking turns with the other for ever), and the broker logs it where operators look."""
    world = _world(tmp_path)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as first:
        await first.sync()
        async with WireClient.connect(world, "FRA", broker.port) as second:
            await second.sync()
            event = await first.next()
            assert isinstance(event, ev.ErrorMessage)
            assert (event.rid, event.code) == (None, codes.REPLACED)
            assert "replaced by a newer connection of FRA" in event.message
    assert "FRA connected again: its previous connection is closed (replaced)" in caplog.text


async def test_closing_a_session_while_it_ends_is_harmless(tmp_path: Path) -> None:
    """A shutdown, or a member's new connection replacing its old one, asks a session to close at any moment,
    also while it is ending: between its reader's return and the end of its tasks its nursery takes no new task.
    That ask once raised there, and the error stopped the broker (seen as a crash on SIGTERM)."""
    world = _world(tmp_path)
    async with running_broker(world) as broker:
        for _ in range(5):
            async with WireClient.connect(world, "FRA", broker.port) as fra:
                await fra.sync()
                session = broker.sessions["FRA"]
            # The client is gone: ask the session to close at every scheduling step until it has ended.
            with trio.fail_after(10):
                while broker.sessions.get("FRA") is session:
                    session.close_soon(codes.SHUTTING_DOWN, "the broker is stopping")
                    await trio.lowlevel.checkpoint()
        async with WireClient.connect(world, "FRA", broker.port) as fra:  # the broker still serves
            await fra.sync()


async def test_a_goodbye_is_answered_in_kind_and_the_connection_closes(tmp_path: Path) -> None:
    """wire.md rule 19: a client that says goodbye gets goodbye back and a closed connection, not, as before,
    silence, then a ping it may not answer, then a timeout error 64 s later."""
    world = _world(tmp_path)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        await fra.sync()
        fra.refuse_cosign = False  # after our goodbye we may not answer anything
        await fra.send(ev.Goodbye("done"))
        with trio.fail_after(5):
            event = await fra.next()
            while not isinstance(event, ev.Goodbye):  # frames the broker sent before it read ours
                assert not isinstance(event, ev.ConnectionClosed | ev.ErrorMessage), event
                event = await fra.next()
            assert isinstance(await fra.next(), ev.ConnectionClosed)
        with trio.fail_after(5):
            while broker.sessions.get("FRA") is not None:  # noqa: ASYNC110 - the daemon's own state
                await trio.sleep(0.01)


async def test_a_tls_key_damaged_while_the_broker_runs_does_not_stop_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The TLS context is rebuilt when the directory changes; if the key file went bad meanwhile, the broker keeps
    the context it has (and says why a new member cannot connect) rather than fail."""
    world = _world(tmp_path)
    async with running_broker(world) as broker:
        key = world.home.identity_dir / "broker.tls.key"
        key.write_bytes(key.read_bytes()[:40])
        world.operator("member-suspend", id="ITA", reason="test")  # the member list changes: a new context
        with trio.fail_after(10):
            while "cannot connect until this is fixed" not in caplog.text:  # noqa: ASYNC110 - the daemon's log
                await trio.sleep(0.05)
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            fra.refuse_cosign = True
            answer = await fra.submit(seal(world, "FRA", ["DEU"], b"still relayed"))
            assert isinstance(answer, ev.Receipt), answer


async def _deliver_and_confirm(world: World, fra: WireClient, deu: WireClient, data: bytes) -> bytes:
    """DEU receives one pushed packet and acknowledges it; FRA takes the forwarded acknowledgement."""
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    seq, got = await deu.receive_delivery()
    ack = records.Ack.make(world.members["DEU"].signing, head.core.packet_id, head.digest, "FRA", "DEU", 1)
    await deu.send(ev.Ack(seq, head.core.packet_id, ack.raw))
    forwarded = await fra.next_of(ev.AckForward)
    assert isinstance(forwarded, ev.AckForward)
    await fra.send(ev.Seen(forwarded.seq))
    return got


async def test_a_member_that_has_read_its_mailbox_is_pushed_new_items_without_a_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items that commit while a member's pusher has everything before them go to it directly: a mailbox query per
    push was ~4% of the broker's CPU at 1,000 packets/s."""
    world = _world(tmp_path)
    packets = [seal(world, "FRA", ["DEU"], b"p%d" % i) for i in range(3)]
    async with (
        running_broker(world) as broker,
        WireClient.connect(world, "DEU", broker.port) as deu,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        fra.refuse_cosign = deu.refuse_cosign = True
        await deu.sync()
        await fra.sync()  # both pushers have read their (empty) mailboxes
        queries: list[str] = []
        query = broker.mail.pending

        def counted(member: str, after_seq: int = 0, limit: int = 100) -> list[MailItem]:
            queries.append(member)
            return query(member, after_seq, limit)

        monkeypatch.setattr(broker.mail, "pending", counted)
        for data in packets:
            assert isinstance(await fra.submit(data), ev.Receipt)
            assert await _deliver_and_confirm(world, fra, deu, data) == data
        assert queries == []


@pytest.mark.parametrize(("limit", "value"), [("FRESH_MAX", 2), ("FRESH_BYTES", 2000)])
async def test_items_waiting_past_the_hand_over_limit_are_pushed_from_the_store_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str, value: int
) -> None:
    """A member that confirms nothing lets items pile up; past FRESH_MAX items (or FRESH_BYTES of bodies) its
    pusher reads them from the store again, and every one still arrives, once and in order."""
    monkeypatch.setattr(session, limit, value)
    world = _world(tmp_path)
    packets = [seal(world, "FRA", ["DEU"], b"p%d" % i) for i in range(6)]
    async with (
        running_broker(world) as broker,
        WireClient.connect(world, "DEU", broker.port, limits=dataclasses.replace(DEFAULT_LIMITS, pushes=1)) as deu,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        fra.refuse_cosign = deu.refuse_cosign = True
        await deu.sync()
        for data in packets:  # one is pushed (the window), a few wait in memory, then the rest overflow
            assert isinstance(await fra.submit(data), ev.Receipt)
        assert broker.sessions["DEU"]._fresh is None  # over the limit: nothing more is held in memory for DEU
        assert [await _deliver_and_confirm(world, fra, deu, data) for data in packets] == packets


async def test_an_auditor_connection_reads_beside_the_members_node_and_is_pushed_nothing(tmp_path: Path) -> None:
    """wire.md: any certificate of the directory may connect with either role; the role only narrows what the
    connection may do. An auditor connection neither replaces the member's node nor takes its deliveries."""
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"for the node, not the script")
    async with (
        running_broker(world) as broker,
        WireClient.connect(world, "DEU", broker.port) as node,
        WireClient.connect(world, "DEU", broker.port, role="auditor") as script,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        node.refuse_cosign = script.refuse_cosign = fra.refuse_cosign = True
        answer = await fra.submit(data)
        assert isinstance(answer, ev.Receipt)
        _, got = await node.receive_delivery()
        assert got == data
        await trio.sleep(0.5)  # a checkpoint past the packet
        rid = script.conn.new_rid()
        await script.send(ev.GetCheckpoint(rid))
        checkpoint = await script.next()  # nothing pushed ahead of the answer, and the connection still open
        assert isinstance(checkpoint, ev.Checkpoint), checkpoint
        assert int(checkpoint.checkpoint.split(b"\n")[1]) > answer.index
        await node.sync()  # the node was not replaced

        # One member's auditor connections are bounded: past AUDITORS_PER_MEMBER, the oldest is closed.
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(daemon.AUDITORS_PER_MEMBER):
                extra = await stack.enter_async_context(WireClient.connect(world, "DEU", broker.port, role="auditor"))
                extra.refuse_cosign = True
            closed = await script.next()
            assert isinstance(closed, ev.ErrorMessage), closed
            assert closed.code == codes.REPLACED
            assert len(broker.auditors["DEU"]) == daemon.AUDITORS_PER_MEMBER
        await node.sync()


async def test_a_statement_signed_by_another_key_is_answered_bad_signature(tmp_path: Path) -> None:
    """wire.md's `bad-signature`: a signature (header, statement, notice) that does not verify; other statement
    faults are `refused`."""
    world = _world(tmp_path)
    now = int(time.time())
    forged = prec.grant(world.members["DEU"].signing, origin=ORIGIN, author="FRA", created=now, to="DEU", tlp="AMBER")
    for_another = prec.grant(
        world.members["DEU"].signing, origin=ORIGIN, author="DEU", created=now, to="FRA", tlp="AMBER"
    )
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        for statement, code in [(forged, codes.BAD_SIGNATURE), (for_another, codes.REFUSED)]:
            rid = fra.conn.new_rid()
            await fra.send(ev.Statement(rid, statement))
            answer = await fra.next_of(ev.ErrorMessage)
            assert isinstance(answer, ev.ErrorMessage)
            assert (answer.rid, answer.code) == (rid, code), answer


async def test_a_member_that_verified_more_than_the_broker_signed_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a broker restored from an older backup sees: nodes that verified a longer log. It cannot prove that
    (the hello only says a number), so it says so where the operator looks, once per member."""
    world = _world(tmp_path)
    async with running_broker(world) as broker:
        for _ in range(2):
            async with WireClient.connect(world, "DEU", broker.port, seen=1000) as deu:
                deu.refuse_cosign = True
                await deu.sync()
        signed = broker.log.latest.size if broker.log.latest else 0
    said = [r.getMessage() for r in caplog.records if "says it has verified a log of 1000 entries" in r.getMessage()]
    assert len(said) == 1
    assert f"this broker has signed only {signed}" in said[0]
    # A hostile-member review: one member can say this at will, and the text told the operator to restore a backup.
    assert "One member's word proves nothing; if others say the same" in said[0]


async def test_verbose_logging_names_every_connection_and_decision(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`broker serve -v` promises "every connection and decision"; a walkthrough found only the start-up line."""
    caplog.set_level(logging.INFO, logger="valise.broker")
    world = _world(tmp_path)
    allowed = seal(world, "FRA", ["DEU"], b"relayed")
    denied = seal(world, "FRA", ["DEU"], b"a category DEU does not accept", categories=("ransomware",))
    async with running_broker(world) as broker:
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            fra.refuse_cosign = True
            receipt = await fra.submit(allowed)
            assert isinstance(receipt, ev.Receipt)
            assert isinstance(await fra.submit(denied), ev.Deny)
        with trio.fail_after(10):
            while broker.sessions:  # noqa: ASYNC110 - the daemon's own state
                await trio.sleep(0.01)
    said = [r.getMessage() for r in caplog.records if r.name == "valise.broker"]
    assert "FRA connected (node)" in said
    assert f"FRA: packet {_head(allowed).core.packet_id.hex()} to DEU logged at {receipt.index}" in said
    assert any(m.startswith(f"FRA: packet {_head(denied).core.packet_id.hex()} denied: DEU: ") for m in said)
    assert "FRA disconnected (node)" in said


async def test_an_acknowledgement_the_full_commit_queue_refused_can_be_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: an acknowledgement refused by a full commit queue stayed marked as being logged, so every later
    acknowledgement of that packet was dropped and the item was pushed at every connection for ever."""
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"acknowledged twice")
    head = _head(data)
    pid = head.core.packet_id
    ack = records.Ack.make(world.members["DEU"].signing, pid, head.digest, "FRA", "DEU", int(time.time()))
    async with running_broker(world) as broker:
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            fra.refuse_cosign = True
            assert isinstance(await fra.submit(data), ev.Receipt)
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            seq, _ = await deu.receive_delivery()
            monkeypatch.setattr(daemon, "DEFAULT_MAX_PENDING", 0)  # the commit queue is full right now
            await deu.send(ev.Ack(seq, pid, ack.raw))
            with trio.fail_after(10):
                while broker.sessions.get("DEU") is not None:  # noqa: ASYNC110 - the daemon's own state
                    await trio.sleep(0.01)
        monkeypatch.undo()
        assert broker.acks_pending == set()
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            seq, _ = await deu.receive_delivery()
            await deu.send(ev.Ack(seq, pid, ack.raw))
            await deu.sync()
        with trio.fail_after(10):
            while broker.mail.has_item("DEU", "packet", head.digest):  # noqa: ASYNC110 - the daemon's own state
                await trio.sleep(0.01)
