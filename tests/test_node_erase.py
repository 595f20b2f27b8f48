"""`valise erase`: received packets removed from a node's inbox, through the running daemon's real control socket
and, with the daemon stopped, under its lock; a redelivery of an erased packet is acknowledged, never kept again."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from valise import identity, records
from valise.daemonlock import DaemonLock
from valise.node.store import ERASING, NodeStore
from valise.wire import events as ev

from .conftest import NOW
from .test_node_cli import cli, serve_daemon
from .test_node_daemon import Harness, ScriptedBroker, sealed, world  # noqa: F401
from .test_node_rekey import deliver


async def _received(broker: ScriptedBroker, seq: int, data: bytes, head: Any) -> None:
    await deliver(broker, seq, data, head)
    ack = await broker.expect(ev.Ack)
    assert ack.seq == seq


def _inbox_file(world: dict[str, Any], head: Any) -> Path:  # noqa: F811
    return Path(world["home"].root) / "inbox" / f"{head.digest.hex()}.pkt"


async def test_erase_removes_received_packets_and_a_redelivery_is_acknowledged_not_kept(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fra, deu = members["FRA"], members["DEU"]
    h = Harness(world, fra)
    node = str(world["home"].root)
    packets = [sealed(deu, [fra], b"packet %d" % i) for i in range(3)]
    (first, head1), (_, head2), (_, head3) = packets
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        for seq, (data, head) in enumerate(packets):
            await _received(broker, seq, data, head)
        retraction = records.Retraction.make(deu.signing, head2.core.packet_id, head2.digest, "DEU", "wrong", NOW)
        await broker.send(ev.RetractForward(10, head2.core.packet_id, "DEU", 9, retraction.raw))
        await broker.expect(ev.Seen)

        # Nothing named: refused. Ids and filters together: refused. Neither erases anything.
        assert await cli("erase", "--node", node) == 2
        assert "say what to erase" in capsys.readouterr().err
        assert await cli("erase", "--node", node, head1.core.packet_id.hex()[:8], "--retracted") == 2
        assert "not both" in capsys.readouterr().err

        # A dry run says what would go and leaves it.
        assert await cli("erase", "--node", node, "--retracted", "--dry-run", "--json") == 0
        told = json.loads(capsys.readouterr().out)
        assert (told["count"], told["ids"], told["dry_run"]) == (1, [head2.core.packet_id.hex()], True)
        assert _inbox_file(world, head2).exists()

        assert await cli("erase", "--node", node, "--retracted") == 0
        assert "erased 1 packet(s)" in capsys.readouterr().out
        # A review: one packet named twice was counted twice.
        twice = [head3.core.packet_id.hex()[:8], head3.core.packet_id.hex()]
        assert await cli("erase", "--node", node, *twice, "--dry-run", "--json") == 0
        assert json.loads(capsys.readouterr().out)["count"] == 1
        assert await cli("erase", "--node", node, head1.core.packet_id.hex()[:8], "--json") == 0
        told = json.loads(capsys.readouterr().out)
        assert (told["count"], told["ids"], told["already"]) == (1, [head1.core.packet_id.hex()], [])
        assert not _inbox_file(world, head1).exists()
        assert not _inbox_file(world, head2).exists()
        assert _inbox_file(world, head3).exists()

        assert await cli("inbox", "--node", node, "--json") == 0
        assert [it["id"] for it in json.loads(capsys.readouterr().out)] == [head3.core.packet_id.hex()]
        assert await cli("status", "--node", node, "--json") == 0
        told = json.loads(capsys.readouterr().out)
        assert (told["inbox"], told["inbox_erased"]) == ({"new": 1}, 2)  # a script summing `inbox` counts held
        out = tmp_path / "out.bin"
        assert await cli("read", "--node", node, head1.core.packet_id.hex()[:8], "-o", str(out)) == 2
        assert f"packet {head1.core.packet_id.hex()} from DEU was erased from this inbox" in capsys.readouterr().err
        assert not out.exists()

        # The broker pushes the erased packet again (as it does when an acknowledgement was lost): the node
        # acknowledges it, and neither keeps it again nor lists it.
        await _received(broker, 20, first, head1)
        assert not _inbox_file(world, head1).exists()
        row = h.daemon.store.inbox_get(head1.digest)
        assert row is not None
        assert row.erased == NOW
        assert list((Path(node) / "tmp").iterdir()) == []  # the spooled copy is gone too

        # Erasing it again names it as erased before.
        assert await cli("erase", "--node", node, head1.core.packet_id.hex()[:8], "--json") == 0
        told = json.loads(capsys.readouterr().out)
        assert (told["count"], told["already"]) == (0, [head1.core.packet_id.hex()])
        nursery.cancel_scope.cancel()
    h.daemon.store.close()

    # With the daemon stopped: done here, under the daemon's lock, and refused while a daemon holds it.
    home = world["home"]
    with DaemonLock(home.lock_path, "node daemon"):
        assert await cli("erase", "--node", node, "--before", str(NOW + 1)) == 2
        assert "another node daemon is running" in capsys.readouterr().err
    # And a daemon started while an offline erase holds the lock is told who holds it.
    with DaemonLock(home.lock_path, "node daemon", holder="valise erase"):
        assert await cli("node", "run", "--dir", node) == 2
        assert f"another node daemon is running on {node} (valise erase, pid {os.getpid()})" in capsys.readouterr().err
    assert _inbox_file(world, head3).exists()
    # A dry run with the daemon stopped only reads: the store is not even opened for writing.
    db = Path(node) / "node.db"
    before = db.read_bytes()
    assert await cli("erase", "--node", node, "--before", str(NOW + 1), "--dry-run") == 0
    assert "would erase 1 packet(s)" in capsys.readouterr().out
    assert db.read_bytes() == before
    assert await cli("erase", "--node", node, "--before", str(NOW + 1), "--json") == 0
    told = json.loads(capsys.readouterr().out)
    assert (told["count"], told["ids"]) == (1, [head3.core.packet_id.hex()])
    assert not _inbox_file(world, head3).exists()
    assert await cli("status", "--node", node, "--json") == 3
    told = json.loads(capsys.readouterr().out)
    assert (told["inbox"], told["inbox_erased"]) == ({}, 3)


def test_an_erase_interrupted_before_its_files_went_is_finished_when_the_store_opens_again(
    tmp_path: Path,
) -> None:
    """The rows are marked first, with the list of files to remove; a crash before the files go leaves the list,
    and the next open finishes it (the other order could leave a row promising a file no longer there)."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "outbox").mkdir()
    (tmp_path / "tmp").mkdir()
    store = NodeStore.open(tmp_path)
    digest, other = bytes(range(32)), bytes(32)
    for d in (digest, other):
        assert store.inbox_add(d, d[:16], "DEU", NOW, {"tlp": "AMBER"}, b"ciphertext")
    # What inbox_erase commits before it removes anything: the mark and the list.
    store._db.execute("UPDATE inbox SET erased = ? WHERE digest = ?", (NOW, digest))
    store.put(ERASING, digest.hex().encode())
    store.close()
    assert store.inbox_path(digest).exists()

    store = NodeStore.open(tmp_path)
    assert not store.inbox_path(digest).exists()
    assert store.inbox_path(other).exists()
    assert store.get(ERASING) is None
    assert store.inbox_counts() == ({"new": 1}, 1)
    store.close()


async def test_packets_two_senders_gave_one_id_are_told_apart_by_sender_in_read_and_erase(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The broker refuses an id a sender used before, not one another member used: a hostile member can copy the
    id of a packet it received. More digits cannot tell the two apart at a recipient; the sender can."""
    fra, deu, ita = members["FRA"], members["DEU"], members["ITA"]
    world["log"].admit(ita)
    h = Harness(world, fra)
    node = str(world["home"].root)
    (from_deu, deu_head), (from_ita, ita_head) = sealed(deu, [fra], b"same id"), sealed(ita, [fra], b"same id")
    pid = deu_head.core.packet_id.hex()
    assert ita_head.core.packet_id.hex() == pid
    assert ita_head.digest != deu_head.digest
    out = tmp_path / "out.bin"
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        await _received(broker, 0, from_deu, deu_head)
        await _received(broker, 1, from_ita, ita_head)

        assert await cli("read", "--node", node, pid, "-o", str(out)) == 2
        err = capsys.readouterr().err
        assert f"2 packets in the inbox have the id {pid}, from DEU, ITA" in err
        assert "--from MEMBER" in err
        assert await cli("read", "--node", node, pid, "--from", "ITA", "-o", str(out), "--json") == 0
        assert json.loads(capsys.readouterr().out)["from"] == "ITA"
        assert await cli("read", "--node", node, pid, "--from", "NGA", "-o", str(out)) == 2
        assert f"no packet {pid} in the inbox from NGA" in capsys.readouterr().err

        assert await cli("erase", "--node", node, pid, "--dry-run") == 2
        assert "--from MEMBER" in capsys.readouterr().err
        assert await cli("erase", "--node", node, pid, "--from", "DEU", "--json") == 0
        assert json.loads(capsys.readouterr().out)["count"] == 1
        assert not _inbox_file(world, deu_head).exists()
        assert _inbox_file(world, ita_head).exists()
        # The one still held is named by its id alone again: an erased packet does not make an id ambiguous.
        assert await cli("read", "--node", node, pid[:8], "-o", str(out), "--json") == 0
        assert json.loads(capsys.readouterr().out)["from"] == "ITA"
        nursery.cancel_scope.cancel()
    h.daemon.store.close()

    # With the daemon stopped, the same: read here with the member's key, erase under the daemon's lock.
    assert await cli("read", "--node", node, pid, "--from", "ITA", "-o", str(out), "--json") == 0
    assert json.loads(capsys.readouterr().out)["from"] == "ITA"
    assert await cli("erase", "--node", node, "--before", str(NOW + 1), "--from", "DEU", "--json") == 0
    assert json.loads(capsys.readouterr().out)["count"] == 0  # DEU's is erased already; ITA's is not DEU's
    assert await cli("erase", "--node", node, "--before", str(NOW + 1), "--from", "ITA", "--json") == 0
    assert json.loads(capsys.readouterr().out)["ids"] == [pid]
    assert not _inbox_file(world, ita_head).exists()
