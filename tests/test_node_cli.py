"""`valise send|inbox|read|status` through a running node daemon's real control socket (the CLI runs in a thread,
as its own `trio.run`), with the scripted broker of test_node_daemon on the other side."""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from valise import identity, keyfiles, packet, records
from valise.cli.main import main
from valise.cli.node import call
from valise.daemonlock import DaemonLock
from valise.errors import UsageError
from valise.node.daemon import NodeDaemon
from valise.policy import records as policy_records
from valise.wire import events as ev

from .conftest import NOW, seeded_random
from .test_node_daemon import BROKER_ID, ORIGIN, Harness, ScriptedBroker, seal, wait_for, world  # noqa: F401


async def cli(*argv: str) -> int:
    return await trio.to_thread.run_sync(main, list(argv))


def receipt(index: int, digest: bytes, packet_id: bytes = bytes(16), signer: identity.Identity = BROKER_ID) -> bytes:
    """The broker's receipt for FRA's retraction of a packet (its digest and id) or statement (its id)."""
    return records.Receipt.make(signer.signing, ORIGIN, index, digest, packet_id, "FRA", NOW).raw


def unreachable_daemon(world: dict[str, Any], me: identity.Identity) -> NodeDaemon:  # noqa: F811
    """A node daemon on the world's directory whose broker refuses every connection."""

    async def refuse() -> trio.abc.Stream:
        raise OSError("connection refused")

    return NodeDaemon(world["home"], me, connector=refuse, random=seeded_random(b"x"), wall=lambda: NOW)


async def serve_daemon(nursery: trio.Nursery, h: Harness) -> ScriptedBroker:
    h.nursery = nursery
    await nursery.start(h.daemon.run)
    broker = await h.accepted.receive()
    await h.daemon.connected_event.wait()
    await wait_for(lambda: h.daemon.follower.size == h.log.service.store.size())
    return broker


async def answer_submission(broker: ScriptedBroker, h: Harness, deny: str | None = None) -> None:
    begin = await broker.expect(ev.SubmitBegin)
    head = packet.parse_head(begin.head)
    assert isinstance(head, packet.Head)
    if deny:
        await broker.send(ev.Deny(begin.rid, head.core.packet_id, (ev.DenyReason("DEU", deny),)))
        while not isinstance(await broker.events.receive(), ev.SubmitCancel | ev.SubmitEnd):
            pass
        return
    while not isinstance(msg := await broker.events.receive(), ev.SubmitEnd):
        assert isinstance(msg, ev.SubmitChunk)
    index = h.log.service.store.size()
    h.log.add(records.packet_entry(head.header.raw, head.signature, NOW))
    receipt = records.Receipt.make(BROKER_ID.signing, ORIGIN, index, head.digest, head.core.packet_id, "FRA", NOW)
    await broker.send(ev.Receipt(begin.rid, head.core.packet_id, index, head.digest, receipt.raw))


async def test_send_prints_the_id_and_the_receipt_or_the_denial(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    h = Harness(world, members["FRA"])
    node = str(world["home"].root)
    payload = tmp_path / "bundle.json"
    payload.write_text(json.dumps({"type": "bundle", "id": "bundle--" + "0" * 36, "objects": []}))
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        nursery.start_soon(answer_submission, broker, h)
        code = await cli("send", "--node", node, "--to", "DEU", "--tlp", "AMBER", "--category", "malware", str(payload))
        out = capsys.readouterr().out.splitlines()
        assert code == 0
        assert out[1] == "relayed: log index 3"
        (row,) = h.daemon.store.outbox_all()
        assert out[0] == row.packet_id.hex()
        nursery.start_soon(answer_submission, broker, h, "DEU accepts up to TLP:GREEN only")
        code = await cli("send", "--node", node, "--to", "DEU", "--tlp", "RED", str(payload))
        captured = capsys.readouterr()
        assert code == 3
        assert "denied for DEU: DEU accepts up to TLP:GREEN only" in captured.err
        # A reason the broker wrote to move the cursor and forge a success line is shown, not obeyed.
        nursery.start_soon(answer_submission, broker, h, "no\x1b[1A\x1b[2K\rrelayed: log index 42")
        assert await cli("send", "--node", node, "--to", "DEU", "--tlp", "RED", str(payload)) == 3
        captured = capsys.readouterr()
        assert "denied for DEU: no\\x1b[1A\\x1b[2K\\x0drelayed: log index 42" in captured.err
        assert "\x1b" not in captured.err
        code = await cli("send", "--node", node, "--to", "NGA", "--tlp", "RED", str(payload))
        assert code == 2
        assert "not in the verified directory: NGA" in capsys.readouterr().err
        assert await cli("send", "--node", node, "--to", "FRA", "--tlp", "RED", str(payload)) == 2
        assert "FRA cannot send to itself" in capsys.readouterr().err  # found here, not denied by the broker
        # --json: stdout is one JSON value (the id printed before it made it unparseable).
        nursery.start_soon(answer_submission, broker, h)
        code = await cli("send", "--node", node, "--to", "DEU", "--tlp", "AMBER", "--json", str(payload))
        assert code == 0
        reply = json.loads(capsys.readouterr().out)
        assert (reply["state"], reply["index"]) == ("receipted", 4)
        assert bytes.fromhex(reply["id"]) in {r.packet_id for r in h.daemon.store.outbox_all()}

        # What became of each packet sent, one by one (status only counts them).
        assert await cli("outbox", "--node", node, "--json") == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(it["state"], it["index"]) for it in listed] == [
            ("receipted", 3), ("denied", None), ("denied", None), ("receipted", 4),
        ]  # fmt: skip
        assert listed[1]["reasons"] == {"DEU": "DEU accepts up to TLP:GREEN only"}
        assert (listed[0]["id"], listed[0]["to"], listed[0]["acked_by"]) == (row.packet_id.hex(), ["DEU"], [])
        assert await cli("outbox", "--node", node) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].endswith("relayed (log index 3); not acknowledged yet")
        assert lines[1].endswith("denied: DEU: DEU accepts up to TLP:GREEN only")
        assert "\x1b" not in lines[2]  # the broker's words are shown, not obeyed, here too

        # Retracting it; then again, which says it is a repeat (and asks the broker nothing).
        async def retracted() -> None:
            msg = await broker.expect(ev.Retract)
            sent = h.daemon.store.outbox_get(msg.id)
            assert sent is not None
            await broker.send(ev.RetractResult(msg.rid, 5, receipt(5, sent.digest, msg.id)))

        nursery.start_soon(retracted)
        assert await cli("retract", "--node", node, reply["id"]) == 0
        assert capsys.readouterr().out == f"retracted {reply['id']}: log index 5\n"
        assert await cli("retract", "--node", node, reply["id"], "--json") == 0
        assert json.loads(capsys.readouterr().out) == {
            "id": reply["id"], "index": 5, "already": True, "cancelled": False,
        }  # fmt: skip
        nursery.cancel_scope.cancel()


async def test_send_while_the_broker_is_unreachable_queues_durably(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # First follow the log once, so the directory is known; then the broker goes away.
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        await serve_daemon(nursery, h)
        nursery.cancel_scope.cancel()
    h.daemon.store.close()

    daemon = unreachable_daemon(world, members["FRA"])
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"\x00" * 5000)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        code = await cli("send", "--node", str(world["home"].root), "--to", "DEU", "--tlp", "GREEN", "--wait", "1",
                         str(payload))  # fmt: skip
        out = capsys.readouterr().out.splitlines()
        assert code == 0
        assert out[1].startswith("queued, not connected to the broker (")  # and why: here, refused
        assert "connection refused" in out[1]
        (row,) = daemon.store.outbox_all()
        assert row.state == "queued"
        assert daemon.store.outbox_path(row.packet_id).stat().st_size == row.size
        code = await cli("status", "--node", str(world["home"].root), "--json")
        status = json.loads(capsys.readouterr().out)
        assert (status["connected"], status["outbox"], status["log"]["size"]) == (False, {"queued": 1}, 3)
        assert "connection refused" in status["last_error"]

        # The wrong file, say: retracted while it waits, it is withdrawn here and never leaves the node.
        code = await cli(
            "retract", "--node", str(world["home"].root), row.packet_id.hex()[:8], "--reason", "wrong file"
        )
        assert code == 0
        assert (
            capsys.readouterr().out
            == f"cancelled {row.packet_id.hex()}: it was still queued, never sent, and now will not be\n"
        )
        (row,) = daemon.store.outbox_all()
        assert row.state == "denied"
        assert not daemon.store.outbox_path(row.packet_id).exists()
        assert daemon.store.outbox_due(NOW + 10**6) == []
        code = await cli("retract", "--node", str(world["home"].root), row.packet_id.hex(), "--json")
        assert code == 2
        assert "is denied; only a relayed packet can be retracted" in capsys.readouterr().err
        nursery.cancel_scope.cancel()


async def test_inbox_and_read_stream_the_plaintext(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    h = Harness(world, members["FRA"])
    plaintext = bytes(range(256)) * 4000  # over one control chunk
    buf = io.BytesIO()
    packet.seal(io.BytesIO(plaintext), buf, sender=members["DEU"], recipients=[members["FRA"].bundle], tlp="GREEN",
                categories=["phishing"], now=NOW, random=seeded_random(b"r"))  # fmt: skip
    data = buf.getvalue()
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        await broker.send(ev.DeliverBegin(0, data[: head.head_size], len(data) - head.head_size))
        pos = head.head_size
        while pos < len(data):
            room = min(broker.conn.send_window, 256 * 1024, len(data) - pos)
            if room == 0:
                await broker.expect(ev.Credit)
                continue
            await broker.send(ev.DeliverChunk(0, data[pos : pos + room]))
            pos += room
        await broker.send(ev.DeliverEnd(0))
        while not isinstance(await broker.events.receive(), ev.Ack):
            pass
        node = str(world["home"].root)
        assert await cli("inbox", "--node", node, "--json") == 0
        (item,) = json.loads(capsys.readouterr().out)
        assert (item["from"], item["labels"]["categories"], item["state"]) == ("DEU", ["phishing"], "new")
        out = tmp_path / "out.bin"
        assert await cli("read", "--node", node, item["id"][:8], "-o", str(out)) == 0
        assert out.read_bytes() == plaintext
        reply = await call(world["home"].root, {"op": "inbox"})
        assert reply["items"][0]["state"] == "read"
        assert await cli("read", "--node", node, "ffff", "-o", str(tmp_path / "none")) == 2
        assert not (tmp_path / "none").exists()
        capsys.readouterr()
        # Where the plaintext cannot go: a clear error, found before anything is decrypted.
        for target, why in ((tmp_path / "missing" / "out.bin", "No such file or directory"), (tmp_path, "directory")):
            assert await cli("read", "--node", node, item["id"][:8], "-o", str(target)) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"valise: error: cannot write {target}")
            assert why in err
        # Only its sender can retract it, and the error says so rather than "not in the outbox".
        assert await cli("retract", "--node", node, item["id"][:8]) == 2
        assert f"packet {item['id'][:8]} is one this member received: only its sender" in capsys.readouterr().err
        # Once its sender retracts it, a script reading it into its intake is stopped; a person may insist.
        retraction = records.Retraction.make(
            members["DEU"].signing, head.core.packet_id, head.digest, "DEU", "wrong desk", NOW
        )
        await broker.send(ev.RetractForward(1, head.core.packet_id, "DEU", 9, retraction.raw))
        await broker.expect(ev.Seen)
        again = tmp_path / "again.bin"
        assert await cli("read", "--node", node, item["id"][:8], "-o", str(again)) == 2
        err = capsys.readouterr().err
        assert f"packet {item['id']} was retracted by its sender: wrong desk" in err
        assert "--force" in err
        assert not again.exists()
        assert await cli("read", "--node", node, item["id"][:8], "-o", str(again), "--force") == 0
        assert again.read_bytes() == plaintext
        nursery.cancel_scope.cancel()
    h.daemon.store.close()
    capsys.readouterr()
    # With the daemon stopped, what was received stays readable (the key unlocked here), and the same rules hold.
    offline = tmp_path / "offline.bin"
    assert await cli("read", "--node", node, item["id"][:8], "-o", str(offline)) == 2
    assert "was retracted by its sender: wrong desk" in capsys.readouterr().err
    assert await cli("read", "--node", node, item["id"][:8], "-o", str(offline), "--force", "--json") == 0
    assert offline.read_bytes() == plaintext
    out, err = capsys.readouterr()
    assert json.loads(out)["from"] == "DEU"
    assert "read with the node daemon stopped; it is not marked as read" in err
    # A packet file lost from inbox/: the error names it, not the output file being written.
    kept = next((world["home"].root / "inbox").glob("*.pkt"))
    kept.unlink()
    assert await cli("read", "--node", node, item["id"][:8], "-o", str(offline), "--force") == 1
    err = capsys.readouterr().err
    assert f"the inbox file of this packet, {kept}, cannot be read: No such file or directory" in err
    assert "cannot write" not in err
    assert offline.read_bytes() == plaintext  # the earlier output is left as it was


async def test_a_packet_received_in_time_stays_readable_after_it_expires(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`expires` bounds a packet's delivery, not how long its recipient may read it: the inbox keeps it until its
    operator erases it, and it opens as it did on the day it came (before, `read` said "packet expired" once the
    sender's 30 days had passed, with the daemon running and with it stopped). Nor can a clock make a packet the
    node acknowledged unreadable: one from a sender 400 s fast (the broker takes ±600 s) is dated in the future
    by this node's clock, and a review found it refused for good, "check both clocks"."""
    h = Harness(world, members["FRA"])
    packets = []
    for created, expires, text in ((NOW, NOW + 3600, b"a report"), (NOW + 400, None, b"from a fast clock")):
        buf = io.BytesIO()
        packet.seal(io.BytesIO(text), buf, sender=members["DEU"], recipients=[members["FRA"].bundle],
                    tlp="AMBER", now=created, expires=expires, random=seeded_random(text))  # fmt: skip
        head = packet.parse_head(buf.getvalue())
        assert isinstance(head, packet.Head)
        packets.append((buf.getvalue(), head, text))
    node, out = str(world["home"].root), tmp_path / "out.bin"
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        for seq, (data, head, _) in enumerate(packets):
            await broker.send(ev.DeliverBegin(seq, data[: head.head_size], len(data) - head.head_size))
            await broker.send(ev.DeliverChunk(seq, data[head.head_size :]))
            await broker.send(ev.DeliverEnd(seq))
            assert (await broker.expect(ev.Ack)).seq == seq
        (_, fast, text) = packets[1]
        assert await cli("read", "--node", node, fast.core.packet_id.hex(), "-o", str(out)) == 0
        assert out.read_bytes() == text
        h.daemon.wall = lambda: NOW + 40 * 86_400  # weeks later
        (_, head, text) = packets[0]
        assert await cli("read", "--node", node, head.core.packet_id.hex(), "-o", str(out), "--json") == 0
        assert out.read_bytes() == text
        assert json.loads(capsys.readouterr().out)["expires"] == NOW + 3600
        nursery.cancel_scope.cancel()
    h.daemon.store.close()
    # With the daemon stopped, read at this machine's time, long after NOW + 3600.
    for _, head, text in packets:
        out.unlink()
        assert await cli("read", "--node", node, head.core.packet_id.hex(), "-o", str(out)) == 0
        assert out.read_bytes() == text


async def test_status_and_inbox_report_a_stopped_daemon_from_its_store(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A stopped daemon is when its alarms and its outbox matter most: `status` and `inbox` read them from the
    directory (exit 3 from status says the daemon is not running); commands that need the daemon still refuse."""
    h = Harness(world, members["FRA"])
    node = str(world["home"].root)
    payload = tmp_path / "bundle.json"
    payload.write_text("{}")
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)
        nursery.start_soon(answer_submission, broker, h)
        assert await cli("send", "--node", node, "--to", "DEU", "--tlp", "AMBER", str(payload)) == 0
        capsys.readouterr()
        h.daemon.alarm("receipt", "a receipt that does not match")
        assert await cli("status", "--node", node, "--json") == 0
        live = json.loads(capsys.readouterr().out)
        assert await cli("inbox", "--node", node, "--json") == 0
        live_inbox = json.loads(capsys.readouterr().out)
        assert await cli("outbox", "--node", node, "--json") == 0
        live_outbox = json.loads(capsys.readouterr().out)
        nursery.cancel_scope.cancel()
    h.daemon.store.close()
    db = world["home"].root / "node.db"
    before = db.read_bytes()

    assert await cli("status", "--node", node, "--json") == 3
    stored = json.loads(capsys.readouterr().out)
    assert (live["running"], stored["running"], stored["connected"]) == (True, False, False)
    assert stored["hint"] == f"start it: valise node run --dir {node}"
    for key in ("member", "log", "trusted", "outbox", "acknowledgements", "inbox", "alarms", "alarms_total"):
        assert stored[key] == live[key], key
    assert stored["outbox"] == {"receipted": 1}
    assert stored["alarms"][0]["message"] == "a receipt that does not match"
    assert await cli("status", "--node", node) == 3
    out = capsys.readouterr().out
    assert f"daemon     not running (start it: valise node run --dir {node}); below is what it stored" in out
    assert "ALARM receipt: a receipt that does not match" in out
    assert await cli("inbox", "--node", node, "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == live_inbox
    assert "the node daemon is not running" in captured.err
    assert await cli("outbox", "--node", node, "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == live_outbox
    assert [it["state"] for it in live_outbox] == ["receipted"]
    assert "the node daemon is not running" in captured.err
    assert db.read_bytes() == before  # read-only: a report writes nothing
    assert await cli("send", "--node", node, "--to", "DEU", "--tlp", "AMBER", str(payload)) == 1
    assert "the node daemon is not running" in capsys.readouterr().err

    # A saved log state the daemon could not rebuild from (so it would not start): the alarms and queues still
    # show, with why the log does not.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE kv SET v = x'00' WHERE k = 'follower'")
    conn.close()
    assert await cli("status", "--node", node, "--json") == 3
    damaged = json.loads(capsys.readouterr().out)
    assert damaged["log"]["error"].startswith("the verified log cannot be rebuilt: saved follower state is damaged")
    assert (damaged["alarms"], damaged["outbox"]) == (stored["alarms"], stored["outbox"])
    assert await cli("status", "--node", node) == 3
    assert "log        the verified log cannot be rebuilt" in capsys.readouterr().out


async def test_a_second_daemon_on_the_same_directory_is_refused(world: dict[str, Any]) -> None:  # noqa: F811
    home = world["home"]
    with (
        DaemonLock(home.lock_path, "node daemon"),
        pytest.raises(UsageError, match="another node daemon"),
        DaemonLock(home.lock_path, "node daemon"),
    ):
        pass


async def test_statements_are_signed_by_the_daemon_and_sent(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)

        async def answer() -> None:
            stmt = await broker.expect(ev.Statement)
            record = policy_records.parse_policy(stmt.statement)
            record.verify(members["FRA"].bundle.sign_key, what="grant")
            assert (record.kind, record.body["to"], record.body["origin"]) == ("grant", "DEU", ORIGIN)
            await broker.send(ev.StatementResult(stmt.rid, 42, receipt(42, record.id)))
            stmt = await broker.expect(ev.Statement)
            await broker.send(ev.ErrorMessage(stmt.rid, "refused", "replayed statement"))

        nursery.start_soon(answer)
        reply = await call(
            world["home"].root, {"op": "statement", "build": {"kind": "grant", "to": "DEU", "tlp": "AMBER"}}
        )
        assert (reply["ok"], reply["index"]) == (True, 42)
        signed = policy_records.grant(
            members["FRA"].signing, origin=ORIGIN, author="FRA", created=NOW, to="DEU", tlp="GREEN"
        )
        reply = await call(world["home"].root, {"op": "statement", "statement": signed})
        assert reply["ok"] is False
        assert reply["error"] == "the broker refused: replayed statement"  # not "refused (refused)"
        other = policy_records.grant(
            members["DEU"].signing, origin=ORIGIN, author="DEU", created=NOW, to="FRA", tlp="RED"
        )
        reply = await call(world["home"].root, {"op": "statement", "statement": other})
        assert (reply["ok"], reply["code"]) == (False, 2)  # only this member's own statements
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("bad", ["wrong signer", "wrong index", "another statement"])
async def test_a_statement_receipt_that_does_not_hold_is_an_alarm_not_a_success(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    bad: str,
) -> None:
    """A fuzzing review: the receipts for statements and retractions were never read (only packets' were). One
    signed by another key, or naming another index or statement, is now an alarm, and the request fails."""
    h = Harness(world, members["FRA"])
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon(nursery, h)

        async def answer() -> None:
            stmt = await broker.expect(ev.Statement)
            record_id = policy_records.parse_policy(stmt.statement).id
            raw = {
                "wrong signer": receipt(42, record_id, signer=members["DEU"]),
                "wrong index": receipt(41, record_id),
                "another statement": receipt(42, bytes(32)),
            }[bad]
            await broker.send(ev.StatementResult(stmt.rid, 42, raw))

        nursery.start_soon(answer)
        reply = await call(
            world["home"].root, {"op": "statement", "build": {"kind": "grant", "to": "DEU", "tlp": "AMBER"}}
        )
        assert reply["ok"] is False
        assert "the broker's receipt for grant statement" in reply["error"]
        (alarm,) = h.daemon.store.alarms()
        assert alarm.kind == "receipt"
        assert alarm.message.startswith("bad receipt for grant statement")
        nursery.cancel_scope.cancel()


async def test_an_identical_statement_in_force_is_refused_and_a_revoke_names_what_still_allows(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
) -> None:
    """A grant run twice (after a timeout, say) left two; revoking "the grant" then left the other in force, and
    the member went on sharing. The node refuses the second unless told --again, and a revoke says what remains."""
    h = Harness(world, members["FRA"])
    node = world["home"].root
    first = policy_records.grant(
        members["FRA"].signing, origin=ORIGIN, author="FRA", created=NOW - 60, to="DEU", tlp="AMBER"
    )
    h.log.add(first)
    first_id = policy_records.parse_policy(first).id
    async with trio.open_nursery() as nursery:
        broker = await serve_daemon_at(nursery, h, 4)  # the first grant is in force
        grant = {"op": "statement", "build": {"kind": "grant", "to": "DEU", "tlp": "AMBER"}}
        reply = await call(node, grant)
        assert (reply["ok"], reply["code"]) == (False, 2)
        assert f"an identical grant is already in force: {first_id.hex()[:8]}" in reply["error"]

        async def logged() -> None:  # the broker takes the statement and logs it, as a real one would
            stmt = await broker.expect(ev.Statement)
            index = h.log.service.store.size()
            h.log.add(stmt.statement)
            record = policy_records.parse_policy(stmt.statement)
            await broker.send(ev.StatementResult(stmt.rid, index, receipt(index, record.id)))

        nursery.start_soon(logged)
        reply = await call(node, {**grant, "again": True})
        assert reply["ok"] is True
        second = reply["statement"]
        # Retried before the node's verified log shows the second (a checkpoint, or a quorum, away): refused too.
        reply = await call(node, grant)
        assert (reply["ok"], reply["code"]) == (False, 2)
        assert f"{second[:8]}… (sent, not yet in this node's verified log)" in reply["error"]
        assert h.daemon.session is not None
        await h.daemon.sync(h.daemon.session)
        nursery.start_soon(logged)
        revoke = {"op": "statement", "build": {"kind": "revoke", "statement": first_id.hex()[:8]}}  # a prefix
        reply = await call(node, revoke)
        assert reply["ok"] is True
        assert [s.split()[0] for s in reply["still_in_force"]] == [second[:8] + "…"]
        await h.daemon.sync(h.daemon.session)
        reply = await call(node, revoke)
        assert (reply["ok"], reply["code"]) == (False, 2)
        assert f"statement {first_id.hex()[:8]} is revoked already" in reply["error"]
        # A whole id is the broker's to judge: signed and sent even though this node has never seen it.
        unknown = bytes(range(32))

        async def judged() -> None:
            stmt = await broker.expect(ev.Statement)
            assert policy_records.parse_policy(stmt.statement).body["statement"] == unknown
            await broker.send(ev.ErrorMessage(stmt.rid, "refused", "no statement " + unknown.hex()[:8]))

        nursery.start_soon(judged)
        reply = await call(node, {"op": "statement", "build": {"kind": "revoke", "statement": unknown.hex()}})
        assert reply["error"] == "the broker refused: no statement 00010203"
        nursery.cancel_scope.cancel()


async def test_a_member_operator_asks_its_own_node_about_the_policy(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`policy show|explain|matrix --node`: a national node's operator has no broker directory, but its node holds
    the verified policy; with the daemon running or not."""
    h = Harness(world, members["FRA"])
    fra, deu = members["FRA"].signing, members["DEU"].signing
    h.log.add(policy_records.grant(fra, origin=ORIGIN, author="FRA", created=NOW, to="DEU", tlp="AMBER"))
    h.log.add(policy_records.accept(deu, origin=ORIGIN, author="DEU", created=NOW, source="FRA", tlp="AMBER"))
    node = str(world["home"].root)
    explain = ("policy", "explain", "--node", node, "--from", "FRA", "--to", "DEU", "--at", str(NOW))
    async with trio.open_nursery() as nursery:
        await serve_daemon_at(nursery, h, 5)
        assert await cli(*explain, "--tlp", "AMBER") == 0
        assert "FRA -> DEU: allow: allowed by FRA's grant" in capsys.readouterr().out
        nursery.cancel_scope.cancel()
    h.daemon.store.close()
    assert await cli(*explain, "--tlp", "RED") == 3  # the daemon is stopped: the store answers all the same
    assert "FRA -> DEU: DENY" in capsys.readouterr().out
    assert await cli("policy", "show", "--node", node, "--json") == 0
    facts = json.loads(capsys.readouterr().out)
    assert sorted(m["id"] for m in facts["members"]) == ["DEU", "FRA"]
    assert sorted(s["kind"] for s in facts["statements"]) == ["accept", "grant"]
    assert await cli("policy", "show", "--node", node, "--verify") == 2  # the node checked them as it followed
    capsys.readouterr()
    assert await cli("policy", "matrix", "--node", node, "--at", str(NOW), "--json") == 0
    channels = json.loads(capsys.readouterr().out)["channels"]
    assert [(c["from"], c["to"], c["tlp"]) for c in channels] == [("FRA", "DEU", "AMBER")]


async def serve_daemon_at(nursery: trio.Nursery, h: Harness, size: int) -> ScriptedBroker:
    h.nursery = nursery
    await nursery.start(h.daemon.run)
    broker = await h.accepted.receive()
    await wait_for(lambda: h.daemon.follower.size == size)
    return broker


async def test_a_stopped_node_is_pointed_at_its_broker_s_new_address(
    world: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The broker moved to another port (or was re-keyed): a node could only be made again, losing its outbox
    and inbox, or its config.json edited by hand."""
    home = world["home"]
    node = str(home.root)
    with DaemonLock(home.lock_path, "node daemon"):  # running: it would go on with the old address
        assert await cli("node", "move", "--dir", node, "--broker", "127.0.0.1:7444") == 2
        assert "node daemon" in capsys.readouterr().err
    assert (home.config().broker_host, home.config().broker_port) == ("127.0.0.1", 9)
    assert await cli("node", "move", "--dir", node, "--broker", "broker.example:7444", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {
        "dir": node, "broker": "broker.example:7444", "identity": str((tmp_path / "keys").resolve()),
    }  # fmt: skip
    assert (home.config().broker_host, home.config().broker_port) == ("broker.example", 7444)
    assert home.config().log_vkey == world["log"].vkey  # the trust anchor does not move
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"not a bundle")
    before = home.broker_bundle_path.read_bytes()
    assert await cli("node", "move", "--dir", node, "--broker-pub", str(bad)) == 1
    assert home.broker_bundle_path.read_bytes() == before
    assert await cli("node", "move", "--dir", node) == 2


async def test_a_node_whose_identity_moved_is_pointed_at_it_and_told_how(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A walkthrough moved a node and its keys: `node run` said "identity directory ... does not exist (create one
    with valise keygen)", advice that makes a new identity the broker does not know, and `node move` could not
    change the path (config.json had to be edited by hand)."""
    home = world["home"]
    node = str(home.root)
    moved = tmp_path / "moved-keys"
    (tmp_path / "keys").rename(moved)
    assert await cli("node", "run", "--dir", node) == 1
    err = capsys.readouterr().err
    assert f"the node's identity directory {(tmp_path / 'keys').resolve()} does not exist" in err
    assert f"valise node move --dir {node} --identity DIR" in err
    assert "not valise keygen" in err
    keyfiles.save_identity(tmp_path / "deu-keys", members["DEU"], None)
    assert await cli("node", "move", "--dir", node, "--identity", str(tmp_path / "deu-keys")) == 2
    assert "holds DEU's identity; this node is FRA's" in capsys.readouterr().err
    assert await cli("node", "move", "--dir", node, "--identity", str(moved)) == 0
    assert f"identity in {moved.resolve()}" in capsys.readouterr().out
    assert home.config().identity_dir == moved.resolve()
    assert home.load_identity(None).member_id == "FRA"


async def test_a_member_its_verified_log_shows_suspended_is_told_so_at_send(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A walkthrough's suspended member got "queued", exit 0, for packets the broker would never take (it refuses
    the member's certificate). The node's verified log says why, so `send` says it at once."""
    log = world["log"]
    log.seq += 1
    log.add(policy_records.dir_record(log.operator, ORIGIN, log.seq, NOW, "member-suspend", id="FRA", reason="audit"))
    h = Harness(world, members["FRA"])
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"indicator")
    async with trio.open_nursery() as nursery:
        await serve_daemon_at(nursery, h, log.service.store.size())
        assert await cli("send", "--node", str(world["home"].root), "--to", "DEU", "--tlp", "GREEN", str(payload)) == 2
        err = capsys.readouterr().err
        assert "FRA is suspended in the verified log (audit): the broker takes nothing from it" in err
        assert "valise broker member reinstate" in err
        assert h.daemon.store.outbox_all() == []
        nursery.cancel_scope.cancel()


async def test_node_init_refuses_a_directory_whose_control_socket_path_run_would_refuse(
    members: dict[str, identity.Identity], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keyfiles.save_identity(tmp_path / "keys", members["FRA"], None)
    (tmp_path / "broker.pub").write_bytes(BROKER_ID.bundle.raw)
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    keys, pub = str(tmp_path / "keys"), str(tmp_path / "broker.pub")
    code = await cli("node", "init", "--dir", str(deep), "--identity", keys, "--broker", "127.0.0.1:9",
                     "--broker-pub", pub, "--log-key", "x+00000000+AA")  # fmt: skip
    assert code == 1
    assert "control socket path" in capsys.readouterr().err
    assert not (deep / "config.json").exists()
    assert await cli("keygen", "--id", "not a valid id", "--out", str(tmp_path / "k2")) == 2


@asynccontextmanager
async def node_process(world: dict[str, Any], fra: identity.Identity) -> AsyncIterator[trio.Process]:  # noqa: F811
    """`valise node run` for FRA as a real process, its broker out of reach, once its control socket is up; killed
    at the end if the test left it running. The node follows the log once first (DEU must be in its verified
    directory)."""
    import sys

    from valise.node.control import socket_path

    h = Harness(world, fra)
    async with trio.open_nursery() as nursery:
        await serve_daemon(nursery, h)
        nursery.cancel_scope.cancel()
    h.daemon.store.close()
    root = world["home"].root
    run = [sys.executable, "-m", "valise.cli.main", "node", "run", "--dir", str(root)]
    proc = await trio.lowlevel.open_process(run)
    try:
        with trio.fail_after(20):
            while not socket_path(root).exists():  # noqa: ASYNC110 - a file another process creates
                await trio.sleep(0.05)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
async def test_a_queued_packet_is_cancelled_here_only_if_the_last_run_stopped_cleanly(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    stop: str,
) -> None:
    """A daemon killed while it sent a packet left no "tried" mark (the upload's own handler never ran): after
    the restart, `retract` cancelled the packet here although the broker may have logged it, receipt lost, and be
    delivering it. After a run that did not stop cleanly every queued packet now counts as tried; after a clean
    stop nothing changes. `valise node run` as a real process (its broker out of reach), stopped either way."""
    import signal

    root = world["home"].root
    async with node_process(world, members["FRA"]) as proc:
        payload = tmp_path / "p.bin"
        payload.write_bytes(b"wrong file")
        assert await cli("send", "--node", str(root), "--to", "DEU", "--tlp", "GREEN", "--no-wait", str(payload)) == 0
        pid = capsys.readouterr().out.split()[0]
        proc.send_signal(getattr(signal, stop))
        with trio.fail_after(20):
            assert await proc.wait() == (0 if stop == "SIGTERM" else -signal.SIGKILL)

    daemon = unreachable_daemon(world, members["FRA"])
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            code = await cli("retract", "--node", str(root), pid, "--reason", "wrong file")
            said = capsys.readouterr()
            if stop == "SIGTERM":
                assert code == 0, said.err
                assert said.out.startswith(f"cancelled {pid}")
            else:
                assert code == 2
                assert "a submission of it was tried and may have reached the broker" in said.err
            nursery.cancel_scope.cancel()
    finally:
        daemon.store.close()


async def test_a_run_that_crashed_is_no_clean_stop(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A review: the run recorded a clean stop in a `finally`, so a crash counted as one. Here the broker answers
    with a receipt (it logged the packet) and recording it fails once (a disk error, say): the daemon crashes.
    The packet must not then be cancellable here as "never sent": it is counted as tried, and the stop is not
    recorded as clean, so the next run counts every queued packet as tried too."""
    import sqlite3

    from valise.node.daemon import STOPPED_CLEANLY

    h = Harness(world, members["FRA"])
    root = world["home"].root
    store = h.daemon.store
    real = store.outbox_receipted

    def failing(*_: object) -> None:  # the store write fails once
        raise sqlite3.OperationalError("disk I/O error")

    store.outbox_receipted = failing  # type: ignore[method-assign]
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"wrong file")

    async def send_and_crash() -> None:
        async with trio.open_nursery() as nursery:
            broker = await serve_daemon(nursery, h)
            nursery.start_soon(answer_submission, broker, h)
            assert await cli("send", "--node", str(root), "--to", "DEU", "--tlp", "GREEN", "--no-wait",
                             str(payload)) == 0  # fmt: skip
            await trio.sleep_forever()  # the daemon crashes

    with pytest.raises(BaseExceptionGroup) as crashed:
        await send_and_crash()
    assert crashed.group_contains(sqlite3.OperationalError, match="disk I/O error")
    store.outbox_receipted = real  # type: ignore[method-assign]
    (row,) = store.outbox_all()
    assert h.log.service.store.size() == 4  # the broker's log holds the packet
    assert (row.state, row.attempts, store.get(STOPPED_CLEANLY)) == ("queued", 1, b"\x00")
    store.close()
    capsys.readouterr()

    daemon = unreachable_daemon(world, members["FRA"])
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            code = await cli("retract", "--node", str(root), row.packet_id.hex(), "--reason", "wrong file")
            assert code == 2
            assert "may have reached the broker" in capsys.readouterr().err
            nursery.cancel_scope.cancel()
    finally:
        daemon.store.close()


async def test_a_send_waiting_for_its_answer_when_the_node_stops_is_told_its_packet_is_queued(
    world: dict[str, Any],  # noqa: F811
    members: dict[str, identity.Identity],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A concurrency review: `valise send --wait` cut off by the daemon's SIGTERM exited 1 ("closed the control
    connection without an answer") and never printed the packet id, though the packet was durably queued; a user
    who then sent it again sent it twice. `valise node run` as a real process, its broker out of reach."""
    import signal

    root = world["home"].root
    async with node_process(world, members["FRA"]) as proc:
        payload = tmp_path / "p.bin"
        payload.write_bytes(b"indicators")
        codes: list[int] = []

        async def send() -> None:
            codes.append(await cli("send", "--node", str(root), "--to", "DEU", "--tlp", "GREEN", "--wait", "60",
                                   str(payload)))  # fmt: skip

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            with trio.fail_after(20):
                while not list((root / "outbox").glob("*.pkt")):  # noqa: ASYNC110 - queued by the other process
                    await trio.sleep(0.05)
            await trio.sleep(0.2)  # the send now waits for the broker's answer
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await proc.wait() == 0
        said = capsys.readouterr()
        assert codes == [0], said.err
        pid = said.out.split()[0]
        assert len(pid) == 32
        assert "queued; the node daemon is stopping: it sends the packet when it runs again" in said.out
        assert [p.name.split(".")[0] for p in (root / "outbox").glob("*.pkt")] == [pid]
