"""A deterministic byte source for test vectors, reproducible fixtures and benchmarks — never for real keys.

`seeded_random(seed)` draws SHA-256(seed ‖ u64be(counter)) blocks in order, so the same seed and the same sequence
of draws give the same bytes on every machine. The packet vectors in specs/vectors/ are defined in terms of it
(specs/packet.md, "Test vectors"). Real keys and packet ids come from `os.urandom`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable


def seeded_random(seed: bytes) -> Callable[[int], bytes]:
    counter = 0

    def draw(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
            counter += 1
        return out[:n]

    return draw
