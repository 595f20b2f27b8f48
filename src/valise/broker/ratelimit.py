"""How many statements a member may have the broker log, per broker run: a token bucket (pure; time passed in).

Every statement ever logged stays in every node's and the broker's policy state (a revoked grant is still shown,
and its id guards against its replay), and in every node's kept log: a member that grants and revokes in a loop
grew the broker's and every node's memory by ~5.5 kB a statement, ~1 GB an hour at the rate one connection
reached (a hostile-member review), with no other member's consent needed. The live-statement limit bounds
nothing there, since each revoke frees its slot. A member makes a few hundred statements when it joins (a grant
and an acceptance for each partner) and few after: BURST covers the first, RATE the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BURST = 512  # statements a member may have logged at once, from a full bucket
RATE = 64 / 3600  # statements per second a member's bucket fills again by: 64 an hour


@dataclass
class StatementBudget:
    burst: float = BURST
    rate: float = RATE
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # member → (tokens, at)

    def take(self, member: str, now: float) -> float:
        """Take one statement from `member`'s bucket at `now` (monotonic seconds): 0.0 if it may be logged, else
        how many seconds until it may."""
        tokens, at = self._buckets.get(member, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[member] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[member] = (tokens - 1, now)
        return 0.0
