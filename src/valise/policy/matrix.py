"""The effective channels between all members at one time (pure): who may send what to whom.

For each ordered pair of active members (A, B) and each pair of a live grant of A covering B and a live
acceptance of B covering A, both valid at `now`, the pair gives a channel *term*: the lower of the two TLP
levels (capped by the built-in rules for group grants and by the operator's TLP limit) and the categories both
allow, minus banned ones. A channel summarises its terms as the highest TLP and the union of categories; the
exact answer for one packet is always `decide` (a packet needs one grant and one acceptance covering all of
its categories at once). Packets that name an operation are not shown: operations are checked per packet.
"""

from __future__ import annotations

from dataclasses import dataclass

from valise.labels import TLP, tlp_rank
from valise.policy.records import GROUP_PREFIX
from valise.policy.state import ACTIVE, PolicyState, Statement

_RED, _STRICT, _AMBER = int(TLP.RED), int(TLP.AMBER_STRICT), int(TLP.AMBER)


@dataclass(frozen=True, slots=True)
class Term:
    rank: int
    categories: frozenset[str] | None  # None = any category
    grant: Statement
    accept: Statement


@dataclass(frozen=True, slots=True)
class Channel:
    sender: str
    recipient: str
    terms: tuple[Term, ...]

    @property
    def rank(self) -> int:
        return max(t.rank for t in self.terms)

    @property
    def categories(self) -> frozenset[str] | None:
        out: set[str] = set()
        for t in self.terms:
            if t.categories is None:
                return None
            out |= t.categories
        return frozenset(out)


def _valid(s: Statement, state: PolicyState, now: int) -> bool:
    if s.valid_from is not None and now < s.valid_from:
        return False
    if s.valid_until is not None and now >= s.valid_until:
        return False
    return s.group is None or state.groups[s.group].running(now)


def _live(index: dict[str, list[Statement]], party: str, groups: tuple[str, ...]) -> list[Statement]:
    found = list(index.get(party, ()))
    for name in groups:
        found.extend(index.get(GROUP_PREFIX + name, ()))
    return found


def channels(state: PolicyState, now: int) -> list[Channel]:
    """Every ordered pair of active members with at least one channel term at `now`, sorted by (from, to)."""
    cap = tlp_rank(str(state.tlp_limit.value)) if state.tlp_limit is not None else _RED
    banned = frozenset(state.banned)
    active = sorted(m.id for m in state.members.values() if m.status == ACTIVE)
    members = state.members
    out = []
    for a in active:
        grants = state.grants.get(a)
        if not grants:
            continue
        a_groups = state.groups_of.get(a, ())
        for b in active:
            if b == a:
                continue
            accepts = state.accepts.get(b)
            if not accepts:
                continue
            gs = [g for g in _live(grants, b, state.groups_of.get(b, ())) if _valid(g, state, now)]
            if not gs:
                continue
            acs = [x for x in _live(accepts, a, a_groups) if _valid(x, state, now)]
            terms = []
            partner = members[b].kind == "partner"
            for g in gs:
                g_cap = g.rank
                if g.group is not None:
                    g_cap = min(g_cap, _AMBER if partner else _STRICT)
                for x in acs:
                    rank = min(g_cap, x.rank, cap)
                    cats = _meet(g.categories, x.categories, banned)
                    if cats is None or cats:
                        terms.append(Term(rank, cats, g, x))
            if terms:
                out.append(Channel(a, b, tuple(terms)))
    return out


def _meet(one: frozenset[str] | None, two: frozenset[str] | None, banned: frozenset[str]) -> frozenset[str] | None:
    """Categories both statements allow, minus banned ones (None = any, which a ban cannot enumerate)."""
    if one is None and two is None:
        return None
    both = one if two is None else two if one is None else one & two
    assert both is not None
    return both - banned
