"""Shared fixtures: real keys and real files, no mocks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from valise import identity


def seeded_random(seed: bytes) -> Callable[[int], bytes]:
    """A deterministic byte source (SHA-256 in counter mode) for reproducible keys and vectors."""
    counter = 0

    def draw(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
            counter += 1
        return out[:n]

    return draw


NOW = 1_790_000_000  # 2026-09-21, a fixed clock for pure tests


@pytest.fixture(scope="session")
def members() -> dict[str, identity.Identity]:
    """Identities FRA, DEU, ITA, NGA, ACME generated from fixed seeds."""
    return {m: identity.generate(m, seeded_random(m.encode()), NOW) for m in ("FRA", "DEU", "ITA", "NGA", "ACME")}
