"""The outbox's retry schedule and answer classification (pure)."""

from __future__ import annotations

import pytest

from valise.node import outbox
from valise.wire import codes


def fixed(byte: int) -> outbox.Random:
    return lambda n: bytes([byte]) * n


def test_send_retries_double_from_one_second_to_five_minutes() -> None:
    assert [outbox.SEND_RETRY.ceiling(n) for n in range(10)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert outbox.SEND_RETRY.ceiling(10_000) == 300  # no overflow, still capped


def test_reconnects_double_from_half_a_second_to_thirty() -> None:
    assert [outbox.RECONNECT.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


@pytest.mark.parametrize("attempt", [0, 3, 20])
def test_full_jitter_draws_from_zero_to_the_ceiling(attempt: int) -> None:
    ceiling = outbox.SEND_RETRY.ceiling(attempt)
    assert outbox.SEND_RETRY.delay(attempt, fixed(0)) == 0
    top = outbox.SEND_RETRY.delay(attempt, fixed(0xFF))
    assert ceiling * 0.999 < top <= ceiling
    middle = outbox.SEND_RETRY.delay(attempt, fixed(0x80))
    assert middle == pytest.approx(ceiling * (0x8080808080808080 / 2**64))


def test_only_answers_that_can_never_succeed_are_final() -> None:
    for code in (codes.REPLAY, codes.BAD_SIGNATURE, codes.STALE, codes.SENDER_MISMATCH, codes.HASH_MISMATCH):
        assert outbox.is_final(code)
    for code in (codes.INTERNAL, codes.SHUTTING_DOWN, codes.TIMEOUT, codes.CANCELLED, "some-future-code"):
        assert not outbox.is_final(code)
