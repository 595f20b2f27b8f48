"""The broker's admission decision (valise.broker.relay.admit) on its own: real packets, a real folded policy."""

from __future__ import annotations

import time
from pathlib import Path

from valise import packet
from valise.broker import relay
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
