"""When to ping a quiet peer, and when to give it up (specs/wire.md, "Timeouts"); the caller passes the time in.

A TCP connection whose peer vanished (a crash behind a firewall, a partition) can stay open for hours without a
byte: each side would hold the other's uploads, spool files and mailbox slot all that while. So each daemon
pings after IDLE seconds without traffic and closes with `timeout` if nothing at all, not even the pong, arrives
within ANSWER seconds more. Any bytes count as a sign of life, not only the pong: a peer busy sending a large
packet is plainly alive.

A transfer that stalls is the other way to hold resources while alive: an upload that gets no data, or a delivery
the receiver grants no credit for, is given up after STALL seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

IDLE = 30.0  # seconds without traffic before a ping
ANSWER = 30.0  # then this long for anything to arrive, the pong at least
STALL = 60.0  # an open transfer that makes no progress for this long is given up
CHECK_EVERY = 5.0  # how often a daemon asks `step` (a bound on how late a verdict comes, not part of the rule)


class Step(enum.Enum):
    NOTHING = "nothing"
    PING = "ping"
    DEAD = "dead"


@dataclass(slots=True)
class Liveness:
    """The last time we heard from the peer, and when we pinged it since (None: not yet)."""

    last_heard: float
    idle: float = IDLE
    answer: float = ANSWER
    pinged_at: float | None = None

    @classmethod
    def starting(cls, now: float) -> Liveness:
        """A peer just heard from, with this module's timeouts as they are now (tests shorten them)."""
        return cls(now, IDLE, ANSWER)

    def heard(self, now: float) -> None:
        self.last_heard = now
        self.pinged_at = None

    def step(self, now: float) -> Step:
        """What to do at `now`: send a ping (once per quiet spell), give the peer up, or nothing."""
        if self.pinged_at is not None:
            return Step.DEAD if now - self.pinged_at >= self.answer else Step.NOTHING
        if now - self.last_heard >= self.idle:
            self.pinged_at = now
            return Step.PING
        return Step.NOTHING

    def silence(self, now: float) -> str:
        """Why the peer was given up, for the `timeout` error's message."""
        return f"nothing received for {now - self.last_heard:.0f} s, not even the answer to a ping"
