"""The broker's admission decision (valise.broker.relay.admit) on its own: real packets, a real folded policy."""

from __future__ import annotations

import time
from pathlib import Path

from valise import packet
from valise.broker import relay
from valise.broker.mailbox import PacketRow
from valise.policy.state import PolicyState
from valise.store.sqlite import SqliteLog
from valise.wire import codes

from .harness import ORIGIN, World, make_world, seal


def _policy(world: World) -> PolicyState:
    state = PolicyState(ORIGIN, world.home.operator_key().public)
    with SqliteLog.open(world.home.db_path) as store:
        state.apply_all(store.entries(0, store.size()))
    return state


def _head(data: bytes) -> packet.Head:
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return head


def test_a_decision_again_checks_the_signature_unless_it_was_checked_with_the_current_key(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU")
    state = _policy(world)
    now = int(time.time())
    data = seal(world, "FRA", ["DEU"], b"x")
    assert isinstance(relay.admit(state, "FRA", _head(data), None, now), relay.Admitted)

    forged = bytearray(data)
    forged[_head(data).head_size - 1] ^= 1
    head = _head(bytes(forged))
    rejected = relay.admit(state, "FRA", head, None, now)
    assert isinstance(rejected, relay.Reject)
    assert rejected.code == codes.BAD_SIGNATURE
    # Checked before with some other key (the sender's key changed since): checked again, and refused.
    again = relay.admit(state, "FRA", head, None, now, signature_checked_with=bytes(32))
    assert isinstance(again, relay.Reject)
    assert again.code == codes.BAD_SIGNATURE
    # Checked with the key the policy holds now: the same bytes need no second verification.
    current = state.members["FRA"].sign_key
    assert isinstance(relay.admit(state, "FRA", head, None, now, signature_checked_with=current), relay.Admitted)


def test_policy_is_decided_before_replay_and_the_time_window_but_after_an_exact_resubmission(tmp_path: Path) -> None:
    """The issue's order of the relay steps: policy, then the replay check and the time window. Only the same
    packet again (a retry after a lost receipt) comes first: it is in the log already and gets its receipt."""
    world = make_world(tmp_path)
    state = _policy(world)  # FRA has no consent to send to DEU
    now = int(time.time())
    pid = bytes(range(16))
    first = _head(seal(world, "FRA", ["DEU"], b"first", packet_id=pid))
    logged = PacketRow(first.digest, "FRA", pid, 7, now + 3600, 100, now)

    late = now + 3600  # the packets were created an hour before this broker time: outside its window
    stale = relay.admit(state, "FRA", _head(seal(world, "FRA", ["DEU"], b"old")), None, late)
    assert isinstance(stale, relay.Denied), stale
    other = _head(seal(world, "FRA", ["DEU"], b"another packet, the same id", packet_id=pid))
    replayed = relay.admit(state, "FRA", other, logged, now)
    assert isinstance(replayed, relay.Denied), replayed
    assert [to for to, _ in replayed.reasons] == ["DEU"]
    assert relay.admit(state, "FRA", first, logged, now) == relay.Duplicate(logged)

    world.consent("FRA", "DEU")
    state = _policy(world)
    replayed = relay.admit(state, "FRA", other, logged, now)
    assert isinstance(replayed, relay.Reject)
    assert replayed.code == codes.REPLAY
    stale = relay.admit(state, "FRA", _head(seal(world, "FRA", ["DEU"], b"old")), None, late)
    assert isinstance(stale, relay.Reject)
    assert stale.code == codes.STALE
