"""How the broker asks its witnesses to cosign a checkpoint (specs/protocol.md, "Nodes": witnesses)."""

from __future__ import annotations

from dataclasses import dataclass

from valise.logservice import LogService
from valise.tlog import note

COSIGN_TIMEOUT = 3.0
# Witnesses are asked in waves, not all at once: a round asks up to 99, and each costs the broker ~0.25 ms (a
# request, an answer, a signature to verify). All at once, they held up every packet in flight for ~15 ms once a
# second, which set the broker's p99 latency; 10 every 10 ms still made a backlog that a broker near its core's
# capacity took a few hundred ms to drain. 10 every 40 ms spreads a full round over ~0.4 s (at most half the
# checkpoint interval, so a round's cosigned note is out before the next checkpoint replaces it).
COSIGN_WAVE = 10
COSIGN_PACE = 0.04


@dataclass(frozen=True, slots=True)
class CosignRound:
    """One request to witnesses: the same note and consistency proof for each of them, made once per round (a
    proof reads the tree from the store; a round asks up to 99 witnesses)."""

    signed_note: bytes
    text: bytes  # the note's text, which each cosignature signs
    old: int
    proof: tuple[bytes, ...]

    @classmethod
    def make(cls, log: LogService, signed_note: bytes, old: int) -> CosignRound:
        text = note.parse_note(signed_note).text.encode()
        return cls(signed_note, text, old, tuple(log.consistency_proof(old)))


def wave_pace(witnesses: int, checkpoint_interval: float) -> float:
    """The pause between two waves of a cosigning round: COSIGN_PACE, or less if the round's waves would not
    all be asked within half the checkpoint interval (whose next checkpoint would replace the note first)."""
    waves = -(-witnesses // COSIGN_WAVE)
    if waves <= 1:
        return 0.0
    return min(COSIGN_PACE, checkpoint_interval / 2 / (waves - 1))


def pick_witnesses(names: list[str], turn: int, limit: int) -> list[str]:
    """The witnesses to ask on cosigning `turn`: all of `names` if they fit in `limit`, else a window of `limit`
    names (in sorted order, wrapping) that moves on by `limit` each turn, so every witness cosigns in turn."""
    ordered = sorted(names)
    if len(ordered) <= limit:
        return ordered
    start = (turn * limit) % len(ordered)
    return [ordered[(start + i) % len(ordered)] for i in range(max(limit, 0))]
