"""A packet queued through a broker outage longer than the broker's time window is sealed afresh and delivered, not
given up (node/resealing.py, specs/protocol.md "Nodes"). A real broker and a real node daemon, in this process,
over mutual TLS on 127.0.0.1, with the two clocks moved on together (the broker's Settings.clock, the node's wall)."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from valise import packet
from valise.broker.daemon import BrokerDaemon, Settings
from valise.node.daemon import NodeDaemon
from valise.node.home import NodeHome
from valise.node.store import KEPT, RESEALED, NodeStore, OutboxRow
from valise.wire import codes

from .harness import WireClient, World, log_vkey, make_world, seal
from .test_node_cli import cli

OUTAGE = 660  # eleven minutes: past the broker's ±600 s window


async def _serve(broker: BrokerDaemon, scope: trio.CancelScope, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    with scope:
        await broker.serve(task_status=task_status)


def _broker(world: World, clock: Callable[[], float], port: int = 0) -> BrokerDaemon:
    settings = Settings(listen=("127.0.0.1", port), http=None, checkpoint_interval=0.2, policy_poll=0.1, clock=clock)
    return BrokerDaemon(world.home, settings)


async def _until(check: Callable[[], object], within: float = 30.0) -> None:
    with trio.fail_after(within):  # a safety net against a hang, not a timed assertion
        while not check():  # noqa: ASYNC110 - polling daemon state
            await trio.sleep(0.05)


async def _send(node: NodeDaemon, payload: Path) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = await cli("send", "--node", str(node.home.root), "--to", "DEU", "--tlp", "AMBER", "--no-wait", "--json",
                         str(payload))  # fmt: skip
    assert code == 0
    told: dict[str, Any] = json.loads(out.getvalue())
    return told


def _head(data: bytes) -> packet.Head:
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return head


class Clocks:
    """The broker's and the node's clocks, moved on together by `offset` seconds."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> float:
        return time.time() + self.offset

    def node(self) -> int:
        return int(self())


def _consenting(tmp_path: Path) -> World:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU")
    return world


def _node(world: World, tmp_path: Path, port: int, wall: Callable[[], int]) -> NodeDaemon:
    home = NodeHome.create(
        tmp_path / "node", world.dirs["FRA"], f"127.0.0.1:{port}", world.home.broker_bundle_path, log_vkey(world), None
    )
    return NodeDaemon(home, world.members["FRA"], poll_interval=0.2, wall=wall)


async def _sent_and_settled(nursery: trio.Nursery, node: NodeDaemon, payload: Path) -> OutboxRow:
    """Run the node, send `payload` to DEU through it, and wait until the outbox is done with it; its row."""
    await nursery.start(node.run)
    await _until(lambda: node.session is not None and "DEU" in node.follower.policy.members)
    await _send(node, payload)
    await _until(lambda: node.store.outbox_all()[0].state != "queued")
    (row,) = node.store.outbox_all()
    return row


async def test_a_packet_queued_through_a_long_outage_is_sealed_afresh_and_delivered(tmp_path: Path) -> None:
    """A review (time semantics): the broker refused such a packet as `stale` and the outbox gave it up for good,
    a month before its `expires`, after `send` had said "queued"."""
    world, clock = _consenting(tmp_path), Clocks()
    payload = tmp_path / "report.json"
    payload.write_bytes(b'{"type": "bundle", "id": "bundle--1", "objects": []}')
    async with trio.open_nursery() as nursery:
        first, first_scope = _broker(world, clock), trio.CancelScope()
        await nursery.start(_serve, first, first_scope)
        node = _node(world, tmp_path, first.port, clock.node)
        try:
            await nursery.start(node.run)
            await _until(lambda: node.session is not None and "DEU" in node.follower.policy.members)
            first_scope.cancel()  # the broker goes away
            await _until(lambda: node.session is None)
            told = await _send(node, payload)
            assert (told["state"], told["connected"]) == ("queued", False)
            (queued,) = node.store.outbox_all()
            kept = node.store.outbox_kept_key(queued)
            assert kept is not None  # K, kept while it is queued, sealed to FRA

            clock.offset = OUTAGE  # eleven minutes pass; the broker comes back on the same address
            await nursery.start(_serve, _broker(world, clock, first.port), trio.CancelScope())
            await _until(lambda: node.store.outbox_all()[0].state != "queued")
            (row,) = node.store.outbox_all()
            assert row.state == "receipted", row.outcome
            assert row.packet_id == queued.packet_id  # the same packet, as `send` named it
            assert row.digest != queued.digest
            assert row.created >= queued.created + OUTAGE
            # Not kept once the packet is out of the queue; and never in node.db, whose write-ahead log keeps what
            # is overwritten (a review recovered K from it, and read the sent packet with the member's key file).
            assert node.store.outbox_kept_key(row) is None
            outbox = node.home.root / "outbox"
            assert sorted(p.name for p in outbox.iterdir()) == [f"{row.packet_id.hex()}.pkt"]
            for name in ("node.db", "node.db-wal"):
                db = node.home.root / name
                assert not db.exists() or kept not in db.read_bytes()

            async with WireClient.connect(world, "DEU", first.port) as deu:
                deu.refuse_cosign = True
                _, data = await deu.receive_delivery()
            plain = io.BytesIO()
            opened = packet.open(io.BytesIO(data), plain, me=world.members["DEU"],
                                 sender=world.members["FRA"].bundle, now=int(clock()))  # fmt: skip
            assert plain.getvalue() == payload.read_bytes()
            assert (opened.packet_id, opened.created, opened.header_digest) == (row.packet_id, row.created, row.digest)
        finally:
            nursery.cancel_scope.cancel()
    node.store.close()


async def test_a_refusal_that_sealing_afresh_cannot_mend_is_final(tmp_path: Path) -> None:
    """A packet sealed moments before the broker called it stale: the clocks are further apart than the window,
    and sealing it again would be refused the same way, for ever. It is refused for good, as before, with the
    broker's words."""
    world = _consenting(tmp_path)
    payload = tmp_path / "report.bin"
    payload.write_bytes(b"indicators")
    async with trio.open_nursery() as nursery:
        broker = _broker(world, lambda: time.time() + OUTAGE)  # the broker's clock is eleven minutes ahead
        await nursery.start(_serve, broker, trio.CancelScope())
        node = _node(world, tmp_path, broker.port, lambda: int(time.time()))
        try:
            row = await _sent_and_settled(nursery, node, payload)
            assert row.state == "denied"
            assert json.loads(row.outcome or "")["error"]["code"] == codes.STALE
        finally:
            nursery.cancel_scope.cancel()
    node.store.close()


async def test_a_packet_that_waited_a_while_and_then_uploaded_slowly_is_sealed_afresh(tmp_path: Path) -> None:
    """A review of the rule above: a packet that waited 250 s, then took 400 s to upload, was refused for good, as
    if its upload had outlasted the window, though sealed afresh it goes through (its age counts, not its wait)."""
    world, clock = _consenting(tmp_path), Clocks()
    payload = tmp_path / "big.bin"
    payload.write_bytes(bytes(200_000))
    async with trio.open_nursery() as nursery:
        first, first_scope = _broker(world, clock), trio.CancelScope()
        await nursery.start(_serve, first, first_scope)
        node = _node(world, tmp_path, first.port, clock.node)
        upload, uploads = node._upload, []

        async def slow_first_upload(*args: Any) -> Any:
            uploads.append(clock.node())
            if len(uploads) == 1:
                clock.offset += 400  # the first upload takes 400 s
            return await upload(*args)

        node._upload = slow_first_upload  # type: ignore[method-assign]
        try:
            await nursery.start(node.run)
            await _until(lambda: node.session is not None and "DEU" in node.follower.policy.members)
            first_scope.cancel()
            await _until(lambda: node.session is None)
            await _send(node, payload)
            clock.offset += 250  # it waits 250 s for the broker
            await nursery.start(_serve, _broker(world, clock, first.port), trio.CancelScope())
            await _until(lambda: node.store.outbox_all()[0].state != "queued")
            (row,) = node.store.outbox_all()
            assert row.state == "receipted", row.outcome
            assert len(uploads) == 2  # refused once, sealed afresh, then taken
        finally:
            nursery.cancel_scope.cancel()
    node.store.close()


def test_a_crash_while_a_packet_is_put_in_place_sealed_afresh_is_finished_or_undone(tmp_path: Path) -> None:
    """The new file goes in beside the old one, the row names it, then it replaces the old file. A crash after the
    row named it leaves the new file beside the old: the next open puts it in place. A crash before leaves one the
    row does not name: it goes, and the old packet stays."""
    world = make_world(tmp_path / "w")
    old, new, other = (seal(world, "FRA", ["DEU"], text) for text in (b"old", b"new", b"other"))
    old_head, new_head, other_head = (_head(d) for d in (old, new, other))
    root = tmp_path / "node"
    store = NodeStore.open(root)
    pid, pid2 = old_head.core.packet_id, other_head.core.packet_id
    store.enqueue(pid, old_head.digest, ["DEU"], 1, 2**40, old)
    store.enqueue(pid2, other_head.digest, ["DEU"], 1, 2**40, other)
    outbox = root / "outbox"
    for name in (f"{pid.hex()}.{old_head.digest.hex()}", f"{pid.hex()}.{new_head.digest.hex()}",
                 f"{pid2.hex()}.{other_head.digest.hex()}", f"{pid2.hex()}.{new_head.digest.hex()}"):  # fmt: skip
        (outbox / f"{name}{KEPT}").write_bytes(b"a kept key")
    (outbox / f"{pid.hex()}.{new_head.digest.hex()}{KEPT}.part").write_bytes(b"cut short")
    # The first crashed after its row named the new packet; the second before.
    store._db.execute("UPDATE outbox SET digest = ? WHERE packet_id = ?", (new_head.digest, pid))
    store.close()
    (root / "outbox" / f"{pid.hex()}{RESEALED}").write_bytes(new)
    (root / "outbox" / f"{pid2.hex()}{RESEALED}").write_bytes(new)

    store = NodeStore.open(root)
    try:
        assert store.outbox_path(pid).read_bytes() == new
        assert store.outbox_path(pid2).read_bytes() == other
        # Each packet's files: its packet, and the kept key of the digest its row names; nothing else.
        assert sorted(p.name for p in outbox.iterdir()) == sorted(
            [f"{pid.hex()}.pkt", f"{pid.hex()}.{new_head.digest.hex()}{KEPT}",
             f"{pid2.hex()}.pkt", f"{pid2.hex()}.{other_head.digest.hex()}{KEPT}"]
        )  # fmt: skip
    finally:
        store.close()


async def test_a_packet_whose_upload_outlasts_the_window_is_refused_for_good_not_sealed_again(tmp_path: Path) -> None:
    """A review: the broker checks the window again when an upload ends, so a large packet on a slow link (1 GiB at
    10 Mbit/s takes 14 minutes) was refused `stale` at the end of each upload, sealed afresh, sent again, for as
    long as it had to live, with `outbox` showing "queued, 0 attempts". Sealing afresh cannot mend an upload that
    takes longer than the window: the packet is refused for good, saying so. Both clocks move on 700 s while the
    upload is under way (the node's real upload, with the clock moved at its start)."""
    world, clock = _consenting(tmp_path), Clocks()
    payload = tmp_path / "big.bin"
    payload.write_bytes(bytes(200_000))
    async with trio.open_nursery() as nursery:
        broker = _broker(world, clock)
        await nursery.start(_serve, broker, trio.CancelScope())
        node = _node(world, tmp_path, broker.port, clock.node)
        upload = node._upload

        async def slow_upload(*args: Any) -> Any:
            clock.offset += 700  # this upload takes 700 s
            return await upload(*args)

        node._upload = slow_upload  # type: ignore[method-assign]
        try:
            row = await _sent_and_settled(nursery, node, payload)
            assert row.state == "denied"
            refused = json.loads(row.outcome or "")["error"]
            assert refused["code"] == codes.STALE
            assert (
                "its upload took 700 s, longer than the broker's time window (600 s by default) allows"
                in (refused["message"])
            )
            assert clock.offset == 700  # sent once
        finally:
            nursery.cancel_scope.cancel()
    node.store.close()
