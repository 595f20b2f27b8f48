"""decide(): may this packet go to each of its recipients? Deny by default, with a reason a person understands.

A → B is allowed at time `now` only if all of these hold (specs/policy.md, "Evaluation"):
1. the packet is well labelled, not expired, and no operator rule forbids it (banned category, size, TLP);
2. A and B are active members, B ≠ A, and, if the packet names an operation, the operation is running and
   both A and B are in it;
3. A has a live grant that covers B — to B by name, or to a group B is in — valid at `now`, whose TLP is at
   least the packet's, whose categories include all the packet's, and whose size limit the packet fits;
   TLP:RED needs a grant naming B; AMBER+STRICT never goes to a `partner` through a group grant;
4. B has a live acceptance that covers A in the same way (by name, or a group A is in).
Anything else is a deny, and the reason names the rule, the statement and the terms that fell short.

The state is indexed so that a decision is a few dict lookups per recipient; the explanation of a deny is
only built on the deny path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from valise.labels import TLP, tlp_rank
from valise.policy.records import GROUP_PREFIX
from valise.policy.state import ACTIVE, Member, PolicyState, Statement
from valise.utctime import utc

_RANK = {level.label: int(level) for level in TLP}
_LABEL = {int(level): level.label for level in TLP}
RED = int(TLP.RED)
AMBER_STRICT = int(TLP.AMBER_STRICT)
AMBER = int(TLP.AMBER)
_NO_STATEMENTS: dict[str, list[Statement]] = {}


@dataclass(frozen=True, slots=True)
class PacketMeta:
    """What policy needs to know of a packet (its labels and envelope, never its content)."""

    sender: str
    to: tuple[str, ...]
    tlp: str
    categories: tuple[str, ...] = ()
    operation: str | None = None
    size: int = 0
    created: int = 0
    expires: int | None = None


class Verdict(NamedTuple):
    recipient: str
    allowed: bool
    reason: str
    grant: bytes | None = None  # the statements that allowed it
    accept: bytes | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    verdicts: tuple[Verdict, ...]

    @property
    def allowed(self) -> bool:
        """True when every recipient is allowed (and there is at least one)."""
        return bool(self.verdicts) and all(v.allowed for v in self.verdicts)

    @property
    def denied(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if not v.allowed)


def when(t: int) -> str:
    """A time as people read it in reasons (UTC, to the second); never raises, whatever a signer put there."""
    return utc(t)


def _cats(cats: frozenset[str] | None) -> str:
    return "any category" if cats is None else ", ".join(sorted(cats))


def decide(state: PolicyState, meta: PacketMeta, now: int) -> Decision:
    """Per recipient, allow or deny `meta` as of `state` at time `now`."""
    rank = _RANK.get(meta.tlp)
    cats = frozenset(meta.categories)
    why = _packet_denial(state, meta, rank, cats, now)
    if why is not None:
        return Decision(tuple(Verdict(r, False, why) for r in meta.to))
    assert rank is not None
    sender: Member = state.members[meta.sender]
    grants = state.grants.get(meta.sender, _NO_STATEMENTS)
    operation = state.groups[meta.operation] if meta.operation is not None else None
    out = []
    for r in meta.to:
        recipient = state.members.get(r)
        if recipient is None or recipient.status != ACTIVE:
            out.append(Verdict(r, False, _not_active(r, recipient, "receive")))
            continue
        if r == meta.sender:
            out.append(Verdict(r, False, f"{r} cannot be a recipient of its own packet"))
            continue
        if operation is not None and r not in operation.members:
            out.append(Verdict(r, False, f"{r} is not in operation {operation.name}"))
            continue
        g = _find_grant(state, grants, recipient, rank, cats, meta.size, now)
        if g is None:
            out.append(Verdict(r, False, _explain_grant(state, grants, recipient, meta, rank, cats, now)))
            continue
        accepts = state.accepts.get(r, _NO_STATEMENTS)
        a = _find_accept(state, accepts, sender, rank, cats, now)
        if a is None:
            out.append(Verdict(r, False, _explain_accept(state, accepts, sender, recipient, meta, rank, cats, now)))
            continue
        out.append(
            Verdict(r, True, f"allowed by {meta.sender}'s grant {g.short} and {r}'s acceptance {a.short}", g.id, a.id)
        )
    return Decision(tuple(out))


def _not_active(mid: str, member: Member | None, verb: str) -> str:
    if member is None:
        return f"{mid} is not a member"
    reason = f" ({member.reason})" if member.reason else ""
    return f"{mid} is {member.status}{reason} and can neither send nor receive"


def _packet_denial(
    state: PolicyState, meta: PacketMeta, rank: int | None, cats: frozenset[str], now: int
) -> str | None:
    """The reason no recipient can get this packet, or None."""
    if rank is None:
        return f"TLP {meta.tlp[:40]!r} is not a TLP 2.0 level"
    sender = state.members.get(meta.sender)
    if sender is None or sender.status != ACTIVE:
        return _not_active(meta.sender, sender, "send")
    if meta.expires is not None and now >= meta.expires:
        return f"the packet expired at {when(meta.expires)}"
    if state.banned and not cats.isdisjoint(state.banned):
        cat = min(cats & state.banned.keys())
        return f"category {cat!r} is banned by operator rule {state.banned[cat].short}"
    if state.size_limit is not None and meta.size > int(state.size_limit.value):
        limit = state.size_limit
        return f"the packet is {meta.size} bytes, over the operator's limit of {limit.value} (rule {limit.short})"
    if state.tlp_limit is not None and rank > tlp_rank(str(state.tlp_limit.value)):
        limit = state.tlp_limit
        return f"TLP:{meta.tlp} is above the operator's limit of TLP:{limit.value} (rule {limit.short})"
    if meta.operation is not None:
        op = state.groups.get(meta.operation)
        if op is None or op.kind != "operation":
            return f"{meta.operation!r} is not an operation"
        if not op.running(now):
            start = when(op.start) if op.start is not None else "the beginning"
            end = when(op.end) if op.end is not None else "no end"
            return f"operation {op.name} is not running (it runs from {start} to {end})"
        if meta.sender not in op.members:
            return f"{meta.sender} is not in operation {op.name}"
    return None


def _grant_problem(
    state: PolicyState, g: Statement, recipient: Member, rank: int, cats: frozenset[str], size: int, now: int
) -> tuple[int, str] | None:
    """Why grant `g` does not cover this packet to `recipient` (a depth, for picking the closest; a reason)."""
    if g.valid_from is not None and now < g.valid_from:
        return 0, f"{g.author}'s grant {g.short} to {g.counterpart} only starts at {when(g.valid_from)}"
    if g.valid_until is not None and now >= g.valid_until:
        return 0, f"{g.author}'s grant {g.short} to {g.counterpart} ended at {when(g.valid_until)}"
    if g.group is not None:
        grp = state.groups[g.group]
        if not grp.running(now):
            return 1, f"{g.author}'s grant {g.short} is to operation {grp.name}, which is not running"
        if rank == RED:
            return 4, (
                f"TLP:RED needs a grant that names {recipient.id} individually; "
                f"{g.author}'s grant {g.short} is to group {g.group}"
            )
        if rank == AMBER_STRICT and recipient.kind == "partner":
            return 4, (
                f"TLP:AMBER+STRICT never goes to a partner ({recipient.id}) through a group grant "
                f"({g.author}'s grant {g.short} to group {g.group})"
            )
    if rank > g.rank:
        return 2, f"{g.author} has granted {recipient.id} up to TLP:{g.tlp} only (grant {g.short})"
    if g.categories is not None:
        if not cats:
            return 3, (
                f"{g.author}'s grant {g.short} to {g.counterpart} covers only {_cats(g.categories)}, "
                "and the packet has no category"
            )
        if not cats <= g.categories:
            missing = sorted(cats - g.categories)
            word = "category" if len(missing) == 1 else "categories"
            return 3, (
                f"{g.author} has not granted {recipient.id} {word} {', '.join(repr(c) for c in missing)} "
                f"(grant {g.short} covers {_cats(g.categories)})"
            )
    if g.max_size is not None and size > g.max_size:
        return 3, f"the packet is {size} bytes, over the limit of {g.max_size} in {g.author}'s grant {g.short}"
    return None


def _accept_problem(
    state: PolicyState, a: Statement, sender: Member, rank: int, cats: frozenset[str], now: int
) -> tuple[int, str] | None:
    if a.valid_from is not None and now < a.valid_from:
        return 0, f"{a.author}'s acceptance {a.short} from {a.counterpart} only starts at {when(a.valid_from)}"
    if a.valid_until is not None and now >= a.valid_until:
        return 0, f"{a.author}'s acceptance {a.short} from {a.counterpart} ended at {when(a.valid_until)}"
    if a.group is not None and not state.groups[a.group].running(now):
        return 1, f"{a.author}'s acceptance {a.short} is from operation {a.group}, which is not running"
    if rank > a.rank:
        return 2, f"{a.author} accepts from {sender.id} up to TLP:{a.tlp} only (acceptance {a.short})"
    if a.categories is not None:
        if not cats:
            return 3, (
                f"{a.author}'s acceptance {a.short} from {a.counterpart} covers only {_cats(a.categories)}, "
                "and the packet has no category"
            )
        if not cats <= a.categories:
            missing = sorted(cats - a.categories)
            word = "category" if len(missing) == 1 else "categories"
            return 3, (
                f"{a.author} has not accepted {word} {', '.join(repr(c) for c in missing)} from {sender.id} "
                f"(acceptance {a.short} covers {_cats(a.categories)})"
            )
    return None


def _candidates(
    index: dict[str, list[Statement]], party: Member, groups_of: dict[str, tuple[str, ...]]
) -> list[Statement]:
    """Live statements naming `party`, then those naming each of its groups (a fixed, deterministic order)."""
    found = list(index.get(party.id, ()))
    for name in groups_of.get(party.id, ()):
        found.extend(index.get(GROUP_PREFIX + name, ()))
    return found


def _find_grant(
    state: PolicyState,
    grants: dict[str, list[Statement]],
    recipient: Member,
    rank: int,
    cats: frozenset[str],
    size: int,
    now: int,
) -> Statement | None:
    for g in grants.get(recipient.id, ()):
        if _grant_problem(state, g, recipient, rank, cats, size, now) is None:
            return g
    for name in state.groups_of.get(recipient.id, ()):
        for g in grants.get(GROUP_PREFIX + name, ()):
            if _grant_problem(state, g, recipient, rank, cats, size, now) is None:
                return g
    return None


def _find_accept(
    state: PolicyState, accepts: dict[str, list[Statement]], sender: Member, rank: int, cats: frozenset[str], now: int
) -> Statement | None:
    for a in accepts.get(sender.id, ()):
        if _accept_problem(state, a, sender, rank, cats, now) is None:
            return a
    for name in state.groups_of.get(sender.id, ()):
        for a in accepts.get(GROUP_PREFIX + name, ()):
            if _accept_problem(state, a, sender, rank, cats, now) is None:
                return a
    return None


def _closest(problems: list[tuple[int, str]], none: str) -> str:
    if not problems:
        return none
    best = max(problems, key=lambda p: p[0])  # the first of the deepest: log order breaks ties
    others = len(problems) - 1
    return best[1] + (f" (and {others} other statement{'s' if others > 1 else ''} fall short too)" if others else "")


def _explain_grant(
    state: PolicyState,
    grants: dict[str, list[Statement]],
    recipient: Member,
    meta: PacketMeta,
    rank: int,
    cats: frozenset[str],
    now: int,
) -> str:
    problems = [
        p
        for g in _candidates(grants, recipient, state.groups_of)
        if (p := _grant_problem(state, g, recipient, rank, cats, meta.size, now)) is not None
    ]
    return _closest(problems, f"{meta.sender} has not granted anything to {recipient.id} or to a group it is in")


def _explain_accept(
    state: PolicyState,
    accepts: dict[str, list[Statement]],
    sender: Member,
    recipient: Member,
    meta: PacketMeta,
    rank: int,
    cats: frozenset[str],
    now: int,
) -> str:
    problems = [
        p
        for a in _candidates(accepts, sender, state.groups_of)
        if (p := _accept_problem(state, a, sender, rank, cats, now)) is not None
    ]
    return _closest(problems, f"{recipient.id} has not accepted anything from {sender.id} or from a group it is in")


def tlp_label(rank: int) -> str:
    return _LABEL[rank]
