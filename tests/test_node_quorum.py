"""A node under a witness quorum policy: it verifies and cosigns every consistent checkpoint, but uses one (keys,
directory, receipts) only once its cosignatures meet the quorum; split views are refused with or without a quorum.

Real objects throughout: a real log (MemoryLog + LogService) whose checkpoints are signed with its real log key,
real witness cosignatures (C2SP cosignature/v1), the real follower, and the real daemon over a real wire
`Connection` (the scripted broker of test_node_daemon, which serves the checkpoint a test chooses)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from valise import identity, keyfiles, records
from valise.audit import quorum
from valise.cli.main import main
from valise.crypto import sign
from valise.crypto.seeded import seeded_random
from valise.errors import CheckpointError
from valise.node import daemon as daemon_module
from valise.node.daemon import NodeDaemon
from valise.node.follower import AwaitingQuorum, Follower, ForgedCosignature, ForkError
from valise.node.home import NodeHome
from valise.tlog import checkpoint, cosignature, note
from valise.wire import events as ev

from .conftest import NOW
from .test_node_daemon import Harness, ScriptedBroker, sealed, wait_for
from .test_node_follower import BROKER, BROKER_ID, Log, follow

WITNESSES = [
    cosignature.Cosigner(f"witness.test/w{i}", sign.SigningKey(seeded_random(b"w%d" % i)(32))) for i in (1, 2, 3)
]


def policy_text(log: Log, k: int = 2) -> str:
    lines = [f"log {log.vkey}"]
    lines += [f"witness w{i} {w.verifier().vkey()}" for i, w in enumerate(WITNESSES, 1)]
    lines += [f"group eu {k} w1 w2 w3", "quorum eu"]
    return "\n".join(lines) + "\n"


def cosign(signed: bytes, *witnesses: cosignature.Cosigner) -> bytes:
    cp = checkpoint.parse_body(note.parse_note(signed).text)
    return cosignature.add_cosignatures(signed, [w.cosign(cp, NOW) for w in witnesses])


def forged(signed: bytes, witness: cosignature.Cosigner) -> bytes:
    """A cosignature line under `witness`'s name and key id whose signature is someone else's."""
    cp = checkpoint.parse_body(note.parse_note(signed).text)
    impostor = cosignature.Cosigner(witness.name, sign.SigningKey(bytes(32)))
    line = impostor.cosign(cp, NOW)
    return cosignature.add_cosignatures(signed, [note.Signature(witness.name, witness.key_id, line.sig)])


def a_fork(members: dict[str, identity.Identity]) -> Log:
    """The same log key and genesis as Log(), a different third entry: a split view at size 3."""
    fork = Log()
    fork.admit(members["FRA"])
    fork.admit(members["ITA"])
    return fork


# --- the follower ------------------------------------------------------------------------------------------------


def test_a_checkpoint_is_used_only_once_two_of_three_witnesses_cosigned(members: dict[str, identity.Identity]) -> None:
    log = Log()
    log.admit(members["FRA"])
    signed = log.admit(members["DEU"])
    f = Follower(log.vkey, "FRA", BROKER, quorum=quorum.parse(policy_text(log)))
    done = follow(f, log, signed)  # verified (what a witness needs), not used
    assert done is not None
    assert (f.size, f.trusted_size, f.awaiting) == (3, 0, True)
    assert (done.keep, done.mine, [i for i, _ in done.pending]) == ([], [], [0, 1, 2])
    assert f.policy is None
    assert f.member_key("DEU") is None
    with pytest.raises(AwaitingQuorum, match="short of the quorum 'eu'"):
        f.trust(signed)
    with pytest.raises(AwaitingQuorum, match=r"1 known witness\(es\) \(w2\)"):
        f.trust(cosign(signed, WITNESSES[1]))
    assert f.member_key("DEU") is None
    with pytest.raises(ForgedCosignature):  # a bad line by a policy key refuses the note, it is not skipped
        f.trust(forged(cosign(signed, WITNESSES[0]), WITNESSES[2]))
    assert f.trusted_size == 0
    used = f.trust(cosign(signed, WITNESSES[0], WITNESSES[2]))
    assert used is not None
    assert (f.trusted_size, f.trusted_root, f.awaiting) == (3, f.root, False)
    assert [i for i, _ in used.keep] == [0, 1, 2]
    assert f.member_key("DEU") == members["DEU"].bundle.sign_key
    assert f.trust(cosign(signed, *WITNESSES)) is None  # the same tree again changes nothing


def test_the_state_waiting_for_a_quorum_survives_a_restart(members: dict[str, identity.Identity]) -> None:
    log = Log()
    signed = log.admit(members["FRA"])
    policy = quorum.parse(policy_text(log))
    f = Follower(log.vkey, "FRA", BROKER, quorum=policy)
    done = follow(f, log, signed)
    assert done is not None
    g = Follower.restore(log.vkey, "FRA", BROKER, done.state, done.keep, quorum=policy, pending=done.pending)
    assert (g.size, g.trusted_size, g.policy) == (2, 0, None)
    used = g.trust(cosign(signed, *WITNESSES[:2]))
    assert used is not None
    assert g.member_key("FRA") == members["FRA"].bundle.sign_key
    # Without the policy any more, what waited is used at once.
    h = Follower.restore(log.vkey, "FRA", BROKER, done.state, done.keep, pending=done.pending)
    assert h.trusted_size == 0
    assert h.catch_up() is not None
    assert (h.trusted_size, h.member_key("FRA")) == (2, members["FRA"].bundle.sign_key)


def test_an_older_cosigned_checkpoint_is_used_if_consistent(members: dict[str, identity.Identity]) -> None:
    log = Log()
    first = log.admit(members["FRA"])
    second = log.admit(members["DEU"])
    f = Follower(log.vkey, "FRA", BROKER, quorum=quorum.parse(policy_text(log)))
    follow(f, log, first)
    follow(f, log, second)  # verified past the first before its cosigned note came
    older = cosign(first, *WITNESSES)
    assert f.trust_needs_proof(f.open(older))
    with pytest.raises(CheckpointError, match="needs a consistency proof"):
        f.trust(older)
    bad = [bytes(32)]
    with pytest.raises(ForkError, match="not consistent"):
        f.trust(older, bad)
    used = f.trust(older, log.service.consistency_proof(2))
    assert used is not None
    assert (f.trusted_size, f.size) == (2, 3)
    assert f.member_key("FRA") is not None
    assert f.member_key("DEU") is None  # entry 2 still waits for its own quorum
    assert 2 in f.pending


def test_a_split_view_is_refused_with_or_without_a_quorum(members: dict[str, identity.Identity]) -> None:
    log = Log()
    log.admit(members["FRA"])
    signed = log.admit(members["DEU"])
    fork = a_fork(members)
    fork_note = fork.service.latest.note  # type: ignore[union-attr]
    f = Follower(log.vkey, "FRA", BROKER, quorum=quorum.parse(policy_text(log)))
    follow(f, log, signed)
    for offered in (fork_note, cosign(fork_note, *WITNESSES)):  # no quorum, then a full one: refused alike
        with pytest.raises(ForkError, match="two different roots") as refused:
            f.begin(offered)
        assert refused.value.evidence == offered
        with pytest.raises(ForkError, match="two different roots"):
            f.trust(offered)
    f.trust(cosign(signed, *WITNESSES[:2]))
    with pytest.raises(ForkError, match="two different roots"):
        f.trust(cosign(fork_note, *WITNESSES))
    assert (f.trusted_size, f.trusted_root) == (3, log.service.latest.root)  # type: ignore[union-attr]


def test_the_policy_must_name_the_pinned_log_key(members: dict[str, identity.Identity]) -> None:
    log, other = Log(), Log(b"other")
    with pytest.raises(CheckpointError, match="another log key"):
        Follower(log.vkey, "FRA", BROKER, quorum=quorum.parse(policy_text(other)))


# --- the daemon ------------------------------------------------------------------------------------------------


class QuorumBroker(ScriptedBroker):
    """The scripted broker, serving `offer` (when set) as its latest checkpoint, and consistency proofs."""

    offer: bytes | None = None

    async def handle(self, msg: ev.Message) -> None:
        if isinstance(msg, ev.GetCheckpoint) and self.offer is not None:
            await self.send(ev.Checkpoint(msg.rid, self.offer))
        elif isinstance(msg, ev.GetConsistency):
            await self.send(ev.Consistency(msg.rid, tuple(self.log.service.consistency_proof(msg.old, msg.new))))
        else:
            await super().handle(msg)


class QuorumHarness(Harness):
    async def connect(self) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        broker = QuorumBroker(theirs, self.log)
        assert self.nursery is not None
        self.nursery.start_soon(broker.run)
        await self.brokers.send(broker)
        return ours


@pytest.fixture
def world(tmp_path: Path, members: dict[str, identity.Identity]) -> dict[str, Any]:
    keyfiles.save_identity(tmp_path / "keys", members["FRA"], None)
    broker_pub = tmp_path / "broker.pub"
    broker_pub.write_bytes(BROKER_ID.bundle.raw)
    log = Log()
    for m in ("FRA", "DEU"):
        log.admit(members[m])
    home = NodeHome.create(tmp_path / "node", tmp_path / "keys", "127.0.0.1:9", broker_pub, log.vkey, policy_text(log))
    return {"home": home, "log": log}


async def start(nursery: trio.Nursery, h: Harness) -> QuorumBroker:
    h.nursery = nursery
    nursery.start_soon(h.daemon.connection_loop)
    broker = await h.accepted.receive()
    await h.daemon.connected_event.wait()
    assert isinstance(broker, QuorumBroker)
    return broker


async def test_the_daemon_uses_the_log_only_under_the_quorum(world: dict[str, Any], members: dict[str, Any]) -> None:
    from valise.node.ops import op_status

    h = QuorumHarness(world, members["FRA"])
    log: Log = world["log"]
    signed = log.service.latest.note  # type: ignore[union-attr]
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        d = h.daemon
        broker.offer = cosign(signed, WITNESSES[0])
        await wait_for(lambda: d.follower.size == 3)  # verified by the first poll...
        session = d.session
        assert session is not None
        assert await d.sync(session)
        assert (d.follower.trusted_size, d.follower.member_key("DEU")) == (0, None)  # ...but not in use
        status = await op_status(d, {})
        assert status["trusted"]["awaiting"] is True
        assert "1 known witness(es) (w1)" in status["trusted"]["detail"]
        broker.offer = cosign(signed, WITNESSES[0], WITNESSES[1])
        assert await d.sync(session)
        assert d.follower.trusted_size == 3
        assert d.follower.member_key("DEU") == members["DEU"].bundle.sign_key
        status = await op_status(d, {})
        assert (status["trusted"]["size"], status["trusted"]["awaiting"], status["trusted"]["quorum"]) == (
            3,
            False,
            "eu",
        )
        assert d.store.alarms() == []
        # A forged cosignature under a policy key: the note is refused and the forgery raised as an alarm.
        broker.offer = forged(cosign(signed, WITNESSES[0], WITNESSES[1]), WITNESSES[2])
        assert await d.sync(session)
        (alarm,) = d.store.alarms()
        assert (alarm.kind, alarm.evidence) == ("cosignature", broker.offer)
        # A split view with a full quorum, as the latest checkpoint: refused, kept, nothing moves.
        fork_note = cosign(a_fork(members).service.latest.note, *WITNESSES)  # type: ignore[union-attr]
        broker.offer = fork_note
        with pytest.raises(ForkError):
            await d.sync(session)
        alarm = d.store.alarms()[-1]
        assert (alarm.kind, alarm.evidence) == ("fork", fork_note)
        assert (d.follower.size, d.follower.trusted_size, d.follower.root) == (3, 3, log.service.latest.root)  # type: ignore[union-attr]
        # The same fork as a cosign request: refused, not cosigned.
        await broker.send(ev.CosignRequest(9, 3, (), fork_note))
        err = await broker.expect(ev.ErrorMessage)
        assert (err.rid, err.code) == (9, "conflict")
        # The log grows: the node witnesses it (cosigns) although no quorum has formed for it yet.
        grown = log.admit(members["ITA"])
        await broker.send(ev.CosignRequest(10, 3, tuple(log.service.consistency_proof(3)), grown))
        response = await broker.expect(ev.CosignResponse)
        mine = cosignature.CosignatureVerifier("FRA", members["FRA"].bundle.sign_key)
        note.open_note(note.parse_note(grown).text.encode() + b"\n" + response.cosignature, [mine])
        assert (d.follower.size, d.follower.trusted_size, d.follower.member_key("ITA")) == (4, 3, None)
        nursery.cancel_scope.cancel()
    # A restart keeps the line between verified and used.
    h.daemon.store.close()
    again = NodeDaemon(world["home"], members["FRA"], random=seeded_random(b"r"), wall=lambda: NOW)
    assert (again.follower.size, again.follower.trusted_size, again.follower.member_key("ITA")) == (4, 3, None)
    again.store.close()


async def test_a_broker_serving_an_older_checkpoint_for_long_raises_one_alarm(
    world: dict[str, Any], members: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quorum node takes an older cosigned note as routine (the cosigned copy of a tree it already went past).
    Served for longer than BEHIND_GRACE (zero here), it means the broker lost entries it signed: a restore from an
    old backup, otherwise seen only once its log passes the node's size again."""
    monkeypatch.setattr(daemon_module, "BEHIND_GRACE", 0.0)
    h = QuorumHarness(world, members["FRA"])
    log: Log = world["log"]
    old = cosign(log.service.latest.note, *WITNESSES)  # type: ignore[union-attr]
    async with trio.open_nursery() as nursery:
        broker = await start(nursery, h)
        d = h.daemon
        broker.offer = old
        await wait_for(lambda: d.follower.size == 3)
        session = d.session
        assert session is not None
        grown = log.admit(members["ITA"])
        await broker.send(ev.CosignRequest(10, 3, tuple(log.service.consistency_proof(3)), grown))
        await broker.expect(ev.CosignResponse)
        assert d.follower.size == 4
        assert await d.sync(session)  # the first time: routine
        assert [a.kind for a in d.store.alarms()] == []
        assert await d.sync(session)  # still, past the grace: the broker is behind
        assert await d.sync(session)  # and once only
        (alarm,) = d.store.alarms()
        assert alarm.kind == "log"
        assert "served a checkpoint of size 3, older than the size 4 this node verified" in alarm.message
        assert alarm.evidence == old
        broker.offer = cosign(grown, *WITNESSES)  # caught up: the episode ends
        assert await d.sync(session)
        broker.offer = old
        assert await d.sync(session)
        assert len(d.store.alarms()) == 1
        nursery.cancel_scope.cancel()


# --- the command line ------------------------------------------------------------------------------------------


def test_node_init_and_set_policy_check_the_policy(
    tmp_path: Path, members: dict[str, identity.Identity], capsys: pytest.CaptureFixture[str]
) -> None:
    keyfiles.save_identity(tmp_path / "keys", members["FRA"], None)
    broker_pub = tmp_path / "broker.pub"
    broker_pub.write_bytes(BROKER_ID.bundle.raw)
    log, other = Log(), Log(b"other")
    good, wrong, broken = tmp_path / "good", tmp_path / "wrong", tmp_path / "broken"
    good.write_text(policy_text(log))
    wrong.write_text(policy_text(other))
    broken.write_text(policy_text(log).replace("group eu 2", "group eu 4"))
    base = ["node", "init", "--identity", str(tmp_path / "keys"), "--broker", "127.0.0.1:9"]
    base += ["--broker-pub", str(broker_pub), "--log-key", log.vkey]
    garbage = [*base[:-1], "not+a+key"]
    assert main([*garbage, "--dir", str(tmp_path / "n1")]) == 2  # refused now, not at the first checkpoint
    assert "--log-key is not a log verifier key" in capsys.readouterr().err
    assert not (tmp_path / "n1").exists()
    assert main([*base, "--dir", str(tmp_path / "n1"), "--witness-policy", str(wrong)]) == 2
    assert "another key than the node's pinned log key" in capsys.readouterr().err
    assert not (tmp_path / "n1").exists()
    assert main([*base, "--dir", str(tmp_path / "n1"), "--witness-policy", str(broken)]) == 2
    assert "threshold 4 is not between 1 and its 3 members" in capsys.readouterr().err
    assert main([*base, "--dir", str(tmp_path / "n1"), "--witness-policy", str(good)]) == 0
    assert "witness quorum: eu (3 witness keys)" in capsys.readouterr().out
    # Only its owner may enter a node's directory: its database says who sent what to whom.
    assert stat.S_IMODE((tmp_path / "n1").stat().st_mode) == 0o700
    home = NodeHome.open(tmp_path / "n1")
    assert home.policy_path.read_text() == good.read_text()
    policy = home.witness_policy()
    assert policy is not None
    assert policy.quorum == "eu"
    assert main(["node", "set-policy", "--dir", str(tmp_path / "n1"), str(wrong)]) == 2
    assert home.policy_path.read_text() == good.read_text()  # unchanged
    assert main(["node", "set-policy", "--dir", str(tmp_path / "n1"), "--remove"]) == 0
    assert home.witness_policy() is None
    assert main([*base, "--dir", str(tmp_path / "n2")]) == 0
    capsys.readouterr()
    assert main(["node", "set-policy", "--dir", str(tmp_path / "n2"), str(good), "--json"]) == 0
    assert NodeHome.open(tmp_path / "n2").witness_policy() is not None
    told = json.loads(capsys.readouterr().out)
    assert (told["policy"]["quorum"], told["restart_needed"]) == ("eu", False)
    assert len(told["policy"]["witnesses"]) == 3


async def _trusting_the_log(nursery: trio.Nursery, h: QuorumHarness, log: Log) -> tuple[Any, NodeDaemon]:
    """The node connected, and following the log to a checkpoint that meets its quorum (two of three witnesses)."""
    broker = await start(nursery, h)
    d = h.daemon
    assert d.session is not None
    broker.offer = cosign(log.service.latest.note, WITNESSES[0], WITNESSES[1])  # type: ignore[union-attr]
    assert await d.sync(d.session)
    return broker, d


async def _deu_moved_short_of_the_quorum(
    nursery: trio.Nursery, h: QuorumHarness, log: Log, deu: identity.Identity
) -> tuple[Any, NodeDaemon, identity.Identity]:
    """FRA's node trusting the log; then DEU moves to new keys, in a checkpoint one cosignature short of the
    quorum, which the node has verified. Returns the broker, the daemon and DEU's new identity."""
    from .test_node_rekey import _rekey

    broker, d = await _trusting_the_log(nursery, h, log)
    assert d.session is not None
    new = _rekey(log, deu, b"DEU moved")
    broker.offer = cosign(log.service.latest.note, WITNESSES[0])  # type: ignore[union-attr]  # short of it
    assert await d.sync(d.session)
    return broker, d, new


async def test_a_packet_signed_with_keys_whose_rekey_waits_for_the_quorum_is_held_then_taken(
    world: dict[str, Any], members: dict[str, identity.Identity]
) -> None:
    """A review: DEU moved to new keys, and its first packet with them came while the checkpoint holding the
    rekey still lacked its quorum. The node had verified the rekey but could not use it, and refused the packet as
    forged, with an alarm; it then sat in the broker's mailbox until the next connection. It is held, as a
    delivery from a sender not in the trusted log is, and taken once the quorum is met; a forwarded acknowledgement
    DEU signed with its new key meanwhile is taken from the log then, not refused."""
    from .test_node_rekey import _rekey, deliver

    fra, deu = members["FRA"], members["DEU"]
    h = QuorumHarness(world, fra)
    log: Log = world["log"]
    sent_data, sent = sealed(fra, [deu], b"sent")
    h.daemon.store.enqueue(sent.core.packet_id, sent.digest, ["DEU"], NOW, NOW + 3600, sent_data)
    async with trio.open_nursery() as nursery:
        broker, d = await _trusting_the_log(nursery, h, log)
        assert d.session is not None
        new = _rekey(log, deu, b"DEU moved")
        log.add(records.packet_entry(sent.header.raw, sent.signature, NOW))
        ack = records.Ack.make(new.signing, sent.core.packet_id, sent.digest, "FRA", "DEU", NOW)
        signed = log.add(records.ack_entry(ack))
        broker.offer = cosign(signed, WITNESSES[0])  # one cosignature: short of the quorum
        assert await d.sync(d.session)
        assert d.follower.awaiting
        data, head = sealed(new, [fra], b"with DEU's new key")
        await deliver(broker, 1, data, head)
        await wait_for(lambda: d.holding() == 1)
        await broker.send(ev.AckForward(2, sent.core.packet_id, "DEU", 5, ack.raw))
        while not isinstance(msg := await broker.events.receive(), ev.Seen):
            assert not isinstance(msg, ev.Refuse | ev.Ack), msg
        assert d.store.alarms() == []
        broker.offer = cosign(signed, WITNESSES[0], WITNESSES[1])
        assert await d.sync(d.session)
        await wait_for(lambda: d.store.inbox_get(head.digest) is not None)
        while not isinstance(msg := await broker.events.receive(), ev.Ack):
            assert not isinstance(msg, ev.Refuse), msg
        assert msg.seq == 1
        assert d.store.acks_for(sent.core.packet_id) == {"DEU": ack.raw}  # from the log, now trusted
        assert d.store.alarms() == []
        nursery.cancel_scope.cancel()


async def test_a_delivery_whose_senders_rekey_never_meets_the_quorum_is_refused_for_that_not_as_forged(
    world: dict[str, Any], members: dict[str, identity.Identity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last session's note: a delivery held while its sender's rekey waited for the quorum was, past HOLD_TIME,
    checked under the sender's old key and refused with the alarm of a forgery. The witnesses are what is missing:
    the refusal and the alarm say so, and the packet is not taken."""
    from valise.node import session as session_module
    from valise.wire import codes

    from .test_node_rekey import deliver

    monkeypatch.setattr(session_module, "HOLD_TIME", 0.3)
    monkeypatch.setattr(session_module, "HOLD_RECHECK", 0.05)
    fra, deu = members["FRA"], members["DEU"]
    h = QuorumHarness(world, fra)
    async with trio.open_nursery() as nursery:
        broker, d, new = await _deu_moved_short_of_the_quorum(nursery, h, world["log"], deu)
        assert d.follower.pending_keys("DEU") == [new.bundle.sign_key]
        data, head = sealed(new, [fra], b"with DEU's new key")
        await deliver(broker, 1, data, head)
        refusal = await broker.expect(ev.Refuse)
        assert (refusal.seq, refusal.code) == (1, codes.BAD_SIGNATURE)
        (alarm,) = d.store.alarms()
        assert "sender DEU's new keys, which signed it, still wait for the witness quorum after 0.3 s" in alarm.message
        assert "does not verify" not in alarm.message
        assert d.store.inbox_get(head.digest) is None
        assert d.holding() == 0
        nursery.cancel_scope.cancel()


async def test_a_delivery_no_key_of_its_sender_signs_is_refused_as_forged_at_once_while_a_rekey_waits(
    world: dict[str, Any], members: dict[str, identity.Identity]
) -> None:
    """A review: while DEU's rekey waited for the quorum, a header signed by a thief's key (neither DEU's trusted
    key nor the one its pending rekey names) was held like one signed with the new key, then refused as "waiting
    for the quorum". Held are only headers the pending key signs; this one is refused at once, as forged."""
    from valise.crypto.seeded import seeded_random
    from valise.wire import codes

    from .test_node_rekey import deliver

    fra, deu = members["FRA"], members["DEU"]
    h = QuorumHarness(world, fra)
    async with trio.open_nursery() as nursery:
        broker, d, new = await _deu_moved_short_of_the_quorum(nursery, h, world["log"], deu)
        thief = identity.rotate(deu, seeded_random(b"thief"), NOW + 1)
        assert thief.bundle.sign_key not in (deu.bundle.sign_key, new.bundle.sign_key)
        data, head = sealed(thief, [fra], b"forged in DEU's name")
        await deliver(broker, 1, data, head)
        refusal = await broker.expect(ev.Refuse)
        assert (refusal.seq, refusal.code) == (1, codes.BAD_SIGNATURE)
        assert d.holding() == 0
        (alarm,) = d.store.alarms()
        assert "signature does not verify" in alarm.message
        assert "quorum" not in alarm.message
        nursery.cancel_scope.cancel()
