"""Shared fixtures: real keys and real files, no mocks."""

from __future__ import annotations

import pytest

from valise import identity
from valise.crypto.seeded import seeded_random

NOW = 1_790_000_000  # 2026-09-21, a fixed clock for pure tests


@pytest.fixture(scope="session")
def members() -> dict[str, identity.Identity]:
    """Identities FRA, DEU, ITA, NGA, ACME generated from fixed seeds."""
    return {m: identity.generate(m, seeded_random(m.encode()), NOW) for m in ("FRA", "DEU", "ITA", "NGA", "ACME")}
