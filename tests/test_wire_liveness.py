"""The ping / give-up rule of specs/wire.md, "Timeouts" (time passed in)."""

from __future__ import annotations

from valise.wire.liveness import ANSWER, IDLE, Liveness, Step


def test_a_quiet_peer_is_pinged_once_then_given_up() -> None:
    live = Liveness(last_heard=100.0)
    assert live.step(100.0 + IDLE - 0.1) is Step.NOTHING
    assert live.step(100.0 + IDLE) is Step.PING
    assert live.step(100.0 + IDLE + 1) is Step.NOTHING  # one ping per quiet spell
    assert live.step(100.0 + IDLE + ANSWER - 0.1) is Step.NOTHING
    assert live.step(100.0 + IDLE + ANSWER) is Step.DEAD
    assert "not even the answer to a ping" in live.silence(100.0 + IDLE + ANSWER)


def test_the_answer_window_counts_from_the_ping_not_from_the_silence() -> None:
    live = Liveness(last_heard=0.0)
    assert live.step(IDLE + 20) is Step.PING  # checked late: the peer still gets its full ANSWER seconds
    assert live.step(IDLE + ANSWER) is Step.NOTHING
    assert live.step(IDLE + 20 + ANSWER) is Step.DEAD


def test_any_traffic_is_a_sign_of_life() -> None:
    live = Liveness(last_heard=0.0)
    assert live.step(IDLE) is Step.PING
    live.heard(IDLE + 5)  # the pong, or any other frame
    assert live.step(IDLE + ANSWER + 1) is Step.NOTHING
    assert live.step(IDLE + 5 + IDLE) is Step.PING  # a new quiet spell, a new ping
