"""The outbox's decisions: when to retry, which broker answers are final (pure).

Retries use exponential backoff with *full jitter* (the delay is drawn uniformly in [0, min(cap, base·2^n)]),
so that nodes which lost the broker at the same moment do not all come back at the same moment. The randomness
is passed in, as everywhere in the core.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from valise.wire import codes

Random = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float
    cap: float

    def ceiling(self, attempt: int) -> float:
        """The largest delay after `attempt` failures (attempt 0 is the first retry)."""
        return min(self.cap, self.base * 2.0 ** min(attempt, 62))

    def delay(self, attempt: int, random: Random) -> float:
        """A delay drawn uniformly in [0, ceiling(attempt)] (full jitter)."""
        fraction = int.from_bytes(random(8), "big") / 2.0**64
        return fraction * self.ceiling(attempt)


# specs/protocol.md: a queued packet is retried from 1 s doubling to 5 min; a lost connection from 0.5 s to 30 s.
SEND_RETRY = Backoff(1.0, 300.0)
RECONNECT = Backoff(0.5, 30.0)

# Answers to a submission that mean "this packet will never be accepted as it is": the outbox stops trying.
# Everything else (internal, shutting-down, timeout, codes this version does not know) is worth a retry.
FINAL_CODES = frozenset(
    {
        codes.BAD_PACKET,
        codes.SENDER_MISMATCH,
        codes.BAD_SIGNATURE,
        codes.STALE,
        codes.REPLAY,
        codes.HASH_MISMATCH,
        codes.UNKNOWN_MEMBER,
        codes.SUSPENDED,
        codes.REFUSED,
        codes.UNAUTHENTICATED,
    }
)


def is_final(code: str) -> bool:
    """Whether an `error` answering a submission ends it for good (else: retry later)."""
    return code in FINAL_CODES
