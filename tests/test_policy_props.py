"""Properties of the policy engine, checked with hypothesis over random directories and statements."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valise import encoding, identity
from valise.errors import PolicyError
from valise.labels import TLP
from valise.policy import PacketMeta, PolicyState, Statement, decide, records

from .conftest import NOW
from .test_policy import ORIGIN, World

IDS = ("FRA", "DEU", "ITA", "NGA", "ACME")
CATS = ("malware", "phishing", "fraud")
TLPS = tuple(level.label for level in TLP)
TIMES = (None, NOW - 100, NOW, NOW + 100)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

party = st.sampled_from((*IDS, "group:europe", "group:TRIDENT"))
cats = st.none() | st.sets(st.sampled_from(CATS), min_size=1).map(sorted)
window = st.tuples(st.sampled_from(TIMES), st.sampled_from(TIMES))
action = st.one_of(
    st.tuples(
        st.just("grant"), st.sampled_from(IDS), party, st.sampled_from(TLPS), cats, window, st.sampled_from((None, 500))
    ),
    st.tuples(st.just("accept"), st.sampled_from(IDS), party, st.sampled_from(TLPS), cats, window),
    st.tuples(st.just("revoke"), st.integers(0, 30)),
    st.tuples(st.just("group-add"), st.sampled_from(("europe", "TRIDENT")), st.sampled_from(IDS)),
    st.tuples(st.just("group-remove"), st.sampled_from(("europe", "TRIDENT")), st.sampled_from(IDS)),
    st.tuples(st.just("suspend"), st.sampled_from(IDS)),
    st.tuples(st.just("reinstate"), st.sampled_from(IDS)),
)
# A grant and matching acceptances (for a group grant, every member accepts the sender), with independent terms:
# random statements alone seldom meet, and the properties need allows to bite on. Random actions follow.
pair = st.tuples(
    st.just("pair"), st.sampled_from(IDS), party, st.sampled_from(TLPS), cats, window, st.sampled_from(TLPS), cats
)
story = st.tuples(st.lists(pair, min_size=3, max_size=15), st.lists(action, max_size=20)).map(lambda t: t[0] + t[1])
packet = st.builds(
    PacketMeta,
    sender=st.sampled_from(IDS),
    to=st.lists(st.sampled_from(IDS), min_size=1, max_size=3, unique=True).map(tuple),
    tlp=st.sampled_from(TLPS),
    categories=st.sets(st.sampled_from(CATS), max_size=2).map(lambda s: tuple(sorted(s))),
    size=st.sampled_from((0, 500, 501)),
)
at = st.sampled_from((NOW - 101, NOW - 1, NOW, NOW + 99, NOW + 100, NOW + 10_000))


def build(members: dict[str, identity.Identity], actions: list[tuple[Any, ...]]) -> World:
    """A world from random actions; actions the state refuses (e.g. revoking twice) are dropped, as a broker would."""
    w = World(dict(members))
    w.admit(*IDS)
    w.op("group-create", name="europe", kind="region", start=None, end=None)
    w.op("group-create", name="TRIDENT", kind="operation", start=NOW, end=NOW + 100)
    for name, ids in (("europe", ("FRA", "DEU", "ACME")), ("TRIDENT", ("FRA", "DEU", "NGA"))):
        for mid in ids:
            w.op("group-add", name=name, id=mid)
    made: list[bytes] = []
    for i, a in enumerate(actions):
        try:
            if a[0] == "pair":
                made.append(w.grant(a[1], a[2], a[3], categories=a[4], valid_from=a[5][0]))
                takers = IDS if a[2].startswith("group:") else (a[2],)
                for taker in takers:
                    if taker != a[1]:
                        made.append(w.accept(taker, a[1], a[6], categories=a[7], valid_until=a[5][1]))
            elif a[0] in ("grant", "accept"):
                (lo, hi) = a[5]
                lo, hi = (lo, hi) if lo is None or hi is None or lo < hi else (None, hi)
                terms: dict[str, Any] = {"categories": a[4], "valid_from": lo, "valid_until": hi}
                if a[0] == "grant":
                    made.append(w.grant(a[1], a[2], a[3], max_size=a[6], **terms))
                else:
                    made.append(w.accept(a[1], a[2], a[3], **terms))
            elif a[0] == "revoke" and made:
                sid = made[a[1] % len(made)]
                w.revoke(w.state.statements[sid].author, sid, created=NOW + i)
            elif a[0] in ("group-add", "group-remove"):
                w.op(a[0], name=a[1], id=a[2])
            elif a[0] == "suspend":
                w.op("member-suspend", id=a[1], reason="test")
            elif a[0] == "reinstate":
                w.op("member-reinstate", id=a[1])
        except PolicyError:
            pass
    return w


def covers(state: PolicyState, s: Statement, me: str, other: str, meta: PacketMeta, now: int, grant: bool) -> bool:
    """A reference reading of the rules, by scanning (no indexes): does live statement `s` of `me` cover `other`?"""
    rank = TLP.parse(meta.tlp)
    if s.author != me or s.id in state.revoked:
        return False
    if s.group is None:
        if s.counterpart != other:
            return False
    else:
        g = state.groups[s.group]
        if other not in g.members or not g.running(now):
            return False
        if grant and (rank == TLP.RED or (rank == TLP.AMBER_STRICT and state.members[other].kind == "partner")):
            return False
    if (s.valid_from is not None and now < s.valid_from) or (s.valid_until is not None and now >= s.valid_until):
        return False
    if rank > s.rank:
        return False
    if s.categories is not None and not (meta.categories and set(meta.categories) <= s.categories):
        return False
    return not (grant and s.max_size is not None and meta.size > s.max_size)


def allowed_set(state: PolicyState, metas: list[PacketMeta], now: int) -> set[tuple[int, str]]:
    return {(i, v.recipient) for i, m in enumerate(metas) for v in decide(state, m, now).verdicts if v.allowed}


@SETTINGS
@given(actions=story, metas=st.lists(packet, min_size=1, max_size=8), now=at)
def test_no_allow_without_covering_grant_and_acceptance(
    members: dict[str, identity.Identity], actions: list[tuple[Any, ...]], metas: list[PacketMeta], now: int
) -> None:
    state = build(members, actions).state
    for meta in metas:
        for v in decide(state, meta, now).verdicts:
            live = [s for s in state.statements.values() if s.kind != "revoke"]
            g_ok = any(covers(state, s, meta.sender, v.recipient, meta, now, True) for s in live if s.kind == "grant")
            a_ok = any(covers(state, s, v.recipient, meta.sender, meta, now, False) for s in live if s.kind == "accept")
            both_active = all(state.members[m].status == "active" for m in (meta.sender, v.recipient))
            # decide agrees with the reference reading, in both directions.
            assert v.allowed == (g_ok and a_ok and both_active and meta.sender != v.recipient), v.reason
            if v.allowed:
                assert v.grant is not None
                assert v.accept is not None
                assert covers(state, state.statements[v.grant], meta.sender, v.recipient, meta, now, True)
                assert covers(state, state.statements[v.accept], v.recipient, meta.sender, meta, now, False)
            else:
                assert v.reason


rule = st.one_of(
    st.tuples(st.just("ban-category"), st.sampled_from(CATS).map(lambda c: {"category": c})),
    st.tuples(st.just("max-size"), st.sampled_from((1, 500, 10_000)).map(lambda n: {"size": n})),
    st.tuples(st.just("max-tlp"), st.sampled_from(TLPS).map(lambda t: {"tlp": t})),
)


@SETTINGS
@given(actions=story, metas=st.lists(packet, min_size=1, max_size=8), now=at, new=rule)
def test_an_operator_rule_never_turns_a_deny_into_an_allow(
    members: dict[str, identity.Identity],
    actions: list[tuple[Any, ...]],
    metas: list[PacketMeta],
    now: int,
    new: tuple[str, dict[str, Any]],
) -> None:
    w = build(members, actions)
    before = allowed_set(w.state, metas, now)
    w.rule(new[0], **new[1])
    assert allowed_set(w.state, metas, now) <= before


@SETTINGS
@given(
    actions=story,
    metas=st.lists(packet, min_size=1, max_size=8),
    now=at,
    rules=st.lists(st.tuples(rule, st.booleans()), min_size=1, max_size=5),
)
def test_lifting_rules_leaves_the_policy_of_the_rules_kept(
    members: dict[str, identity.Identity],
    actions: list[tuple[Any, ...]],
    metas: list[PacketMeta],
    now: int,
    rules: list[tuple[tuple[str, dict[str, Any]], bool]],
) -> None:
    """Rules made then some lifted decide exactly as the kept rules alone: a lift never allows beyond them."""
    w, kept = build(members, actions), build(members, actions)
    made = []
    for (kind, fields), lift in rules:
        made.append((records.parse_policy(w.rule(kind, **fields)).id, lift))
        if not lift:
            kept.rule(kind, **fields)
    for rule_id, lift in made:
        if lift:
            w.rule("lift", lifts=rule_id)
    assert allowed_set(w.state, metas, now) == allowed_set(kept.state, metas, now)
    assert [r.id for r in w.state.rules] == [rid for rid, lift in made if not lift]


@SETTINGS
@given(actions=story, metas=st.lists(packet, min_size=1, max_size=8), now=at)
def test_a_revoke_takes_effect_from_its_position(
    members: dict[str, identity.Identity], actions: list[tuple[Any, ...]], metas: list[PacketMeta], now: int
) -> None:
    w = build(members, actions)
    live = [s for s in w.state.statements.values() if s.kind != "revoke" and s.id not in w.state.revoked]
    if not live:
        return
    target = live[len(actions) % len(live)]
    before = allowed_set(w.state, metas, now)
    position = w.state.size
    w.revoke(target.author, target.id, created=NOW + 1000)
    after = allowed_set(w.state, metas, now)
    assert after <= before
    for meta in metas:
        for v in decide(w.state, meta, now).verdicts:
            assert target.id not in (v.grant, v.accept)
    # Replaying the log up to the revoke's position gives the policy as it was before it.
    prefix = PolicyState(ORIGIN, w.operator.public)
    prefix.apply_all(w.log[:position])
    assert allowed_set(prefix, metas, now) == before


@SETTINGS
@given(
    start=st.one_of(st.none(), st.integers(NOW - 10_000, NOW)),
    length=st.integers(1, 10_000),
    tlp=st.sampled_from(TLPS),
    side=st.booleans(),
)
def test_expiry_is_honoured_at_the_boundary(
    members: dict[str, identity.Identity], start: int | None, length: int, tlp: str, side: bool
) -> None:
    w = World(dict(members))
    w.admit(*IDS)
    until = (start if start is not None else NOW) + length
    if side:
        w.grant("FRA", "DEU", "RED", valid_from=start, valid_until=until)
        w.accept("DEU", "FRA", "RED")
    else:
        w.grant("FRA", "DEU", "RED")
        w.accept("DEU", "FRA", "RED", valid_from=start, valid_until=until)
    assert w.allowed("FRA", "DEU", tlp, now=until - 1)
    assert not w.allowed("FRA", "DEU", tlp, now=until)
    if start is not None:
        assert w.allowed("FRA", "DEU", tlp, now=start)
        assert not w.allowed("FRA", "DEU", tlp, now=start - 1)


@SETTINGS
@given(
    actions=story,
    metas=st.lists(packet, min_size=1, max_size=8),
    now=at,
    who=st.sampled_from(IDS),
)
def test_a_suspended_member_neither_sends_nor_receives(
    members: dict[str, identity.Identity], actions: list[tuple[Any, ...]], metas: list[PacketMeta], now: int, who: str
) -> None:
    w = build(members, actions)
    if w.state.members[who].status == "active":
        w.op("member-suspend", id=who, reason="property test")
    for meta in metas:
        for v in decide(w.state, meta, now).verdicts:
            if who in (meta.sender, v.recipient):
                assert not v.allowed
                assert "suspended" in v.reason


entry_value = st.one_of(st.binary(max_size=40), st.text(max_size=12), st.integers(-(2**40), 2**40), st.none())
type_value = st.one_of(
    st.sampled_from(records.TYPES), st.sampled_from(("pkt", "ack", "purge", "d1r")), st.text(max_size=6)
)


@SETTINGS
@given(
    fields=st.dictionaries(st.text(max_size=8), st.one_of(entry_value, type_value), max_size=6),
    t=st.one_of(st.none(), type_value),
    noise=st.binary(max_size=8),
)
def test_the_fast_skip_answers_as_decoding_would(fields: dict[str, Any], t: str | None, noise: bytes) -> None:
    """`records.parse` skips an entry with none of the bytes "dir", "rule", "stmt" without decoding it; on any
    entry it must answer exactly as decoding it does (`parse_decoded`): the same record, None, or the same error.
    Entries: canonical maps with or without a "t" (policy types among others), and the same with bytes appended
    or cut off (not canonical, or not msgpack at all)."""
    if t is not None:
        fields = {**fields, "t": t}
    packed = encoding.pack(fields)
    for entry in (packed, packed + noise, packed[: len(packed) // 2]):
        assert _answer(records.parse, entry) == _answer(records.parse_decoded, entry)


def _answer(parse: Any, entry: bytes) -> object:
    try:
        record = parse(entry)
    except PolicyError as exc:
        return ("error", exc.what)
    return None if record is None else record.id
