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
class MemberBuckets:
    """A token bucket per member: `burst` at once, refilled at `rate` a second (statements, log lines)."""

    burst: float
    rate: float
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # member → (tokens, at)

    def take(self, member: str, now: float) -> float:
        """Take one token from `member`'s bucket at `now` (monotonic seconds): 0.0 if there was one, else how many
        seconds until there is."""
        tokens, at = self._buckets.get(member, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[member] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[member] = (tokens - 1, now)
        return 0.0


# What one member's peer-caused warnings may write to the broker's log: a hostile-member review answered every
# pushed notice with a 1 KiB `refuse`, reconnecting to have them pushed again, and the broker's log grew by 11 MB
# a second (on a journald host, its rate limit would then have dropped the broker's own errors too).
LOG_BURST = 20
LOG_RATE = 1 / 60  # lines a second, after the burst
LOG_TEXT = 200  # characters of a peer's own text a line quotes


@dataclass
class LogBudget:
    burst: float = LOG_BURST
    rate: float = LOG_RATE
    _buckets: MemberBuckets = field(init=False)
    _held: dict[str, int] = field(default_factory=dict)  # member → lines not written since its last one

    def __post_init__(self) -> None:
        self._buckets = MemberBuckets(self.burst, self.rate)

    def allow(self, member: str, now: float) -> int | None:
        """None if `member`'s next warning is not to be written; else how many were held back before it."""
        if self._buckets.take(member, now):
            self._held[member] = self._held.get(member, 0) + 1
            return None
        return self._held.pop(member, 0)

    def flush(self, member: str) -> int:
        """How many of `member`'s warnings were held back since its last written line, now said (at most one line
        per connection: a member reconnecting in a loop gets one short line per connection, not its texts)."""
        return self._held.pop(member, 0)


def quoted(text: str) -> str:
    """A peer's text as a log line quotes it: repr-escaped (no line breaks, no terminal controls), and cut."""
    cut = text if len(text) <= LOG_TEXT else text[:LOG_TEXT] + f"… ({len(text)} characters)"
    return repr(cut)
