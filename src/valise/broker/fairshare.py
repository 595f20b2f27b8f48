"""Each member's share of the broker's one thread, so that no member's requests can crowd the others out (pure;
time passed in).

The broker runs every session on one Python thread. A member whose requests cost it little and the broker much
(heads with 250 recipients to be denied, `get-entries` of thousands of entries again and again, on its node
connection and four auditor connections at once) took three quarters of that thread, and an honest exchange meanwhile
ran at a quarter of its speed (a hostile-member review). Sessions report the time the requests a member chooses
take (`charge`: heads checked, entries and proofs served, acknowledgements verified); before a session reads its
member's next frame it asks how long to wait (`pause`). specs/wire.md, "Limits", states the rule for clients.

A member is held back only when the thread is busy (BUSY of it used lately, by everything the broker does) and
the member's requests take more than its share: 1.5 times an even split among the connected members, and never
less than FLOOR. So a broker with room to spare never slows anyone; honest members, whose requests cost little
(their packets' checks, their acknowledgements' signatures: under a tenth of the thread at full speed), are never
held back; and under contention a member flooding the broker with costly requests waits until its recent use has
decayed to its share, which gives the thread, and the turns in its queue, back to the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

HALF_LIFE = 1.0  # seconds: how fast past use is forgotten
BUSY = 0.5  # of the thread, used lately by everything the broker does: below it, nobody waits
SHARE_FACTOR = 1.5  # times an even split that a member may use under contention
FLOOR = 0.1  # of the thread, that a member may always use
FORGOTTEN = 1e-4  # of the thread: a member whose use has decayed below this is forgotten
MAX_PAUSE = 0.5  # seconds a member waits at most before its next frame is read (then it is asked again)
METER_INTERVAL = 0.25  # seconds between two readings of how busy the thread is

_DECAY = math.log(2) / HALF_LIFE


def smoothed(before: float, reading: float) -> float:
    """How busy the thread is, from the last value and a new reading METER_INTERVAL later (decayed as use is)."""
    keep = math.exp(-_DECAY * METER_INTERVAL)
    return before * keep + reading * (1 - keep)


@dataclass
class CpuShares:
    """Recent thread use per member, as an exponentially decayed sum (seconds), and the rate it stands for."""

    _used: dict[str, tuple[float, float]] = field(default_factory=dict)  # member → (decayed seconds, at)

    def charge(self, member: str, seconds: float, now: float) -> None:
        """`member`'s tasks used the thread for `seconds`, up to `now` (monotonic seconds)."""
        used, at = self._used.get(member, (0.0, now))
        self._used[member] = (used * math.exp(-_DECAY * max(now - at, 0.0)) + seconds, now)

    def rate(self, member: str, now: float) -> float:
        """The share of the thread `member` used lately (1.0: all of it)."""
        used, at = self._used.get(member, (0.0, now))
        return _DECAY * used * math.exp(-_DECAY * max(now - at, 0.0))

    def pause(self, member: str, now: float, busy: float, members: Callable[[], int]) -> float:
        """Seconds `member`'s next frame should wait, given `busy`, the share of the thread the broker used lately
        (all its work, not only what sessions charged), and `members()`, how many members are connected: 0.0
        unless the thread is busy and `member` is over its share, else until its use has decayed to the share (at
        most MAX_PAUSE). The split is among the connected members, not those charged for much: an honest
        exchange costs the broker mostly work no request chooses (pushes, commits, TLS), so its members' charged
        use is small, and a flooding member would otherwise seem the only one using the thread."""
        if busy < BUSY:  # checked first: it is read for every frame, and a compare costs nothing
            return 0.0
        mine = self.rate(member, now)
        if mine <= FLOOR:
            return 0.0
        share = max(FLOOR, SHARE_FACTOR * busy / max(members(), 1))
        if mine <= share:
            return 0.0
        return min(MAX_PAUSE, math.log(mine / share) / _DECAY)

    def forget(self, now: float) -> None:
        """Drop the members whose use has decayed to nothing (members come and go; the load meter calls this)."""
        for member in [m for m in self._used if self.rate(m, now) < FORGOTTEN]:
            del self._used[member]

    def members(self) -> list[str]:
        """The members whose use is kept."""
        return list(self._used)
