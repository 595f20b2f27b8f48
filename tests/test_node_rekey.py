"""A member moves to new identity keys (`valise keygen --rotate`, `valise broker member rekey`): what it signed
before stays valid where the log holds it, and nothing else signed with the replaced key does.

Nodes check a sender's packets, acknowledgements and retractions against the key the verified log had in force at
their position (specs/protocol.md, "Members that move to new keys"): the fold keeps each member's replaced keys,
the follower records where packets addressed to the node are logged, and the moving member's node signs its
still-queued packets again. Real logs, real signatures; the last tests run the real broker, node and commands.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from valise import identity, keyfiles, packet, records
from valise.crypto import sign
from valise.crypto.seeded import seeded_random
from valise.errors import SignatureError
from valise.node import signers
from valise.node.daemon import NodeDaemon
from valise.node.follower import Follower
from valise.node.home import NodeHome
from valise.node.store import NodeStore
from valise.packet.format import HEADER_DOMAIN
from valise.policy import records as policy_records
from valise.store.sqlite import SqliteLog
from valise.wire import events as ev

from .conftest import NOW
from .harness import ORIGIN, WireClient, World, cli, make_world, running_broker, running_node, seal, serving_node
from .test_node_daemon import Harness, ScriptedBroker, sealed, start, wait_for

# The scripted broker's fixture (a node directory and a log), for the test of forwarded notices.
from .test_node_daemon import world as world
from .test_node_follower import ORIGIN as FOLLOWER_ORIGIN
from .test_node_follower import Log, follow, pkt_entry

M = TypeVar("M", bound=ev.Message)

# --- the fold and the follower ------------------------------------------------------------------------------


def _rekey(log: Log, old: identity.Identity, seed: bytes) -> identity.Identity:
    """Append a member-rekey record moving `old`'s member to new keys, handed over with the old key."""
    new = identity.rotate(old, seeded_random(seed), NOW + 1)
    message = policy_records.rekey_message(old.member_id, FOLLOWER_ORIGIN, new.bundle.raw)
    sig = old.signing.sign(policy_records.REKEY_DOMAIN, message)
    log.seq += 1
    log.add(policy_records.dir_record(log.operator, FOLLOWER_ORIGIN, log.seq, NOW, "member-rekey", id=old.member_id,
                                      bundle=new.bundle.raw, rekey_sig=sig))  # fmt: skip
    return new


def _digest(entry: bytes) -> bytes:
    return hashlib.sha256(records.entry_type(entry)[1]["header"]).digest()


def _retraction(signer: identity.Identity, entry: bytes) -> bytes:
    core = packet.Header.parse(records.entry_type(entry)[1]["header"]).core
    notice = records.Retraction.make(signer.signing, core.packet_id, _digest(entry), core.sender, "wrong file", NOW)
    return records.retract_entry(notice)


def test_the_follower_knows_which_key_was_in_force_where(members: dict[str, identity.Identity]) -> None:
    """Where each packet addressed to FRA and not in its inbox is logged, DEU's keys by position, and DEU's
    retractions of packets FRA holds, each checked under the key in force where it is logged: one made with the
    replaced key after the rekey (a thief's) is a problem, not a retraction."""
    fra, deu = members["FRA"], members["DEU"]
    log = Log()
    log.admit(fra)
    log.admit(deu)
    held, stolen, pending = (pkt_entry(deu, [fra], seed) for seed in (b"held", b"stolen", b"pending"))
    log.add(held, stolen, pending)
    log.add(_retraction(deu, held))
    before = log.service.store.size()
    new = _rekey(log, deu, b"DEU moved")
    log.add(_retraction(deu, stolen))  # the replaced key, after the rekey
    after = pkt_entry(new, [fra], b"after")
    note = log.add(after)
    f = _follower(log, inbox={_digest(held), _digest(stolen)})
    done = follow(f, log, note)
    assert done is not None
    expires = packet.Header.parse(records.entry_type(pending)[1]["header"]).core.expires
    last = log.service.store.size() - 1
    assert done.received == [(5, _digest(pending), expires, "DEU"), (last, _digest(after), expires, "DEU")]
    assert [r.digest for r in done.retractions] == [_digest(held)]
    ((problem, _),) = done.problems
    assert f"log entry {before + 1} is a retraction that does not verify" in problem
    assert f.identity_keys("DEU") == [new.signing.public, deu.signing.public]
    assert f.key_at("DEU", 5) == deu.signing.public
    assert f.key_at("DEU", before) == deu.signing.public
    assert f.key_at("DEU", before + 1) == new.signing.public


async def deliver(broker: ScriptedBroker, seq: int, data: bytes, head: packet.Head) -> None:
    """Push `data` to the node as the broker does: begin, one chunk, end."""
    await broker.send(ev.DeliverBegin(seq, data[: head.head_size], len(data) - head.head_size))
    await broker.send(ev.DeliverChunk(seq, data[head.head_size :]))
    await broker.send(ev.DeliverEnd(seq))


def _follower(log: Log, inbox: set[bytes]) -> Follower:
    """FRA's follower, with an inbox holding the packets `inbox` names (from DEU, none marked retracted)."""
    f = Follower(log.vkey, "FRA", "broker")
    f.in_inbox = lambda digest: digest in inbox
    f.retraction_wanted = lambda digest, sender: sender == "DEU"  # none is marked yet
    return f


# --- which key a node takes a delivery under (signers.packet_signer) ------------------------------------------


def _head(sender: identity.Identity, to: identity.Identity, seed: bytes) -> packet.Head:
    m = records.entry_type(pkt_entry(sender, [to], seed))[1]
    return packet.Head(packet.Header.parse(m["header"]), m["sig"], 0)


def test_a_delivery_is_taken_under_a_replaced_key_only_where_the_log_holds_it_under_that_key(
    members: dict[str, identity.Identity],
) -> None:
    old, fra = members["DEU"], members["FRA"]
    new = identity.rotate(old, seeded_random(b"DEU new"), NOW + 1)
    keys = [new.signing.public, old.signing.public]  # current first, as PolicyState.identity_keys
    changed_at = 10  # the rekey's position: the old key signed entries up to it

    def key_at(index: int) -> bytes:
        return old.signing.public if index <= changed_at else new.signing.public

    def signer(head: packet.Head, *, in_inbox: bool = False, logged_at: int | None = None) -> bytes:
        return signers.packet_signer(head, keys, in_inbox=lambda: in_inbox, logged_at=lambda: logged_at, key_at=key_at)

    current, earlier = _head(new, fra, b"now"), _head(old, fra, b"before")
    assert signer(current) == new.signing.public
    assert signer(current, logged_at=3) == new.signing.public  # the current key always does
    assert signer(earlier, logged_at=changed_at - 1) == old.signing.public
    assert signer(earlier, in_inbox=True) == old.signing.public  # a redelivery of one taken before
    with pytest.raises(SignatureError, match=f"has replaced, and the packet is logged at entry {changed_at + 1}"):
        signer(earlier, logged_at=changed_at + 1)  # signed with the stolen key after the rekey
    with pytest.raises(SignatureError, match="has replaced, and the packet is not in the verified log"):
        signer(earlier)
    forged = current._replace(signature=bytes(64))
    with pytest.raises(SignatureError, match="packet header from DEU"):
        signer(forged, logged_at=1, in_inbox=True)  # no key of DEU's signed it: nothing vouches for it
    someone_else = _head(members["ITA"], fra, b"ita")._replace(header=earlier.header)
    with pytest.raises(SignatureError):
        signer(someone_else, in_inbox=True)
    with pytest.raises(SignatureError, match="not a member in the verified log"):
        signers.packet_signer(current, [], in_inbox=lambda: True, logged_at=lambda: 1, key_at=key_at)


# --- the real broker, node and commands -----------------------------------------------------------------------


def _rotate(world: World, member: str, capsys: pytest.CaptureFixture[str]) -> identity.Identity:
    """`valise keygen --rotate` and `valise broker member rekey`, as the member and the operator run them."""
    new_dir = world.root / "keys" / f"{member}-2"
    assert cli(["keygen", "--rotate", str(world.dirs[member]), "--origin", ORIGIN, "--out", str(new_dir)]) == 0
    request = new_dir / f"{member}.rekey"
    assert cli(["broker", "member", "rekey", "--dir", str(world.home.root), "--request", str(request)]) == 0
    capsys.readouterr()
    old = world.members[member]
    world.members[member], world.dirs[member] = keyfiles.load_identity(new_dir), new_dir
    return old


def _admit(world: World, name: str) -> None:
    ident = identity.generate(name, seeded_random(b"rekey" + name.encode()), int(time.time()))
    d = world.root / "keys" / name
    keyfiles.save_identity(d, ident, None)
    world.members[name], world.dirs[name] = ident, d
    world.operator("member-add", id=name, kind="country", name=f"{name} bureau", region="europe",
                   bundle=ident.bundle.raw)  # fmt: skip


async def _submit(world: World, port: int, member: str, data: bytes) -> None:
    async with WireClient.connect(world, member, port) as client:
        client.refuse_cosign = True
        receipt = await client.submit(data)
        assert isinstance(receipt, ev.Receipt), receipt


async def test_a_packet_sent_before_its_sender_moved_to_new_keys_is_taken_and_read_after(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DEU sends FRA a packet, moves to new keys, sends another; FRA's node, offline meanwhile, takes both: the
    first under DEU's replaced key because its verified log holds it before the rekey, and reads both, with the
    daemon running and stopped. Before nodes kept key history, the first was refused as forged, for ever."""
    world = make_world(tmp_path, ("FRA",))
    node_dir = tmp_path / "node"
    async with running_broker(world) as broker:
        async with running_node(world, broker.port, node_dir):
            pass  # FRA's node has followed the log; DEU comes after
        _admit(world, "DEU")
        world.consent("DEU", "FRA")
        await wait_for(lambda: "DEU" in broker.policy.members and broker.policy.size == broker.store.size())
        before = b"sent with DEU's first keys"
        await _submit(world, broker.port, "DEU", seal(world, "DEU", ["FRA"], before))
        old = _rotate(world, "DEU", capsys)
        await wait_for(lambda: broker.policy.members["DEU"].sign_key == world.members["DEU"].bundle.sign_key)
        after = b"sent with DEU's new keys"
        await _submit(world, broker.port, "DEU", seal(world, "DEU", ["FRA"], after))
        await broker.publish_checkpoint()
        async with serving_node(world, NodeHome.open(node_dir)) as node:
            await wait_for(lambda: len(node.store.inbox_all()) == 2)
            assert node.store.alarms() == []
            rows = sorted(node.store.inbox_all(), key=lambda r: r.sign_key == world.members["DEU"].bundle.sign_key)
            assert [r.sign_key for r in rows] == [old.bundle.sign_key, world.members["DEU"].bundle.sign_key]
            for row, text in zip(rows, (before, after), strict=True):
                out = tmp_path / f"{row.packet_id.hex()}.txt"
                read = ["read", "--node", str(node_dir), row.packet_id.hex(), "-o", str(out)]
                assert await trio.to_thread.run_sync(cli, read) == 0  # through the daemon's control socket
                assert out.read_bytes() == text
            # Both acknowledged: the broker logged FRA's acknowledgements (checked under FRA's key) and emptied
            # FRA's mailbox.
            await wait_for(lambda: broker.mail.pending("FRA") == [])
    out = tmp_path / "offline.txt"
    read = ["read", "--node", str(node_dir), rows[0].packet_id.hex(), "-o", str(out)]
    assert await trio.to_thread.run_sync(cli, read) == 0
    assert out.read_bytes() == before  # the daemon stopped: read from what it stored, with the stored key
    # An auditor replays the whole log, each packet and acknowledgement under the key in force where it stands.
    export = tmp_path / "export"
    assert (
        await trio.to_thread.run_sync(cli, ["log", "export", "--dir", str(world.home.root), "--out", str(export)]) == 0
    )
    capsys.readouterr()
    vkey = world.home.log_vkey_path.read_text().strip()
    audit = ["audit", "verify", "--log", str(export), "--broker-key", vkey, "--json", "--jobs", "1"]
    assert await trio.to_thread.run_sync(cli, audit) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["findings"] == []


async def test_the_moving_members_queued_packets_are_signed_again_with_its_new_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FRA queued a packet while the broker was out of reach, then moved to new keys: the broker takes nothing
    signed with FRA's replaced key any more, so FRA's node signs it again when it starts (same id, same digest)."""
    world = make_world(tmp_path, ("FRA", "DEU"))
    world.consent("FRA", "DEU")
    node_dir = tmp_path / "node"
    async with running_broker(world) as broker:
        async with running_node(world, broker.port, node_dir):
            pass
        data = seal(world, "FRA", ["DEU"], b"queued before the move")
        head = packet.parse_head(data)
        assert isinstance(head, packet.Head)
        core = head.core
        store = NodeStore.open(node_dir)
        try:  # what `valise send` does while the broker is out of reach (the daemon is stopped here)
            store.enqueue(core.packet_id, head.digest, ["DEU"], core.created, core.expires, data)
        finally:
            store.close()
        old = _rotate(world, "FRA", capsys)
        await wait_for(lambda: broker.policy.members["FRA"].sign_key == world.members["FRA"].bundle.sign_key)
        assert cli(["node", "move", "--dir", str(node_dir), "--identity", str(world.dirs["FRA"])]) == 0
        async with serving_node(world, NodeHome.open(node_dir)) as node:
            await wait_for(lambda: node.store.outbox_get(core.packet_id).state != "queued")  # type: ignore[union-attr]
            row = node.store.outbox_get(core.packet_id)
            assert row is not None
            assert (row.state, row.digest) == ("receipted", head.digest), row.outcome
            assert row.log_index is not None
    with SqliteLog.open(world.home.db_path) as log:
        logged = records.entry_type(log.entries(row.log_index, row.log_index + 1)[0])[1]
    assert logged["header"] == head.header.raw
    # Logged with the new key's signature over the same header; the old signature would not verify there.
    sign.verify(world.members["FRA"].signing.public, HEADER_DOMAIN, head.header.raw, logged["sig"], what="logged")
    with pytest.raises(SignatureError):
        sign.verify(world.members["FRA"].signing.public, HEADER_DOMAIN, head.header.raw, head.signature, what="old")
    sign.verify(old.signing.public, HEADER_DOMAIN, head.header.raw, head.signature, what="as queued")


async def test_forwarded_notices_signed_with_a_replaced_key_are_taken_from_the_log_not_the_broker(
    members: dict[str, identity.Identity], world: dict[str, Any]
) -> None:
    """DEU acknowledged FRA's packet and retracted one it sent FRA, then moved to new keys; the broker forwards
    both after the move. The forwarded copies do not verify under DEU's current key, and the broker's word on
    where they are logged is not taken: FRA's node answers `seen` and takes each from its verified log, checked
    under the key in force there. A notice made with the stolen old key after the move, which the log does not
    hold, is taken from nowhere."""

    async def expect(broker: ScriptedBroker, kind: type[M]) -> M:
        """The next frame of `kind`, past the node's submissions of its outbox (not what this test is about)."""
        while isinstance(msg := await broker.events.receive(), ev.SubmitBegin | ev.SubmitChunk | ev.SubmitEnd):
            pass
        assert isinstance(msg, kind), f"expected {kind.TYPE}, got {msg}"
        return msg

    h = Harness(world, members["FRA"])
    fra, deu = members["FRA"], members["DEU"]
    sent_data, sent = sealed(fra, [deu], b"sent")
    h.daemon.store.enqueue(sent.core.packet_id, sent.digest, ["DEU"], NOW, NOW + 3600, sent_data)
    got_data, got = sealed(deu, [fra], b"got")
    ack = records.Ack.make(deu.signing, sent.core.packet_id, sent.digest, "FRA", "DEU", NOW)
    retraction = records.Retraction.make(deu.signing, got.core.packet_id, got.digest, "DEU", "wrong file", NOW)
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 3)
        await deliver(broker, 0, got_data, got)
        assert (await expect(broker, ev.Ack)).seq == 0
        log: Log = h.log
        log.add(records.packet_entry(sent.header.raw, sent.signature, NOW))
        log.add(records.ack_entry(ack), records.retract_entry(retraction))
        new = _rekey(log, deu, b"DEU moved")
        assert h.daemon.session is not None
        await h.daemon.sync(h.daemon.session)
        assert h.daemon.follower.identity_keys("DEU") == [new.signing.public, deu.signing.public]
        # Taken from the log as it was followed, under the key in force where each is logged.
        assert h.daemon.store.acks_for(sent.core.packet_id) == {"DEU": ack.raw}
        assert h.daemon.store.inbox_get(got.digest).state == "retracted"  # type: ignore[union-attr]
        for seq, msg in enumerate(
            [
                ev.AckForward(1, sent.core.packet_id, "DEU", 4, ack.raw),
                ev.RetractForward(2, got.core.packet_id, "DEU", 5, retraction.raw),
            ],
            start=1,
        ):
            await broker.send(msg)
            assert (await expect(broker, ev.Seen)).seq == seq
        # The stolen key after the move: an acknowledgement of a packet FRA sent that DEU never acknowledged in
        # the log. The broker claims an old position for it; nothing is recorded.
        other_data, other = sealed(fra, [deu], b"other")
        h.daemon.store.enqueue(other.core.packet_id, other.digest, ["DEU"], NOW, NOW + 3600, other_data)
        stolen = records.Ack.make(deu.signing, other.core.packet_id, other.digest, "FRA", "DEU", NOW)
        await broker.send(ev.AckForward(3, other.core.packet_id, "DEU", 4, stolen.raw))
        assert (await expect(broker, ev.Seen)).seq == 3
        assert h.daemon.store.acks_for(other.core.packet_id) == {}
        # A key DEU never had: refused, with an alarm, as before.
        forged = records.Ack.make(members["ITA"].signing, other.core.packet_id, other.digest, "FRA", "DEU", NOW)
        await broker.send(ev.AckForward(4, other.core.packet_id, "DEU", 9, forged.raw))
        assert (await expect(broker, ev.Refuse)).code == "bad-signature"
        assert h.daemon.store.acks_for(other.core.packet_id) == {}
        assert [a.kind for a in h.daemon.store.alarms()] == ["ack"]
        nursery.cancel_scope.cancel()


def queue_own_packet(h: Harness, members: dict[str, identity.Identity], text: bytes) -> packet.Head:
    """FRA's packet to DEU, sealed and queued in FRA's outbox."""
    data, head = sealed(members["FRA"], [members["DEU"]], text)
    h.daemon.store.enqueue(head.core.packet_id, head.digest, ["DEU"], NOW, head.core.expires, data)
    return head


async def uploaded(broker: ScriptedBroker) -> int:
    """The request id of the node's next upload, taken to its end."""
    begin = await broker.expect(ev.SubmitBegin)
    while not isinstance(await broker.events.receive(), ev.SubmitEnd):
        pass
    return begin.rid


async def refuse_as_forged(broker: ScriptedBroker, rid: int) -> None:
    await broker.send(ev.ErrorMessage(rid, "bad-signature", "packet header from FRA: does not verify"))


async def test_a_bad_signature_answer_to_a_packet_this_node_signed_keeps_it_queued(
    members: dict[str, identity.Identity], world: dict[str, Any]
) -> None:
    """A review: FRA's operator appended the rekey while FRA's node still ran on its old keys; the broker answered
    its packets in flight `bad-signature`, a final answer, so they were denied for good and never sent after `node
    move`. A header this node's own key signs can only be refused because the broker holds another key for it: it
    stays queued (signed again once the node has the new keys). One it did not sign is refused as before."""
    h = Harness(world, members["FRA"])
    store = h.daemon.store
    ours_data, ours = sealed(members["FRA"], [members["DEU"]], b"ours")
    theirs_data, theirs = sealed(members["ITA"], [members["DEU"]], b"not ours")  # a damaged outbox, say
    for data, head in ((ours_data, ours), (theirs_data, theirs)):
        store.enqueue(head.core.packet_id, head.digest, ["DEU"], NOW, head.core.expires, data)
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        for _ in range(2):
            await refuse_as_forged(broker, await uploaded(broker))
        await wait_for(lambda: store.outbox_get(theirs.core.packet_id).state != "queued")  # type: ignore[union-attr]
        await wait_for(lambda: store.outbox_get(ours.core.packet_id).attempts == 1)  # type: ignore[union-attr]
        kept, refused = store.outbox_get(ours.core.packet_id), store.outbox_get(theirs.core.packet_id)
        assert kept is not None
        assert refused is not None
        assert kept.state == "queued"
        assert "if FRA moved to new keys, point this node at them: valise node move" in (kept.outcome or "")
        assert refused.state == "denied"
        # The broker's own log shows the key that signed FRA's packet, and so does a checkpoint it signs after
        # the refusal: its answer is false, and said to be.
        assert store.alarms() == []  # not on the checkpoint already signed: a rekey may await the next one
        h.log.admit(members["ITA"])
        d = h.daemon
        assert d.session is not None
        assert await d.sync(d.session)
        (alarm,) = store.alarms()
        assert alarm.kind == "broker"
        assert "the broker refuses FRA's packets as badly signed, though its log, in a checkpoint signed after" in (
            alarm.message
        )
        nursery.cancel_scope.cancel()


async def test_a_bad_signature_answer_for_a_rekey_the_broker_has_not_checkpointed_yet_raises_no_alarm(
    members: dict[str, identity.Identity], world: dict[str, Any]
) -> None:
    """A review: an operator's rekey is applied by the running broker at once, but shows in the checkpoints it
    serves only from the next one on. A refusal in between, judged on the checkpoint then served, raised a false
    alarm. The node judges by a checkpoint signed after the refusal, which shows the rekey."""
    h = Harness(world, members["FRA"])
    store = h.daemon.store
    log = world["log"]
    head = queue_own_packet(h, members, b"refused before the rekey was checkpointed")
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        rid = await uploaded(broker)
        await wait_for(lambda: h.daemon.follower.member_key("FRA") == members["FRA"].bundle.sign_key)
        signed = log.add

        def appended_only(*entries: bytes) -> bytes:
            for entry in entries:
                log.service.add(entry, 0.0)
            log.service.flush()
            return b""

        log.add = appended_only  # type: ignore[method-assign]
        _rekey(log, members["FRA"], b"FRA moved")  # applied by the broker, in no checkpoint yet
        log.add = signed  # type: ignore[method-assign]
        await refuse_as_forged(broker, rid)
        await wait_for(lambda: store.outbox_get(head.core.packet_id).attempts == 1)  # type: ignore[union-attr]
        await trio.testing.wait_all_tasks_blocked(0.01)
        d = h.daemon
        assert d.session is not None
        assert d._bad_signature is not None  # the checkpoint served then did not explain it: judged later
        log.service.sign()  # the broker's next checkpoint
        assert await d.sync(d.session)
        assert d.follower.member_key("FRA") != members["FRA"].bundle.sign_key
        assert store.alarms() == []
        assert d._bad_signature is None
        nursery.cancel_scope.cancel()


async def test_a_bad_signature_answer_after_a_rekey_of_this_member_raises_no_alarm(
    members: dict[str, identity.Identity], world: dict[str, Any]
) -> None:
    """The honest case of the test above: FRA's operator moves FRA to new keys while FRA's packet, signed with the
    old key, is on its way, and the broker refuses it. The node's log does not show the rekey yet: it follows the
    broker's log before judging the answer, finds the rekey, and keeps the packet queued without an alarm."""
    h = Harness(world, members["FRA"])
    store = h.daemon.store
    head = queue_own_packet(h, members, b"signed with the key about to be replaced")
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        rid = await uploaded(broker)
        await wait_for(lambda: h.daemon.follower.member_key("FRA") == members["FRA"].bundle.sign_key)
        _rekey(world["log"], members["FRA"], b"FRA moved")
        await refuse_as_forged(broker, rid)
        await wait_for(lambda: h.daemon.follower.member_key("FRA") != members["FRA"].bundle.sign_key)
        await trio.testing.wait_all_tasks_blocked(0.01)
        assert store.outbox_get(head.core.packet_id).state == "queued"  # type: ignore[union-attr]
        assert store.alarms() == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_queued_packet_does_not_stop_the_others_from_being_signed_again(
    members: dict[str, identity.Identity], world: dict[str, Any], damage: str
) -> None:
    """A review: signing the queued packets again at start opened each file; one missing or cut short stopped the
    daemon from starting at all. It is now an alarm, and the others are signed again."""
    fra, deu = members["FRA"], members["DEU"]
    new = identity.rotate(fra, seeded_random(b"FRA new"), NOW + 1)
    store = NodeStore.open(world["home"].root)
    heads = []
    for seed in (b"damaged", b"intact"):
        data, head = sealed(fra, [deu], seed)
        store.enqueue(head.core.packet_id, head.digest, ["DEU"], NOW, head.core.expires, data)
        heads.append(head)
    damaged = store.outbox_path(heads[0].core.packet_id)
    store.close()
    if damage == "missing":
        damaged.unlink()
    else:
        damaged.write_bytes(damaged.read_bytes()[:100])
    daemon = NodeDaemon(world["home"], new, random=seeded_random(b"n"), wall=lambda: NOW)
    try:
        (alarm,) = [a for a in daemon.store.alarms() if a.kind == "outbox"]
        assert f"packet {heads[0].core.packet_id.hex()}" in alarm.message
        with open(daemon.store.outbox_path(heads[1].core.packet_id), "rb") as f:
            signed_again = packet.read_head(f)
        sign.verify(new.signing.public, HEADER_DOMAIN, heads[1].header.raw, signed_again.signature, what="again")
    finally:
        daemon.store.close()


def _as_before_key_history(node_dir: Path) -> None:
    """node.db as the version before nodes kept key history made it: no inbox.sign_key, no log_received."""
    db = sqlite3.connect(node_dir / "node.db")
    db.execute("ALTER TABLE inbox DROP COLUMN sign_key")
    db.execute("DROP TABLE log_received")
    db.commit()
    db.close()


async def test_a_packet_an_older_node_took_stays_readable_after_its_sender_moves_to_new_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A review: a row kept before inboxes recorded the key (NULL once migrated) was opened with the sender's
    current key, so it became unreadable, daemon running or stopped, as soon as its sender moved to new keys."""
    world = make_world(tmp_path, ("FRA",))
    node_dir = tmp_path / "node"
    text = b"taken by the previous version"
    async with running_broker(world) as broker:
        async with running_node(world, broker.port, node_dir):
            pass
        _admit(world, "DEU")
        world.consent("DEU", "FRA")
        await wait_for(lambda: "DEU" in broker.policy.members and broker.policy.size == broker.store.size())
        await _submit(world, broker.port, "DEU", seal(world, "DEU", ["FRA"], text))
        await broker.publish_checkpoint()
        async with serving_node(world, NodeHome.open(node_dir)) as node:
            await wait_for(lambda: len(node.store.inbox_all()) == 1)
            (row,) = node.store.inbox_all()
        _as_before_key_history(node_dir)
        _rotate(world, "DEU", capsys)
        await wait_for(lambda: broker.policy.members["DEU"].sign_key == world.members["DEU"].bundle.sign_key)
        await broker.publish_checkpoint()
        async with serving_node(world, NodeHome.open(node_dir)) as node:
            assert node.store.inbox_get(row.digest).sign_key is None  # type: ignore[union-attr]
            await wait_for(lambda: node.follower.member_key("DEU") == world.members["DEU"].bundle.sign_key)
            out = tmp_path / "running.txt"
            read = ["read", "--node", str(node_dir), row.packet_id.hex(), "-o", str(out)]
            assert await trio.to_thread.run_sync(cli, read) == 0, capsys.readouterr().err
            assert out.read_bytes() == text
    out = tmp_path / "stopped.txt"
    read = ["read", "--node", str(node_dir), row.packet_id.hex(), "-o", str(out)]
    assert await trio.to_thread.run_sync(cli, read) == 0, capsys.readouterr().err
    assert out.read_bytes() == text


async def test_a_retraction_the_log_shows_before_its_packet_arrives_marks_it_on_arrival(
    members: dict[str, identity.Identity], world: dict[str, Any]
) -> None:
    """A review: DEU retracted a packet (under its key then) and moved to new keys; FRA's node followed the log past
    both before the packet itself arrived (in flight, or held). The fold skipped the retraction (not in the inbox
    yet), and the forwarded copy, signed with the replaced key, was answered `seen` and dropped: the packet stayed
    readable as if never retracted. The fold now keeps a retraction of a packet still to arrive, which arrives
    retracted."""
    fra, deu = members["FRA"], members["DEU"]
    log: Log = world["log"]
    data, head = sealed(deu, [fra], b"the wrong file")
    log.add(records.packet_entry(head.header.raw, head.signature, NOW))
    retraction = records.Retraction.make(deu.signing, head.core.packet_id, head.digest, "DEU", "wrong file", NOW)
    log.add(records.retract_entry(retraction))
    _rekey(log, deu, b"DEU moved")
    h = Harness(world, fra)
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        await wait_for(lambda: h.daemon.follower.size == 6)
        await deliver(broker, 0, data, head)
        assert (await broker.expect(ev.Ack)).seq == 0  # taken under DEU's old key, where the log holds it
        await broker.send(ev.RetractForward(1, head.core.packet_id, "DEU", 4, retraction.raw))
        assert (await broker.expect(ev.Seen)).seq == 1
        row = h.daemon.store.inbox_get(head.digest)
        assert row is not None
        assert (row.state, row.retraction) == ("retracted", "wrong file")
        assert h.daemon.store.received_index(head.digest) is None  # arrived: its position is no longer kept
        nursery.cancel_scope.cancel()


def test_under_a_quorum_only_packets_still_to_arrive_wait_with_their_positions(
    members: dict[str, identity.Identity],
) -> None:
    """Under a witness quorum, verified entries wait (in memory and in log_pending) until trusted. A packet to this
    member that its inbox already holds would fold to nothing: it does not wait; one still to arrive does, and
    its position is recorded once the quorum is met."""
    from valise.audit import quorum

    from .test_node_quorum import WITNESSES, cosign, policy_text

    fra, deu = members["FRA"], members["DEU"]
    log = Log()
    log.admit(fra)
    log.admit(deu)
    arrived, coming = pkt_entry(deu, [fra], b"arrived"), pkt_entry(deu, [fra], b"coming")
    note = log.add(arrived, coming)
    f = Follower(log.vkey, "FRA", "broker", quorum=quorum.parse(policy_text(log)))
    f.in_inbox = lambda digest: digest == _digest(arrived)
    done = follow(f, log, note)
    assert done is not None
    assert [i for i, _ in done.pending] == [0, 1, 2, 4]  # genesis, admissions, the packet still to come
    trusted = f.trust(cosign(note, *WITNESSES[:2]))
    assert trusted is not None
    expires = packet.Header.parse(records.entry_type(coming)[1]["header"]).core.expires
    assert trusted.received == [(4, _digest(coming), expires, "DEU")]


def test_only_a_pending_rekey_the_trusted_state_would_take_makes_a_node_wait(
    members: dict[str, identity.Identity],
) -> None:
    """A review: any pending record that parsed as a member-rekey of DEU made the node hold forged deliveries "from
    DEU" (up to 10 minutes) and take forged notices quietly instead of refusing them: a broker could log one by
    itself and keep the quorum short. Only one signed by the operator and handed over by DEU's trusted key counts."""
    from valise.audit import quorum
    from valise.crypto import sign as signing

    from .test_node_quorum import WITNESSES, cosign, policy_text

    fra, deu = members["FRA"], members["DEU"]
    log = Log()
    log.admit(fra)
    note = log.admit(deu)
    f = Follower(log.vkey, "FRA", "broker", quorum=quorum.parse(policy_text(log)))
    assert follow(f, log, note) is not None
    assert f.trust(cosign(note, *WITNESSES[:2])) is not None
    new = identity.rotate(deu, seeded_random(b"DEU bogus"), NOW + 1)
    message = policy_records.rekey_message("DEU", FOLLOWER_ORIGIN, new.bundle.raw)
    bogus_operator = signing.SigningKey(bytes(32))
    for operator, handover in ((bogus_operator, deu.signing), (log.operator, new.signing)):
        log.seq += 1
        entry = policy_records.dir_record(operator, FOLLOWER_ORIGIN, log.seq, NOW, "member-rekey", id="DEU",
                                          bundle=new.bundle.raw,
                                          rekey_sig=handover.sign(policy_records.REKEY_DOMAIN, message))  # fmt: skip
        note = log.add(entry)
        assert follow(f, log, note) is not None
        assert f.awaiting
        assert not f.pending_keys("DEU")
    moved = _rekey(log, deu, b"DEU moved")
    assert follow(f, log, log.service.latest.note) is not None  # type: ignore[union-attr]
    assert f.pending_keys("DEU") == [moved.bundle.sign_key]
    assert not f.pending_keys("FRA")


async def test_a_member_that_moved_to_a_new_encryption_key_reads_what_was_sealed_to_the_old_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FRA's keys are compromised: `keygen --rotate` replaces its encryption key too, so that what is sealed to it
    from then on is sealed to a key the thief does not hold. A packet DEU sealed to the old key, delivered before
    the move, and one sealed to it after the move by a sender whose view was older, both still open; one sealed to
    the new key opens. Real broker, FRA's real node daemon, the real commands."""
    world = make_world(tmp_path, ("FRA", "DEU"))
    world.consent("DEU", "FRA")
    node_dir = tmp_path / "node"
    old_fra = world.members["FRA"]
    texts = [b"sealed to FRA's first key, read before", b"sealed to it late", b"sealed to FRA's new key"]
    async with running_broker(world) as broker:
        async with running_node(world, broker.port, node_dir) as node:
            await _submit(world, broker.port, "DEU", seal(world, "DEU", ["FRA"], texts[0]))
            await wait_for(lambda: len(node.store.inbox_all()) == 1)
        late = seal(world, "DEU", ["FRA"], texts[1])  # DEU's view still shows FRA's first key
        _rotate(world, "FRA", capsys)
        assert world.members["FRA"].bundle.enc_key != old_fra.bundle.enc_key
        await wait_for(lambda: broker.policy.members["FRA"].enc_key == world.members["FRA"].bundle.enc_key)
        assert cli(["node", "move", "--dir", str(node_dir), "--identity", str(world.dirs["FRA"])]) == 0
        async with serving_node(world, NodeHome.open(node_dir)) as node:
            await _submit(world, broker.port, "DEU", late)
            await _submit(world, broker.port, "DEU", seal(world, "DEU", ["FRA"], texts[2]))
            await wait_for(lambda: len(node.store.inbox_all()) == 3)
            replaced = {}
            for row in node.store.inbox_all():
                out = tmp_path / f"{row.packet_id.hex()}.txt"
                read = ["read", "--node", str(node_dir), row.packet_id.hex(), "-o", str(out), "--json"]
                capsys.readouterr()
                assert await trio.to_thread.run_sync(cli, read) == 0
                said = capsys.readouterr()
                flagged = json.loads(said.out)["sealed_to_replaced_key"]
                assert flagged is ("sealed to an encryption key this member has replaced" in said.err)
                replaced[out.read_bytes()] = flagged
            # Both sealed to FRA's first key are read, and said to be exposed to whoever held it.
            assert replaced == {texts[0]: True, texts[1]: True, texts[2]: False}
            assert node.store.alarms() == []


def test_only_what_the_member_signed_with_its_replaced_key_is_signed_again(
    members: dict[str, identity.Identity],
    world: dict[str, Any],
) -> None:
    """A crypto review: after a move to new keys, the node signed every queued header that its new key did not
    verify, whoever had written the file: whoever could write the outbox could have anything signed. Now only
    a header from this member, under the key it replaced, is signed again; the others are an alarm."""
    from valise.node.daemon import SIGNED_WITH

    before = identity.generate("FRA", seeded_random(b"FRA's keys before the move"), NOW)
    old = Harness(world, before)
    assert old.daemon.store.get(SIGNED_WITH) == before.bundle.sign_key
    ours_data, ours = sealed(before, [members["DEU"]], b"ours")
    forged = bytearray(sealed(before, [members["DEU"]], b"forged")[0])
    _, forged_head = sealed(before, [members["DEU"]], b"forged")
    forged[forged_head.head_size - 64 : forged_head.head_size] = bytes(64)  # no key of FRA's signed this
    deu_data, deu_head = sealed(members["DEU"], [members["ITA"]], b"not from FRA")
    for data, head in ((ours_data, ours), (bytes(forged), forged_head), (deu_data, deu_head)):
        old.daemon.store.enqueue(head.core.packet_id, head.digest, ["DEU"], NOW, NOW + 3600, data)
    old.daemon.store.close()

    new = Harness(world, members["FRA"])  # the node, moved to FRA's current keys, starts
    store = new.daemon.store
    try:

        def signature(head: packet.Head) -> bytes:
            return store.outbox_path(head.core.packet_id).read_bytes()[head.head_size - 64 : head.head_size]

        sign.verify(members["FRA"].signing.public, HEADER_DOMAIN, ours.header.raw, signature(ours), what="ours")
        assert signature(forged_head) == bytes(64)
        assert signature(deu_head) == deu_head.signature
        problems = sorted(a.message for a in store.alarms() if a.kind == "outbox")
        assert len(problems) == 2
        assert any("not from FRA" in p for p in problems)
        assert any("does not verify" in p for p in problems)
    finally:
        store.close()
