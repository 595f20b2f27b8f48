"""Faults: the broker as a real process, SIGKILLed mid-stream and restarted on the same directory; and the log's
read side (C2SP tlog-tiles) served over HTTP by a running broker, checked the way any tiles client would.

What a receipt promises (specs/protocol.md, "Relaying a packet", steps 8-10): the entry is in the log at the
receipt's index and the packet is queued for every recipient, durably. A kill at any moment must not break
that promise, must not deliver again what a recipient acknowledged, and must leave no partial upload behind.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from valise import packet, records
from valise.policy import records as prec
from valise.store.sqlite import SqliteLog
from valise.tlog import checkpoint, merkle, note, tiles
from valise.wire import codes
from valise.wire import events as ev

from .harness import (
    ORIGIN,
    BrokerProcess,
    WireClient,
    World,
    broker_process,
    close_gracefully,
    http_get,
    make_world,
    running_broker,
    seal,
)

PIPELINED = 60  # packets FRA streams while the broker is killed
KILL_AFTER = 12  # receipts of that stream seen before the kill


def _head(data: bytes) -> packet.Head:
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return head


def _ack(world: World, member: str, data: bytes) -> records.Ack:
    head = _head(data)
    return records.Ack.make(
        world.members[member].signing, head.core.packet_id, head.digest, head.core.sender, member, int(time.time())
    )


def _logged_packets(world: World) -> dict[bytes, int]:
    """header digest → log index of every packet entry in the broker's log (read from its store on disk)."""
    found: dict[bytes, int] = {}
    with SqliteLog.open(world.home.db_path) as store:
        for index, entry in enumerate(store.entries(0, store.size())):
            kind, m = records.entry_type(entry)
            if kind == "pkt":
                digest = hashlib.sha256(m["header"]).digest()
                assert digest not in found, f"packet {digest.hex()} is in the log twice"
                found[digest] = index
    return found


async def _pipeline(
    client: WireClient, batch: list[bytes], receipts: dict[bytes, ev.Receipt], on_receipt: Callable[[], None]
) -> None:
    """Submit `batch` with as many submissions in flight as the broker allows, until the connection dies;
    keep every receipt that arrived before that."""
    client.refuse_cosign = False  # the reader must not send: the sender task owns the sending side
    room = trio.Event()
    by_rid: dict[int, bytes] = {}

    async def sender() -> None:
        for data in batch:
            while client.conn.request_room == 0 or client.conn.send_window < len(data):
                await room.wait()
            head = _head(data)
            rid = client.conn.new_rid()
            by_rid[rid] = head.digest
            await client.send(ev.SubmitBegin(rid, data[: head.head_size], len(data) - head.head_size))
            await client.send(ev.SubmitChunk(rid, data[head.head_size :]))
            await client.send(ev.SubmitEnd(rid))

    async def reader() -> None:
        nonlocal room
        while True:
            event = await client.next()
            if isinstance(event, ev.ConnectionClosed):
                return
            if isinstance(event, ev.Receipt):
                receipts[by_rid[event.rid]] = event
                on_receipt()
            else:
                assert isinstance(event, ev.Credit | ev.CosignRequest | ev.AckForward), event
            room.set()
            room = trio.Event()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await reader()
            nursery.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the broker is gone: that is the point


async def test_sigkill_mid_stream_loses_nothing_receipted(tmp_path: Path) -> None:
    world = make_world(tmp_path, ("FRA", "DEU", "ITA", "NGA"))
    for sender, recipient in (("FRA", "DEU"), ("FRA", "ITA"), ("NGA", "DEU"), ("NGA", "ITA"), ("ITA", "DEU")):
        world.consent(sender, recipient)
    spool = world.home.root / "spool"
    acked = [seal(world, "FRA", ["DEU", "ITA"], b"acked %d " % i * 40) for i in range(4)]
    batch = [
        seal(world, "FRA" if i < PIPELINED // 2 else "NGA", ["DEU", "ITA"], b"stream %d " % i * 40)
        for i in range(PIPELINED)
    ]
    big = seal(world, "ITA", ["DEU"], bytes(range(256)) * 12288)  # 3 MiB: several chunks, cut by the kill
    big_head = _head(big)
    receipts: dict[bytes, ev.Receipt] = {}

    proc = BrokerProcess(world.home.root, tmp_path / "broker-1.log")
    try:
        await proc.started()
        async with (
            WireClient.connect(world, "FRA", proc.port) as fra,
            WireClient.connect(world, "DEU", proc.port) as deu,
            WireClient.connect(world, "ITA", proc.port) as ita,
            WireClient.connect(world, "NGA", proc.port) as nga,
        ):
            fra.refuse_cosign = deu.refuse_cosign = True
            # 1. Packets delivered and acknowledged before the crash; FRA seeing the forwarded ack proves the
            #    acknowledgement is durable (the broker forwards it only after its commit).
            for data in acked:
                answer = await fra.submit(data)
                assert isinstance(answer, ev.Receipt)
                receipts[_head(data).digest] = answer
                seq, got = await deu.receive_delivery()
                assert got == data
                await deu.sync()  # works around the daemon's ack race (see WireClient.sync)
                await deu.send(ev.Ack(seq, _head(data).core.packet_id, _ack(world, "DEU", data).raw))
                forwarded = await fra.next_of(ev.AckForward)
                assert isinstance(forwarded, ev.AckForward)
                await fra.send(ev.Seen(forwarded.seq))
            # 2. An upload in flight: ITA sends the head and the first chunks of 3 MiB, never the end.
            rid = ita.conn.new_rid()
            await ita.send(ev.SubmitBegin(rid, big[: big_head.head_size], len(big) - big_head.head_size))
            await ita.send(ev.SubmitChunk(rid, big[big_head.head_size : big_head.head_size + 256 * 1024]))
            with trio.fail_after(10):
                while not list(spool.glob("*.part")):  # the broker is writing it to its spool  # noqa: ASYNC110
                    await trio.sleep(0.01)
            # 3. FRA and NGA stream packets (so that commits hold several entries); the broker is SIGKILLed
            #    once receipts are flowing, with more submissions in flight on both connections.
            streamed = 0

            def kill_when_flowing() -> None:
                nonlocal streamed
                streamed += 1
                if streamed == KILL_AFTER:
                    proc.kill()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pipeline, fra, batch[: PIPELINED // 2], receipts, kill_when_flowing)
                nursery.start_soon(_pipeline, nga, batch[PIPELINED // 2 :], receipts, kill_when_flowing)
    finally:
        proc.kill()
    assert len(receipts) >= len(acked) + KILL_AFTER
    assert list(spool.glob("*.part")), "the cut upload should still be on disk until the broker restarts"

    async with broker_process(world.home.root, tmp_path / "broker-2.log") as proc2:
        # No partial upload is left, and the cut packet is nowhere.
        assert not list(spool.glob("*.part"))
        assert not (spool / f"{big_head.digest.hex()}.pkt").exists()
        logged = _logged_packets(world)
        assert big_head.digest not in logged
        # Every receipted packet is in the log at its receipt's index, with the sender's signed header.
        broker_key = world.home.broker_identity().bundle.sign_key
        for data in acked + batch:
            digest = _head(data).digest
            if digest in receipts:
                receipt = records.Receipt.verified(receipts[digest].receipt, broker_key)
                assert logged.get(digest) == receipt.index == receipts[digest].index
        streamed_digests = {_head(d).digest for d in batch}
        acked_digests = {_head(d).digest for d in acked}
        # A packet the kill caught after its log entry but before its receipt may still await its sender's
        # resubmission (a small packet's body travels in the mailbox commit the kill prevented); its sender got no
        # receipt and retries, as every sender does. So: resubmit everything, as the senders' outboxes would, while
        # the recipients collect; in the end each logged packet reaches them exactly once.
        got: dict[str, list[bytes]] = {"DEU": [], "ITA": []}

        async def collect(client: WireClient, name: str, count: int) -> None:
            for _ in range(count):
                got[name].append(_head((await client.receive_delivery())[1]).digest)

        async with (
            WireClient.connect(world, "FRA", proc2.port) as fra,
            WireClient.connect(world, "NGA", proc2.port) as nga,
            WireClient.connect(world, "ITA", proc2.port) as ita,
            WireClient.connect(world, "DEU", proc2.port) as deu,
        ):
            fra.refuse_cosign = nga.refuse_cosign = ita.refuse_cosign = deu.refuse_cosign = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, deu, "DEU", len(streamed_digests))
                nursery.start_soon(collect, ita, "ITA", len(streamed_digests | acked_digests))
                # A resubmission of a receipted packet (same bytes) gets the same index: idempotent.
                for data in acked + batch:
                    digest = _head(data).digest
                    again = await (fra if _head(data).core.sender == "FRA" else nga).submit(data)
                    assert isinstance(again, ev.Receipt), again
                    if digest in receipts:
                        assert again.index == receipts[digest].index
                    elif digest in logged:
                        assert again.index == logged[digest]  # logged, receipt lost: the index it already has
            # DEU gets each packet once, and nothing it acknowledged before the kill; ITA, which acknowledged
            # nothing, gets every packet addressed to it, once.
            assert sorted(got["DEU"]) == sorted(streamed_digests)
            assert not set(got["DEU"]) & acked_digests
            assert sorted(got["ITA"]) == sorted(streamed_digests | acked_digests)
            await close_gracefully(deu)
            # The cut upload was never logged, so it is not a replay: it goes through now.
            assert isinstance(await ita.submit(big), ev.Receipt)
            for client in (fra, nga, ita):
                await close_gracefully(client)
        assert proc2.alive()
    # Still exactly one log entry per packet after all the resubmissions.
    final = _logged_packets(world)
    assert set(final) == {_head(d).digest for d in acked + batch} | {big_head.digest}


async def test_tiles_over_http_verify_with_the_broker_vkey(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU")
    # Enough entries for a full level-0 tile and a level-1 tile (RFC 6962 hashing across tile boundaries).
    now = int(time.time())
    grants = [_grant(world, i, now) for i in range(300)]
    with SqliteLog.open(world.home.db_path) as store:
        store.append(grants)
        size_before = store.size()
    info = await trio.run_process(
        [sys.executable, "-m", "valise.cli.main", "broker", "info", "--dir", str(world.home.root), "--json"],
        capture_stdout=True,
    )
    vkey = json.loads(info.stdout)["vkey"]
    verifier = note.parse_vkey(vkey)

    async with broker_process(world.home.root, tmp_path / "broker.log") as proc:
        async with WireClient.connect(world, "FRA", proc.port) as fra:
            fra.refuse_cosign = True
            assert isinstance(await fra.submit(seal(world, "FRA", ["DEU"], b"on the log")), ev.Receipt)
            await close_gracefully(fra)
        # Wait for a checkpoint that covers the packet (checkpoints are cut every 0.2 s).
        with trio.fail_after(10):
            while True:
                status, headers, body = await http_get(proc.http_port, "/checkpoint")
                assert status == 200
                cp, _ = checkpoint.open_checkpoint(body, verifier, origin=ORIGIN)
                if cp.size > size_before:
                    break
                await trio.sleep(0.05)
        assert headers["cache-control"] == "no-store"
        level0: list[bytes] = []
        for tile in tiles.tiles_for_size(cp.size):
            status, headers, data = await http_get(proc.http_port, "/" + tile.path)
            assert status == 200, tile.path
            assert len(data) == tile.width * tiles.HASH_SIZE
            assert ("immutable" in headers["cache-control"]) == (tile.width == tiles.WIDTH)
            if tile.level == 0:
                level0.append(data)
            elif tile.level == 1:
                # Level 1 holds the root of each full level-0 tile.
                assert tiles.split_tile(data, tile.width)[0] == _tile_root(level0[0])
        assert tiles.root_from_level0_tiles(cp.size, level0) == cp.root
        # Paths outside the canonical layout, and tiles past the tree, are not found.
        for bad, why in (
            ("/tile/0/x000/000", "not in canonical form"),
            ("/tile/0/999", "is beyond the"),
            ("/../log.db", "not a tile path"),
            ("/tile/0/000.p/0", "width"),
            ("/tile/64/000", "level"),
        ):
            status, _, body = await http_get(proc.http_port, bad)
            assert status == 404, bad
            assert body.startswith(b"not found: "), body  # and why, for whoever writes a client
            assert why in body.decode(), (bad, body)
        assert proc.alive()


def _grant(world: World, i: int, now: int) -> bytes:
    return prec.grant(world.members["FRA"].signing, origin=ORIGIN, author="FRA", created=now - i, to="ITA", tlp="GREEN")


def _tile_root(data: bytes) -> bytes:
    acc = merkle.CompactRange()
    acc.extend(tiles.split_tile(data, tiles.WIDTH))
    return acc.root()


async def test_entry_bundles_are_not_public(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU")
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        answer = await fra.submit(seal(world, "FRA", ["DEU"], b"who sends what to whom"))
        assert isinstance(answer, ev.Receipt)
        await close_gracefully(fra)
        with trio.fail_after(10):
            while broker.log.latest is None or broker.log.latest.size <= answer.index:  # noqa: ASYNC110
                await trio.sleep(0.05)
        size = broker.log.latest.size
        bundle = tiles.entry_tiles_for_size(size)[0]
        # Every spelling a client might try: a doubled leading slash once got round a prefix check on the path.
        for path in ("/" + bundle.path, "//" + bundle.path, "///" + bundle.path, "/./" + bundle.path, bundle.path):
            status, _, body = await http_get(broker.http_port, path)
            assert status in (403, 404), f"{path} is public: {len(body)} bytes of full log entries"
            assert b"DEU" not in body
        status, _, body = await http_get(broker.http_port, "/" + bundle.path)
        assert status == 403
        assert b"not public" in body
        status, _, _ = await http_get(broker.http_port, "//checkpoint")
        assert status == 404


async def _upload_body(client: WireClient, rid: int, data: bytes) -> None:
    """The ciphertext of an upload whose submit-begin went out, within the send window, without its end."""
    pos = _head(data).head_size
    while pos < len(data):
        while client.conn.send_window == 0:
            event = await client.next()
            assert not isinstance(event, ev.ConnectionClosed | ev.ErrorMessage), event
        n = min(client.conn.send_window, 256 * 1024, len(data) - pos)
        await client.send(ev.SubmitChunk(rid, data[pos : pos + n]))
        pos += n


async def test_a_large_upload_refused_as_a_replay_leaves_no_body_in_the_spool(tmp_path: Path) -> None:
    """Two large uploads under one packet id, open at once: the first is logged, the second refused at its end,
    once its body has its final name in the spool. A member repeating this must not fill the disk."""
    world = make_world(tmp_path)
    world.consent("FRA", "DEU")
    pid = b"\x07" * 16
    one = seal(world, "FRA", ["DEU"], b"A" * 200_000, packet_id=pid)
    two = seal(world, "FRA", ["DEU"], b"B" * 300_000, packet_id=pid)
    spool = world.home.root / "spool"
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        r1, r2 = fra.conn.new_rid(), fra.conn.new_rid()
        for rid, data in ((r1, one), (r2, two)):
            head = _head(data)
            await fra.send(ev.SubmitBegin(rid, data[: head.head_size], len(data) - head.head_size))
        await _upload_body(fra, r1, one)
        await fra.send(ev.SubmitEnd(r1))
        receipt = await fra.next_of(ev.Receipt)
        assert isinstance(receipt, ev.Receipt)
        assert receipt.digest == _head(one).digest
        await _upload_body(fra, r2, two)
        await fra.send(ev.SubmitEnd(r2))
        refused = await fra.next()
        while isinstance(refused, ev.Credit):
            refused = await fra.next()
        assert isinstance(refused, ev.ErrorMessage)
        assert (refused.rid, refused.code) == (r2, codes.REPLAY)
        await fra.sync()
        assert sorted(p.name for p in spool.iterdir()) == [f"{_head(one).digest.hex()}.pkt"]
        await close_gracefully(fra)


async def test_resubmitting_a_delivered_packet_leaves_no_body_in_the_spool(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU")
    data = seal(world, "FRA", ["DEU"], b"delivered, acknowledged, then sent again")
    body = world.home.root / "spool" / f"{_head(data).digest.hex()}.pkt"
    async with (
        running_broker(world) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
        WireClient.connect(world, "DEU", broker.port) as deu,
    ):
        fra.refuse_cosign = deu.refuse_cosign = True
        first = await fra.submit(data)
        assert isinstance(first, ev.Receipt)
        seq, _ = await deu.receive_delivery()
        await deu.sync()
        await deu.send(ev.Ack(seq, _head(data).core.packet_id, _ack(world, "DEU", data).raw))
        forwarded = await fra.next_of(ev.AckForward)
        assert isinstance(forwarded, ev.AckForward)
        assert not body.exists()  # delivered and acknowledged: the broker dropped its copy
        again = await fra.submit(data)  # a sender retrying after a lost receipt
        assert isinstance(again, ev.Receipt)
        assert again.index == first.index
        await close_gracefully(fra)
        await close_gracefully(deu)
        assert not body.exists(), "a body no mailbox refers to is left in the spool for good"


async def test_an_upload_that_stops_getting_data_is_given_up_and_its_file_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wire.md, "Timeouts": an open transfer without progress for STALL seconds is abandoned (`timeout`), its
    spool file goes, and the connection carries on (its later chunks for that upload are discarded)."""
    from valise.wire import liveness

    monkeypatch.setattr(liveness, "STALL", 0.4)
    monkeypatch.setattr(liveness, "CHECK_EVERY", 0.1)
    world = make_world(tmp_path)
    world.consent("FRA", "DEU")
    data = seal(world, "FRA", ["DEU"], b"x" * 200_000)  # spooled to a file, not kept in memory
    head = _head(data)
    body = data[head.head_size :]
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        rid = fra.conn.new_rid()
        await fra.send(ev.SubmitBegin(rid, data[: head.head_size], len(body)))
        await fra.send(ev.SubmitChunk(rid, body[:1000]))
        await fra.sync()
        spool = world.home.root / "spool"
        assert [p for p in spool.rglob("*") if p.is_file()], "the upload has a file while it is open"
        answer = await fra.next_of(ev.ErrorMessage, within=5)
        assert isinstance(answer, ev.ErrorMessage)
        assert (answer.rid, answer.code) == (rid, codes.TIMEOUT)
        assert "no data for this upload" in answer.message
        assert [p for p in spool.rglob("*") if p.is_file()] == []
        await fra.send(ev.SubmitChunk(rid, body[1000:2000]))  # late: discarded, not an error
        await fra.sync()
        assert isinstance(await fra.submit(seal(world, "FRA", ["DEU"], b"and the next one")), ev.Receipt)
