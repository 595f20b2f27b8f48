"""A node whose storage fails (a full disk, a size limit): it acknowledges and cosigns nothing it has not stored,
keeps running, says why, and takes what it missed once it can write again.

The end-to-end tests run `valise node run` as a real process under a file size limit (RLIMIT_FSIZE, which the
kernel enforces like a full disk: a write past it fails, EFBIG; Python ignores SIGXFSZ), with a real broker and
real TLS on 127.0.0.1, and lift the limit from outside (prlimit) as an operator frees space."""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from valise import identity, packet
from valise.cli.main import main as cli
from valise.cli.node import call
from valise.errors import StoreError
from valise.wire import codes
from valise.wire import events as ev

from .harness import WireClient, log_vkey, make_world, running_broker, seal
from .test_node_daemon import Harness, connections_ended_with, sealed, start, wait_for, world  # noqa: F401

LIMIT = 1 << 20  # the node process may not write any file past 1 MiB: its store fits, a 3 MiB packet does not
# Sets the limit, then becomes `valise node run` (exec): preexec_fn is unsafe with threads.
LAUNCHER = (
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY));"
    " os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


async def _status(node: Path) -> dict[str, Any]:
    return await call(node, {"op": "status"})


async def _until(node: Path, check: Any, within: float = 40.0) -> dict[str, Any]:
    """Poll the node's status until `check(status)` holds (a safety net against a hang, not a timed assertion)."""
    with trio.fail_after(within):
        while True:
            try:
                status = await _status(node)
                if check(status):
                    return status
            except Exception:
                pass
            await trio.sleep(0.05)


def _node_process(net: Any, member: str, port: int, node: Path, log: Path) -> subprocess.Popen[bytes]:
    pub = str(net.home.broker_bundle_path)
    init = ["node", "init", "--dir", str(node), "--identity", str(net.dirs[member]), "--broker"]
    assert cli([*init, f"127.0.0.1:{port}", "--broker-pub", pub, "--log-key", log_vkey(net)]) == 0
    run = ["-m", "valise.cli.main", "node", "run", "--dir", str(node)]
    with log.open("wb") as err:
        return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(LIMIT), *run], stderr=err)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_a_delivery_the_node_cannot_store_is_not_acknowledged_and_is_taken_once_it_can(tmp_path: Path) -> None:
    net = make_world(tmp_path, ("FRA", "DEU"))
    net.consent("FRA", "DEU")
    node, log = tmp_path / "node-deu", tmp_path / "node-deu.log"
    payload = os.urandom(3 << 20)
    async with running_broker(net) as broker:
        proc = _node_process(net, "DEU", broker.port, node, log)
        try:
            await _until(node, lambda s: s["connected"])
            async with WireClient.connect(net, "FRA", broker.port) as fra:
                data = seal(net, "FRA", ["DEU"], payload)
                head = packet.parse_head(data)
                assert isinstance(head, packet.Head)
                assert isinstance(await fra.submit(data), ev.Receipt)

                failed = await _until(node, lambda s: "storage failed" in (s["last_error"] or ""))
                assert "could not write a delivery's spool file" in failed["last_error"]
                assert "File too large" in failed["last_error"]
                assert proc.poll() is None  # the daemon runs on
                assert failed["inbox"] == {}
                assert list((node / "tmp").glob("*.part")) == []  # the partial file is gone
                # Nothing was acknowledged: the broker still holds the packet for DEU.
                assert [i.digest for i in broker.mail.pending("DEU", 0, 10)] == [head.digest]

                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                await _until(node, lambda s: s["inbox"] == {"new": 1})
                forwarded = await fra.next_of(ev.AckForward)
                assert isinstance(forwarded, ev.AckForward)
                assert forwarded.id == head.core.packet_id
            out = tmp_path / "read.bin"
            assert (
                await trio.to_thread.run_sync(
                    cli, ["read", "--node", str(node), head.core.packet_id.hex(), "-o", str(out)]
                )
                == 0
            )
            assert out.read_bytes() == payload
        finally:
            _stop(proc)
    assert "Traceback" not in log.read_text()


async def test_send_of_a_packet_the_node_cannot_store_says_why_and_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = make_world(tmp_path, ("FRA", "DEU"))
    net.consent("FRA", "DEU")
    node, log = tmp_path / "node-fra", tmp_path / "node-fra.log"
    big, small = tmp_path / "big.bin", tmp_path / "small.json"
    big.write_bytes(os.urandom(3 << 20))
    small.write_text("{}")
    send = ["send", "--node", str(node), "--to", "DEU", "--tlp", "AMBER", "--category", "malware"]
    async with running_broker(net) as broker:
        proc = _node_process(net, "FRA", broker.port, node, log)
        try:
            await _until(node, lambda s: s["connected"])
            capsys.readouterr()
            assert await trio.to_thread.run_sync(cli, [*send, str(big)]) == 1
            err = capsys.readouterr().err
            assert "could not write the packet being sealed" in err
            assert "File too large" in err
            assert "is its disk full" in err
            assert "internal error" not in err
            assert list((node / "outbox").iterdir()) == []
            assert list((node / "tmp").iterdir()) == []
            assert proc.poll() is None
            # What fits still goes.
            assert await trio.to_thread.run_sync(cli, [*send, "--json", str(small)]) == 0
            assert '"state": "receipted"' in capsys.readouterr().out
        finally:
            _stop(proc)


async def test_a_checkpoint_the_node_could_not_record_is_neither_cosigned_nor_skipped(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    """A review: following the log moved the node's view on in memory before it was stored. When storing failed
    (a full disk), the node cosigned the tree it never recorded, and its next commit skipped the entries in
    between for good: a member added there stayed unknown to it after a restart. The view now goes back to what
    the store holds, the cosigning request is answered `internal` (without this machine's paths) and the
    connection ends; on the next one, the follow stores the entries."""
    h = Harness(world, members["FRA"])
    store = h.daemon.store
    real = store.follower_commit
    failing = False

    def full_disk(*args: Any, **kwargs: Any) -> int:
        if failing:
            raise StoreError(
                "the node store /srv/n/node.db failed: database or disk is full", cause="database or disk is full"
            )
        return real(*args, **kwargs)

    store.follower_commit = full_disk  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        failing = True  # the disk is full from here on
        new_note = h.log.admit(members["ITA"])
        proof = tuple(h.log.service.consistency_proof(3))
        await broker.send(ev.CosignRequest(7, 3, proof, new_note))
        answer = await broker.expect(ev.ErrorMessage)
        assert (answer.rid, answer.code) == (7, codes.INTERNAL)
        assert answer.message == "this node's storage failed: database or disk is full"
        assert h.daemon.follower.size == 3  # as stored
        assert h.daemon.follower.member_key("ITA") is None
        await wait_for(lambda: h.daemon.last_error is not None)  # said while the node waits to connect again
        assert h.daemon.last_error is not None
        assert h.daemon.last_error.startswith("this node's storage failed: the node store /srv/n/node.db failed")
        failing = False
        broker = await h.accepted.receive()  # the node connects again (after a pause)
        await h.daemon.connected_event.wait()
        await broker.send(ev.CosignRequest(8, 3, proof, new_note))
        assert (await broker.expect(ev.CosignResponse)).rid == 8
        assert h.daemon.follower.member_key("ITA") == members["ITA"].bundle.sign_key
        nursery.cancel_scope.cancel()
    store.close()
    again = Harness(world, members["FRA"])  # a restart: the view rebuilt from the store
    try:
        assert again.daemon.follower.size == h.log.service.store.size()
        assert again.daemon.follower.member_key("ITA") == members["ITA"].bundle.sign_key
    finally:
        again.daemon.store.close()


def test_a_store_write_that_sqlite_refuses_is_a_store_error_naming_the_store(tmp_path: Path) -> None:
    """The store's own conversion, on a real SQLite refusal (a connection made read-only): a StoreError naming
    node.db, and the transaction rolled back so that the store takes writes again afterwards."""
    from valise.node.store import NodeStore

    store = NodeStore.open(tmp_path)
    store._db.execute("PRAGMA query_only = ON")
    with pytest.raises(StoreError, match=r"the node store .*node\.db failed: attempt to write a readonly database"):
        store.follower_commit(b"state", [(0, b"genesis")], [])
    store._db.execute("PRAGMA query_only = OFF")
    store.follower_commit(b"state", [(0, b"genesis")], [])
    assert store.follower_load() == (b"state", [(0, b"genesis")])
    store.close()


async def test_a_node_whose_broker_fails_its_connection_as_internal_waits_longer_each_time(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    mock_clock: trio.testing.MockClock,
) -> None:
    """A review: a broker whose disk was full ended the connection of a node whose acknowledgement it could not
    log (`internal`), and the node reconnected at once, ~4 times a second, each time taking the same pushes
    again. Such an ending now counts as a failure in a row, like the node's own storage failing: the pauses grow
    (on trio's mock clock: virtual time, nothing timed on this machine), and status says why."""
    mock_clock.autojump_threshold = 0
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        ended = ev.ErrorMessage(None, codes.INTERNAL, "the broker's storage failed: disk I/O error")
        accepted = await connections_ended_with(nursery, h, ended, 5)
        await wait_for(lambda: not h.daemon.connected_event.is_set())
        assert h.daemon.last_error is not None  # said while the node waits to connect again
        said = "the broker failed: peer reported internal: the broker's storage failed: disk I/O error"
        assert h.daemon.last_error == said
        gaps = [b - a for a, b in itertools.pairwise(accepted)]
        assert gaps == sorted(gaps)
        assert gaps[-1] >= 8  # 1, 2, 4, 8 s: the backoff's ceilings, not its random draws
        nursery.cancel_scope.cancel()


async def test_a_packet_whose_sending_the_store_could_not_record_is_not_cancelled_by_retract(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A review: the broker logged a packet and sent its receipt, the node could record neither the receipt nor
    that it had sent the packet (a full disk), and once space came back `valise retract` cancelled the packet
    "here" as never sent, though its recipient had it. The node remembers what it sent until the store has it,
    and does not count such a run as a clean stop."""
    from valise.node.daemon import STOPPED_CLEANLY

    from .test_node_cli import answer_submission, cli, serve_daemon

    h = Harness(world, members["FRA"])
    store = h.daemon.store
    real_receipted, real_tried = store.outbox_receipted, store.outbox_tried

    def full_disk(*_: object) -> None:
        raise StoreError("the node store failed: database or disk is full", cause="database or disk is full")

    store.outbox_receipted = full_disk  # type: ignore[method-assign]
    store.outbox_tried = full_disk  # type: ignore[method-assign]
    payload = tmp_path / "p.json"
    payload.write_text("{}")
    node = str(world["home"].root)
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        nursery.start_soon(answer_submission, broker, h)
        assert await cli("send", "--node", node, "--to", "DEU", "--tlp", "GREEN", "--no-wait", str(payload)) == 0
        await wait_for(lambda: "storage failed" in (h.daemon.last_error or ""))
        (row,) = store.outbox_all()
        assert (row.state, row.attempts) == ("queued", 0)  # what the store holds: nothing says it was sent
        store.outbox_receipted, store.outbox_tried = real_receipted, real_tried  # type: ignore[method-assign]
        capsys.readouterr()
        assert await cli("retract", "--node", node, row.packet_id.hex(), "--reason", "wrong file") == 2
        assert "may have reached the broker" in capsys.readouterr().err
        assert store.outbox_all()[0].state == "queued"
        assert h.log.service.store.size() == 4  # the broker's log holds it
        assert h.daemon.unrecorded == {row.packet_id}  # a stop now would not be recorded as clean
        # A second review: once such a packet expires, nothing of it is left to cancel, so it must not keep the
        # run from counting as a clean stop (the next run would count a packet queued later as maybe sent).
        h.daemon.wall = lambda: row.expires
        h.daemon.wake_outbox()
        await wait_for(lambda: store.outbox_all()[0].state == "expired")
        assert h.daemon.unrecorded == set()
        nursery.cancel_scope.cancel()
    assert store.get(STOPPED_CLEANLY) == b"\x01"
    store.close()


async def test_reading_a_packet_needs_no_write(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
) -> None:
    """A review: `valise read` of a new packet failed on a full disk after decrypting it, because marking it read
    failed: the output was left unwritten. Marking it is now best effort."""
    from .test_node_cli import cli, serve_daemon
    from .test_node_rekey import deliver

    h = Harness(world, members["FRA"])
    store = h.daemon.store
    data, head = sealed(members["DEU"], [members["FRA"]], b"read me")
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        await deliver(broker, 1, data, head)
        await broker.expect(ev.Ack)

        def full_disk(*_: object, **__: object) -> None:
            raise StoreError("the node store failed: database or disk is full", cause="database or disk is full")

        store.inbox_mark = full_disk  # type: ignore[method-assign]
        out = tmp_path / "out.bin"
        node = str(world["home"].root)
        assert await cli("read", "--node", node, head.core.packet_id.hex(), "-o", str(out)) == 0
        assert out.read_bytes() == bytes(10)  # what `sealed` seals
        nursery.cancel_scope.cancel()


async def test_storage_failures_count_in_a_row_only_between_sessions_that_went_well_for_a_while(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    mock_clock: trio.testing.MockClock,
) -> None:
    """A review: once space came back and the node worked for a while, the next failure still waited the
    longest pause. A session that went well for longer than the longest pause starts the count again."""
    mock_clock.autojump_threshold = 0
    h = Harness(world, members["FRA"])
    ended = ev.ErrorMessage(None, codes.INTERNAL, "the broker's storage failed: disk I/O error")
    async with trio.open_nursery() as nursery:
        accepted = await connections_ended_with(nursery, h, ended, 4)  # pauses of 1, 2 and 4 s
        broker = await h.accepted.receive()  # a session that goes well for a minute
        began = trio.current_time()
        await h.daemon.connected_event.wait()

        with trio.move_on_after(60):  # the broker answers the node's pings meanwhile
            async for msg in broker.events:
                if isinstance(msg, ev.Ping):
                    await broker.send(ev.Pong(msg.n))
        assert h.daemon.connected_event.is_set()
        await broker.send(ended)
        await h.accepted.receive()
        assert trio.current_time() - began - 60 <= 1.5  # the first pause of a new row, not the fifth
        assert accepted[-1] - accepted[0] >= 7
        nursery.cancel_scope.cancel()


async def test_a_broker_that_refuses_valid_packets_is_caught_even_if_its_log_never_grows(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review: the `broker` alarm waited for a checkpoint signed after the refusal, which a lying broker whose
    log does not grow never signs. An honest broker that applied a rekey checkpoints it within its checkpoint
    interval: refusals with no newer checkpoint for BEHIND_GRACE are judged on the log as it stands."""
    from valise.node import daemon as daemon_module

    from .test_node_rekey import queue_own_packet, refuse_as_forged, uploaded

    monkeypatch.setattr(daemon_module, "BEHIND_GRACE", 0.2)
    h = Harness(world, members["FRA"])
    store = h.daemon.store
    queue_own_packet(h, members, b"refused for nothing")
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        rid = await uploaded(broker)
        await wait_for(lambda: h.daemon.follower.member_key("FRA") is not None)
        await refuse_as_forged(broker, rid)
        await wait_for(lambda: h.daemon._bad_signature is not None)
        assert store.alarms() == []
        await trio.sleep(0.3)
        d = h.daemon
        assert d.session is not None
        assert await d.sync(d.session)  # the poller's next follow: the same checkpoint
        (alarm,) = store.alarms()
        assert "with no newer checkpoint, shows the key that signed them as FRA's" in alarm.message
        nursery.cancel_scope.cancel()


async def test_sending_to_a_member_the_node_could_not_record_says_why(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    """A review: with the node unable to record the log, `send` to a member admitted meanwhile said only "not in
    the verified directory", as for a typing mistake. It names the store's failure."""
    from .test_node_cli import serve_daemon

    h = Harness(world, members["FRA"])
    store = h.daemon.store
    real = store.follower_commit

    def full_disk(*_: object, **__: object) -> int:
        raise StoreError(
            "the node store /srv/n/node.db failed: database or disk is full", cause="database or disk is full"
        )

    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        store.follower_commit = full_disk  # type: ignore[method-assign]
        note = h.log.admit(members["ITA"])
        reply = await call(world["home"].root, {"op": "send", "to": ["ITA"], "tlp": "GREEN", "size": 2})
        assert reply["ok"] is False
        assert "database or disk is full" in reply["error"]
        assert "not in the verified directory: ITA" not in reply["error"]
        # Once following the log in the connection fails (a cosigning request, here), the connection ends and
        # the node waits before the next: asked meanwhile, it says why.
        await broker.send(ev.CosignRequest(7, 3, tuple(h.log.service.consistency_proof(3)), note))
        await wait_for(lambda: h.daemon.session is None and h.daemon.storage_failures > 0)
        reply = await call(world["home"].root, {"op": "send", "to": ["ITA"], "tlp": "GREEN", "size": 2})
        assert reply["ok"] is False
        assert "not in the verified directory yet: ITA; this node's storage failed" in reply["error"]
        store.follower_commit = real  # type: ignore[method-assign]
        nursery.cancel_scope.cancel()


async def test_a_store_failure_with_more_deliveries_on_the_way_is_told_as_a_store_failure(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    """A review: the worker closed its channel with a checkpoint, so when a delivery failed to store while the
    broker's next pushes were on their way, the reader failed on the closed channel first, and the nursery's
    cancellation replaced the StoreError with a BrokenResourceError: the pause before the next connection did not
    grow and `status` said "BrokenResourceError". More pushes follow the failing one here, as in that review."""
    h = Harness(world, members["FRA"])
    store = h.daemon.store

    def full_disk(*_: object, **__: object) -> bool:
        raise StoreError("the node store /srv/n/node.db failed: database or disk is full", cause="disk full")

    store.inbox_add_file = full_disk  # type: ignore[method-assign]
    packets = [sealed(members["DEU"], [members["FRA"]], b"pushed %d" % i) for i in range(40)]
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        frames: list[bytes] = []
        for seq, (data, head) in enumerate(packets):  # all written at once: the reader has them all to hand over
            frames += [
                broker.conn.send(ev.DeliverBegin(seq, data[: head.head_size], len(data) - head.head_size)),
                broker.conn.send(ev.DeliverChunk(seq, data[head.head_size :])),
                broker.conn.send(ev.DeliverEnd(seq)),
            ]
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await broker.stream.send_all(b"".join(frames))
        await wait_for(lambda: h.daemon.session is None and h.daemon.last_error is not None)
        assert h.daemon.last_error is not None
        assert h.daemon.last_error.startswith("this node's storage failed: the node store"), h.daemon.last_error
        assert h.daemon.storage_failures == 1
        nursery.cancel_scope.cancel()
    assert store.inbox_all() == []
