"""`valise receipt export` end to end: a real broker (TLS on 127.0.0.1, SQLite), a real node daemon connected to it
(it witnesses the log), the real CLI over the node's control socket, and the bundle checked by `valise audit proof`
as any auditor would, with nothing but the log key."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from valise.cli.main import main
from valise.node.daemon import NodeDaemon
from valise.node.home import NodeHome
from valise.tlog import cosignature, note, proofbundle
from valise.wire import events as ev

from .harness import (
    ORIGIN,
    WireClient,
    World,
    log_vkey,
    make_world,
    running_broker,
    running_node,
    seal,
    serving_node,
)
from .test_node_daemon import wait_for


async def cli(*argv: str) -> tuple[int, str, str]:
    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    return await trio.to_thread.run_sync(run)


def witness_vkey(world: World, member: str) -> str:
    return cosignature.CosignatureVerifier(member, world.members[member].bundle.sign_key).vkey()


async def until(condition: Callable[[], object]) -> None:
    with trio.fail_after(10):  # a safety net against a hang, not a timed assertion
        while not condition():  # noqa: ASYNC110 - polling the daemon's own state
            await trio.sleep(0.05)


async def send(where: Path, tmp_path: Path) -> str:
    payload = tmp_path / "report.bin"
    payload.write_bytes(b"indicators" * 100)
    code, out, err = await cli(
        "send", "--node", str(where), "--to", "DEU", "--tlp", "AMBER", "--category", "malware", str(payload)
    )
    assert code == 0, err
    packet_id, relayed = out.splitlines()[:2]
    assert relayed.startswith("relayed: log index")
    return packet_id


async def export(where: Path, packet_id: str, out: Path) -> dict[str, Any]:
    """Export once a checkpoint covers the packet (the broker signs one every 0.2 s here)."""
    with trio.fail_after(15):  # a safety net against a hang, not a timed assertion
        while True:
            code, stdout, err = await cli(
                "receipt", "export", "--node", str(where), packet_id, "-o", str(out), "--json"
            )
            if code == 0:
                result: dict[str, Any] = json.loads(stdout)
                return result
            assert "does not cover" in err or "awaiting" in err, err
            await trio.sleep(0.1)


async def test_an_exported_receipt_verifies_offline_and_a_changed_byte_is_refused(tmp_path: Path) -> None:
    world = make_world(tmp_path / "w")
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    where = tmp_path / "n"
    bundle_file = tmp_path / "receipt.proof"
    async with running_broker(world) as broker, running_node(world, broker.port, where) as daemon:
        await until(lambda: daemon.follower.member_key("DEU"))  # the node learned DEU from the log
        packet_id = await send(where, tmp_path)
        (row,) = daemon.store.outbox_all()
        result = await export(where, packet_id, bundle_file)
        assert (result["id"], result["index"], result["entry"]) == (packet_id, row.log_index, None)
        assert result["checkpoint_size"] > row.log_index
        code, out, _ = await cli("receipt", "export", "--node", str(where), packet_id[:8], "-o", str(bundle_file))
        assert code == 0
        assert f"valise audit proof {bundle_file} --broker-key '{log_vkey(world)}'" in out
        # A packet id the outbox does not hold.
        code, _, err = await cli("receipt", "export", "--node", str(where), "ffff", "-o", str(tmp_path / "none"))
        assert code == 2
        assert "no packet ffff" in err
        assert not (tmp_path / "none").exists()
    # The broker and the node are gone: the bundle stands alone.
    vkey = log_vkey(world)
    code, out, err = await cli("audit", "proof", str(bundle_file), "--broker-key", vkey, "--json")
    assert code == 0, err
    proven = json.loads(out)
    assert (proven["type"], proven["sender"], proven["to"]) == ("pkt", "FRA", ["DEU"])
    assert (proven["index"], proven["packet_id"]) == (row.log_index, packet_id)
    assert proven["digest"] == row.digest.hex()  # what was logged is what the receipt promised
    # The bundle carries the checkpoint as the broker published it: cosigned by FRA's node, its witness.
    bundle = proofbundle.parse(bundle_file.read_bytes())
    fra = witness_vkey(world, "FRA")
    code, _, _ = await cli("audit", "proof", str(bundle_file), "--broker-key", vkey, "--witness", fra)
    assert code == 0
    assert bundle.extra is not None
    # One byte changed anywhere (the header, the entry, the index, a proof hash, the checkpoint, a signature):
    # refused every time. (A cosignature by a key the verifier was not given is ignored, as C2SP signed notes
    # require; so FRA's key is given here, which makes every line of the bundle count.)
    data = bundle_file.read_bytes()
    lines = data.split(b"\n")
    offsets = []
    pos = 0
    for line in lines:
        if line:
            offsets.append(pos + len(line) // 2)
        pos += len(line) + 1
    assert len(offsets) >= 7
    altered = tmp_path / "altered.proof"
    for offset in offsets:
        changed = bytearray(data)
        changed[offset] ^= 0x01
        altered.write_bytes(bytes(changed))
        code, _, err = await cli("audit", "proof", str(altered), "--broker-key", vkey, "--witness", fra)
        assert code != 0, f"a change at byte {offset} was accepted"
    # A bundle for another log key is refused as well.
    other = note.Ed25519Signer(ORIGIN, world.home.operator_key()).verifier().vkey()
    assert (await cli("audit", "proof", str(bundle_file), "--broker-key", other))[0] != 0


async def test_receipts_under_a_witness_quorum(tmp_path: Path) -> None:
    """FRA's node is the one witness the broker has here: a policy naming it is met, and the bundle verifies under
    that same policy file; a policy that also needs DEU (not connected, so it never cosigns) keeps every new
    checkpoint awaiting the quorum: not used, no bundle made from it."""
    world = make_world(tmp_path / "w")
    vkey = log_vkey(world)
    fra, deu = witness_vkey(world, "FRA"), witness_vkey(world, "DEU")
    only_fra = tmp_path / "fra.policy"
    only_fra.write_text(f"log {vkey}\nwitness fra {fra}\nwitness deu {deu}\nquorum fra\n")
    both = tmp_path / "both.policy"
    both.write_text(f"log {vkey}\nwitness fra {fra}\nwitness deu {deu}\ngroup both all fra deu\nquorum both\n")
    where = tmp_path / "n"
    async with running_broker(world) as broker:
        async with running_node(world, broker.port, where, policy=only_fra.read_text()) as daemon:
            # The checkpoints signed before FRA's node connected have no cosignature: none is used.
            assert daemon.follower.policy is None
            world.consent("FRA", "DEU", "AMBER", ["malware"])  # the log grows: a checkpoint FRA's node cosigns
            await until(lambda: daemon.follower.member_key("DEU"))
            first = await send(where, tmp_path)
            result = await export(where, first, tmp_path / "r.proof")
            assert (result["cosigners"], result["unchecked_cosigners"]) == (["fra"], [])
            assert daemon.follower.trusted_size >= result["checkpoint_size"]
        code, _, err = await cli("audit", "proof", str(tmp_path / "r.proof"), "--broker-key", vkey, "--policy",
                                 str(only_fra))  # fmt: skip
        assert code == 0, err
        # Read by someone who pins no witness: the cosignature is there, and said to be unchecked, not "none".
        code, out, err = await cli("audit", "proof", str(tmp_path / "r.proof"), "--broker-key", vkey, "--json")
        assert code == 0, err
        assert (json.loads(out)["cosigners"], json.loads(out)["unchecked_cosigners"]) == ([], ["FRA"])
        code, out, err = await cli("audit", "proof", str(tmp_path / "r.proof"), "--broker-key", vkey)
        assert "not checked: cosignatures by FRA" in out
        assert (await cli("node", "set-policy", "--dir", str(where), str(both)))[0] == 0
        async with serving_node(world, NodeHome.open(where)) as daemon:
            trusted = daemon.follower.trusted_size
            assert daemon.follower.member_key("DEU") is not None  # what was trusted stays trusted
            second = await send(where, tmp_path)
            await until(lambda: daemon.follower.size > trusted and daemon.quorum_wait)
            assert daemon.follower.trusted_size == trusted
            code, out, _ = await cli("status", "--node", str(where))
            assert "awaiting quorum" in out
            assert "short of the quorum 'both'" in out
            code, _, err = await cli("receipt", "export", "--node", str(where), second, "-o", str(tmp_path / "x"))
            assert code == 1
            assert "awaiting the witness quorum" in err
            assert not (tmp_path / "x").exists()
            rows = {r.packet_id.hex(): r for r in daemon.store.outbox_all()}
            assert (rows[first].in_log, rows[second].in_log) == (1, 0)  # the second receipt is not checked yet


async def test_a_member_the_broker_does_not_know_is_told_what_that_means(tmp_path: Path) -> None:
    """A node whose member was never admitted (or was removed) got only "TLSV1_ALERT_UNKNOWN_CA", every second."""
    world = make_world(tmp_path)
    world.operator("member-remove", id="FRA", reason="never admitted, in effect")
    async with running_broker(world) as broker:
        home = NodeHome.create(
            tmp_path / "node", world.dirs["FRA"], f"127.0.0.1:{broker.port}", world.home.broker_bundle_path,
            log_vkey(world), None,
        )  # fmt: skip
        daemon = NodeDaemon(home, world.members["FRA"], poll_interval=0.2)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.connection_loop)
                with trio.fail_after(10):  # a safety net against a hang, not a timed assertion
                    while daemon.last_error is None:  # noqa: ASYNC110 - state the daemon sets
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
        finally:
            daemon.store.close()
    assert "the broker does not accept this member's certificate" in daemon.last_error
    assert "valise broker member add" in daemon.last_error


async def test_a_node_restored_from_an_older_backup_alarms_for_the_packets_it_acknowledged_since(
    tmp_path: Path,
) -> None:
    """A day-2 walkthrough restored a node directory from a backup older than its last deliveries: the inbox went
    back, the broker had dropped the packets (acknowledged), their senders held the acknowledgements, and the node
    said nothing. Its own acknowledgements in the log it follows show what it has lost."""
    world = make_world(tmp_path)
    world.consent("DEU", "FRA")
    where, backup = tmp_path / "node", tmp_path / "node.bak"
    async with running_broker(world) as broker:
        async with running_node(world, broker.port, where):
            pass
        shutil.copytree(where, backup)  # the node is stopped: a whole copy
        data = seal(world, "DEU", ["FRA"], b"received after the backup")
        async with (
            serving_node(world, NodeHome.open(where)) as node,
            WireClient.connect(world, "DEU", broker.port) as deu,
        ):
            deu.refuse_cosign = True
            assert isinstance(await deu.submit(data), ev.Receipt)
            assert isinstance(await deu.next_of(ev.AckForward), ev.AckForward)  # FRA has it, and said so
            assert len(node.store.inbox_all()) == 1
        shutil.rmtree(where)
        shutil.copytree(backup, where)
        await broker.publish_checkpoint()
        async with serving_node(world, NodeHome.open(where)) as node:
            await wait_for(
                lambda: any("acknowledged are not in this node's inbox" in a.message for a in node.store.alarms())
            )
            assert node.store.inbox_all() == []
            (alarm,) = [a for a in node.store.alarms() if "acknowledged" in a.message]
            assert alarm.message.startswith("1 packet(s) this member acknowledged are not in this node's inbox")
            assert "from DEU" in alarm.message


async def test_a_node_pinned_to_another_log_key_says_so_in_an_alarm(tmp_path: Path) -> None:
    """A day-2 walkthrough pinned the wrong log key: `status` said connected, log size 0, no alarms, and `send`
    then failed with "wait until the node has followed the log". protocol.md: a refused checkpoint is an alarm."""
    from valise.crypto import sign

    world = make_world(tmp_path)
    other = note.Ed25519Signer(ORIGIN, sign.SigningKey(bytes(range(32)))).verifier().vkey()
    async with running_broker(world) as broker:
        where, broker_pub = tmp_path / "node", world.home.broker_bundle_path
        home = NodeHome.create(where, world.dirs["FRA"], f"127.0.0.1:{broker.port}", broker_pub, other, None)
        daemon = NodeDaemon(home, world.members["FRA"], poll_interval=0.2)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await wait_for(lambda: any(a.kind == "checkpoint" for a in daemon.store.alarms()))
                nursery.cancel_scope.cancel()
            (alarm,) = [a for a in daemon.store.alarms() if a.kind == "checkpoint"]
            assert alarm.message.startswith("checkpoint refused: no signature by the pinned log key")
            assert "is the node's --log-key the broker's log.vkey?" in alarm.message
            assert alarm.evidence is not None
            assert alarm.evidence.startswith(ORIGIN.encode() + b"\n")
        finally:
            daemon.store.close()


async def test_a_broker_serving_a_new_unverifiable_note_at_every_poll_raises_one_alarm(tmp_path: Path) -> None:
    """A review: each refused checkpoint was stored as an alarm with the note (up to 64 KiB) as evidence, told
    apart by a message quoting the signer names the broker chose: a new note per poll, a new row each time."""
    from valise.crypto import sign

    world = make_world(tmp_path)
    async with (
        running_broker(world) as broker,
        running_node(world, broker.port, tmp_path / "fra", poll_interval=0.02) as node,
    ):
        text = f"{ORIGIN}\n5\n" + "A" * 43 + "=\n" + "x" * 20000 + "\n"
        for i in range(20):
            signer = note.Ed25519Signer(f"forged-{i}", sign.SigningKey(bytes([i]) * 32))
            broker.published = note.sign_note(text, [signer])
            await trio.sleep(0.05)
        checkpoint_alarms = [a for a in node.store.alarms() if a.kind == "checkpoint"]
        assert len(checkpoint_alarms) == 1
        assert checkpoint_alarms[0].message.startswith("checkpoint refused: no signature by the pinned log key")
