from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from valise import encoding, identity
from valise.crypto import sign
from valise.errors import LimitError, PolicyError, StatementError
from valise.policy import PacketMeta, PolicyState, channels, decide, records
from valise.policy.state import MAX_LIVE_STATEMENTS
from valise.utctime import MAX_CALENDAR_TIME, utc

from .conftest import NOW, seeded_random

ORIGIN = "valise.example/log"
DAY = 86_400
KINDS = {"FRA": "country", "DEU": "country", "ITA": "country", "NGA": "country", "ACME": "partner"}
REGIONS = {"FRA": "europe", "DEU": "europe", "ITA": "europe", "NGA": "africa", "ACME": "europe"}


@dataclass
class World:
    """A broker's policy log being written: the operator's records and the members' statements, applied as made."""

    members: dict[str, identity.Identity]
    operator: sign.SigningKey = field(default_factory=lambda: sign.SigningKey(seeded_random(b"operator")(32)))
    log: list[bytes] = field(default_factory=list)
    state: PolicyState = field(init=False)

    def __post_init__(self) -> None:
        self.state = PolicyState(ORIGIN, self.operator.public)

    def add(self, entry: bytes) -> bytes:
        self.state.apply(entry)
        self.log.append(entry)
        return entry

    def op(self, op: str, /, **fields: Any) -> bytes:
        return self.add(records.dir_record(self.operator, ORIGIN, self.state.operator_seq + 1, NOW, op, **fields))

    def rule(self, rule: str, /, **fields: Any) -> bytes:
        return self.add(records.rule_record(self.operator, ORIGIN, self.state.operator_seq + 1, NOW, rule, **fields))

    def admit(self, *ids: str) -> None:
        for mid in ids:
            b = self.members[mid].bundle
            self.op("member-add", id=mid, kind=KINDS[mid], name=mid, region=REGIONS[mid], bundle=b.raw)

    def grant(self, author: str, to: str, tlp: str = "AMBER", **terms: Any) -> bytes:
        key = self.members[author].signing
        e = records.grant(key, origin=ORIGIN, author=author, created=NOW, to=to, tlp=tlp, **terms)
        self.add(e)
        return records.parse_policy(e).id

    def accept(self, author: str, source: str, tlp: str = "AMBER", **terms: Any) -> bytes:
        key = self.members[author].signing
        e = records.accept(key, origin=ORIGIN, author=author, created=NOW, source=source, tlp=tlp, **terms)
        self.add(e)
        return records.parse_policy(e).id

    def revoke(self, author: str, sid: bytes, created: int = NOW + 1) -> bytes:
        e = records.revoke(self.members[author].signing, origin=ORIGIN, author=author, created=created, statement=sid)
        return self.add(e)

    def allowed(self, sender: str, to: str, tlp: str = "AMBER", now: int = NOW, **meta: Any) -> bool:
        d = decide(self.state, PacketMeta(sender, (to,), tlp, **meta), now)
        return d.allowed

    def reason(self, sender: str, to: str, tlp: str = "AMBER", now: int = NOW, **meta: Any) -> str:
        return decide(self.state, PacketMeta(sender, (to,), tlp, **meta), now).verdicts[0].reason


@pytest.fixture
def world(members: dict[str, identity.Identity]) -> World:
    w = World(members)
    w.admit("FRA", "DEU", "ITA", "NGA", "ACME")
    return w


def refold(w: World) -> PolicyState:
    s = PolicyState(ORIGIN, w.operator.public)
    s.apply_all(w.log)
    return s


# --- evaluation -------------------------------------------------------------------------------------


def test_deny_by_default(world: World) -> None:
    assert not world.allowed("FRA", "DEU")
    assert world.reason("FRA", "DEU") == "FRA has not granted anything to DEU or to a group it is in"


def test_grant_and_accept_allow_with_reason(world: World) -> None:
    g = world.grant("FRA", "DEU", categories=["malware", "phishing"])
    assert not world.allowed("FRA", "DEU", categories=("malware",))
    assert "DEU has not accepted anything from FRA" in world.reason("FRA", "DEU", categories=("malware",))
    a = world.accept("DEU", "FRA")
    d = decide(world.state, PacketMeta("FRA", ("DEU",), "AMBER", ("malware",)), NOW)
    assert d.allowed
    assert d.verdicts[0].grant == g
    assert d.verdicts[0].accept == a
    assert d.verdicts[0].reason == f"allowed by FRA's grant {g[:4].hex()}… and DEU's acceptance {a[:4].hex()}…"
    # A grant is one way: DEU → FRA needs its own pair.
    assert not world.allowed("DEU", "FRA", categories=("malware",))


def test_reason_names_missing_category_and_what_the_grant_covers(world: World) -> None:
    g = world.grant("FRA", "DEU", categories=["malware", "phishing"])
    world.accept("DEU", "FRA")
    reason = world.reason("FRA", "DEU", categories=("fraud", "malware"))
    assert reason == f"FRA has not granted DEU category 'fraud' (grant {g[:4].hex()}… covers malware, phishing)"
    assert "covers only malware, phishing, and the packet has no category" in world.reason("FRA", "DEU")


def test_tlp_and_size_terms(world: World) -> None:
    world.grant("FRA", "DEU", tlp="GREEN", max_size=1000)
    world.accept("DEU", "FRA", tlp="RED")
    assert world.allowed("FRA", "DEU", tlp="CLEAR")
    assert world.allowed("FRA", "DEU", tlp="GREEN", size=1000)
    assert "up to TLP:GREEN only" in world.reason("FRA", "DEU", tlp="AMBER")
    assert "over the limit of 1000" in world.reason("FRA", "DEU", tlp="GREEN", size=1001)
    assert "not a TLP 2.0 level" in world.reason("FRA", "DEU", tlp="TLP:GREEN")


def test_acceptance_terms_bind_too(world: World) -> None:
    world.grant("FRA", "DEU", tlp="RED")
    world.accept("DEU", "FRA", tlp="GREEN", categories=["malware"])
    assert world.allowed("FRA", "DEU", tlp="GREEN", categories=("malware",))
    assert "DEU accepts from FRA up to TLP:GREEN only" in world.reason("FRA", "DEU", categories=("malware",))
    assert "DEU has not accepted category 'spam' from FRA" in world.reason(
        "FRA", "DEU", tlp="GREEN", categories=("spam",)
    )


def test_validity_window_boundaries(world: World) -> None:
    world.grant("FRA", "DEU", valid_from=NOW, valid_until=NOW + DAY)
    world.accept("DEU", "FRA")
    assert not world.allowed("FRA", "DEU", now=NOW - 1)
    assert "only starts at" in world.reason("FRA", "DEU", now=NOW - 1)
    assert world.allowed("FRA", "DEU", now=NOW)
    assert world.allowed("FRA", "DEU", now=NOW + DAY - 1)
    assert not world.allowed("FRA", "DEU", now=NOW + DAY)
    assert "ended at" in world.reason("FRA", "DEU", now=NOW + DAY)


def test_packet_expiry(world: World) -> None:
    world.grant("FRA", "DEU")
    world.accept("DEU", "FRA")
    assert world.allowed("FRA", "DEU", expires=NOW + 1)
    assert "expired" in world.reason("FRA", "DEU", expires=NOW)


def test_group_grants(world: World) -> None:
    world.op("group-create", name="europe", kind="region", start=None, end=None)
    for m in ("DEU", "ITA", "ACME"):
        world.op("group-add", name="europe", id=m)
    world.grant("FRA", "group:europe", tlp="RED")
    for m in ("DEU", "ITA", "ACME", "NGA"):
        world.accept(m, "FRA", tlp="RED")
    assert world.allowed("FRA", "DEU")
    assert world.allowed("FRA", "ITA")
    assert world.allowed("FRA", "ACME")
    assert not world.allowed("FRA", "NGA")  # not in the group
    # Built-in rules: RED never through a group grant; AMBER+STRICT never through one to a partner.
    assert not world.allowed("FRA", "DEU", tlp="RED")
    assert "TLP:RED needs a grant that names DEU individually" in world.reason("FRA", "DEU", tlp="RED")
    assert world.allowed("FRA", "DEU", tlp="AMBER+STRICT")
    assert not world.allowed("FRA", "ACME", tlp="AMBER+STRICT")
    assert "never goes to a partner (ACME)" in world.reason("FRA", "ACME", tlp="AMBER+STRICT")
    # Naming the member individually lifts both.
    world.grant("FRA", "DEU", tlp="RED")
    world.grant("FRA", "ACME", tlp="AMBER+STRICT")
    assert world.allowed("FRA", "DEU", tlp="RED")
    assert world.allowed("FRA", "ACME", tlp="AMBER+STRICT")
    # Leaving the group ends the group grant for that member.
    world.op("group-remove", name="europe", id="ITA")
    assert not world.allowed("FRA", "ITA")


def test_group_acceptance_covers_senders_in_the_group(world: World) -> None:
    world.op("group-create", name="europe", kind="region", start=None, end=None)
    world.op("group-add", name="europe", id="FRA")
    world.grant("FRA", "NGA")
    world.accept("NGA", "group:europe")
    assert world.allowed("FRA", "NGA")


def test_operations_are_time_boxed(world: World) -> None:
    world.op("group-create", name="TRIDENT", kind="operation", start=NOW, end=NOW + DAY)
    world.op("group-add", name="TRIDENT", id="FRA")
    world.op("group-add", name="TRIDENT", id="DEU")
    world.grant("FRA", "group:TRIDENT")
    world.accept("DEU", "group:TRIDENT")
    world.accept("ITA", "FRA")
    world.grant("FRA", "ITA")
    assert world.allowed("FRA", "DEU", operation="TRIDENT")
    assert world.allowed("FRA", "DEU")  # the group grant works without naming the operation while it runs
    assert not world.allowed("FRA", "DEU", now=NOW + DAY)
    assert "not running" in world.reason("FRA", "DEU", now=NOW + DAY, operation="TRIDENT")
    assert "which is not running" in world.reason("FRA", "DEU", now=NOW + DAY)
    assert "ITA is not in operation TRIDENT" in world.reason("FRA", "ITA", operation="TRIDENT")
    assert world.allowed("FRA", "ITA")
    assert "'europe' is not an operation" in world.reason("FRA", "ITA", operation="europe")


def test_suspended_member_neither_sends_nor_receives(world: World) -> None:
    world.grant("FRA", "DEU")
    world.accept("DEU", "FRA")
    world.grant("DEU", "FRA")
    world.accept("FRA", "DEU")
    world.op("member-suspend", id="DEU", reason="unpaid dues")
    assert not world.allowed("FRA", "DEU")
    assert not world.allowed("DEU", "FRA")
    assert world.reason("FRA", "DEU") == "DEU is suspended (unpaid dues) and can neither send nor receive"
    world.op("member-reinstate", id="DEU")
    assert world.allowed("FRA", "DEU")
    assert world.allowed("DEU", "FRA")
    world.op("member-remove", id="DEU", reason="left the organisation")
    assert not world.allowed("FRA", "DEU")
    with pytest.raises(PolicyError, match="was removed"):
        world.op("member-reinstate", id="DEU")
    with pytest.raises(PolicyError, match="never reused"):
        world.admit("DEU")


def test_revoke_takes_effect_from_its_position(world: World) -> None:
    g = world.grant("FRA", "DEU")
    world.accept("DEU", "FRA")
    before = refold(world)
    world.revoke("FRA", g)
    assert not world.allowed("FRA", "DEU")
    assert decide(before, PacketMeta("FRA", ("DEU",), "AMBER"), NOW).allowed  # the policy as of before the revoke
    assert world.state.status(world.state.statements[g], NOW) == "revoked"


def test_operator_rules_only_restrict(world: World) -> None:
    world.grant("FRA", "DEU", tlp="RED")
    world.accept("DEU", "FRA", tlp="RED")
    assert world.allowed("FRA", "DEU", categories=("political",))
    world.rule("ban-category", category="political")
    reason = world.reason("FRA", "DEU", categories=("malware", "political"))
    assert reason.startswith("category 'political' is banned by operator rule ")
    world.rule("max-size", size=5000)
    assert "over the operator's limit of 5000" in world.reason("FRA", "DEU", size=5001)
    world.rule("max-tlp", tlp="AMBER")
    assert "above the operator's limit of TLP:AMBER" in world.reason("FRA", "DEU", tlp="RED")
    assert world.allowed("FRA", "DEU", tlp="AMBER", size=5000)


def test_lifting_a_rule_returns_the_decision_to_the_members(world: World) -> None:
    world.grant("FRA", "DEU", tlp="RED", categories=["malware", "political"])
    world.accept("DEU", "FRA", tlp="RED")
    ban = records.parse_policy(world.rule("ban-category", category="political")).id
    small = records.parse_policy(world.rule("max-size", size=100)).id
    world.rule("max-size", size=5000)
    before = refold(world)
    world.rule("lift", lifts=ban)
    assert world.allowed("FRA", "DEU", categories=("political",))
    assert not decide(before, PacketMeta("FRA", ("DEU",), "AMBER", categories=("political",)), NOW).allowed
    # The tightest size limit is recomputed from the rules still in force, not forgotten.
    assert "over the operator's limit of 100" in world.reason("FRA", "DEU", size=101)
    world.rule("lift", lifts=small)
    assert "over the operator's limit of 5000" in world.reason("FRA", "DEU", size=5001)
    assert world.allowed("FRA", "DEU", size=5000, categories=("malware",))
    # A lift never allows what the members did not agree: ITA never had a grant.
    assert "grant" in world.reason("FRA", "ITA", categories=("political",))
    assert refold(world).snapshot() == world.state.snapshot()


@pytest.mark.parametrize("target", ["lifted", "unknown", "a statement"])
def test_a_lift_must_name_a_rule_in_force(world: World, target: str) -> None:
    ban = records.parse_policy(world.rule("ban-category", category="political")).id
    world.rule("lift", lifts=ban)
    rule_id = {"lifted": ban, "unknown": bytes(32), "a statement": world.grant("FRA", "DEU")}[target]
    state = world.state.snapshot()
    lift = records.rule_record(world.operator, ORIGIN, world.state.operator_seq + 1, NOW, "lift", lifts=rule_id)
    with pytest.raises(PolicyError, match=f"operator rule {records.short(rule_id)} is not in force") as info:
        world.state.apply(lift)
    assert ("it was lifted at log position" in info.value.what) == (target == "lifted")
    assert world.state.snapshot() == state


def test_a_lift_names_a_whole_rule_id(world: World) -> None:
    body = records.operator_body(ORIGIN, world.state.operator_seq + 1, NOW, "rule", "lift", lifts=bytes(16))
    body_bytes = encoding.pack(body)
    sig = world.operator.sign(records.DOMAINS[records.RULE], body_bytes)
    lift = encoding.pack({"t": records.RULE, "body": body_bytes, "sig": sig})
    with pytest.raises(PolicyError, match="the lifted rule id is not 32 bytes"):
        world.state.apply(lift)


def test_one_packet_many_recipients(world: World) -> None:
    world.grant("FRA", "DEU")
    world.accept("DEU", "FRA")
    d = decide(world.state, PacketMeta("FRA", ("DEU", "FRA", "ITA", "XXX"), "GREEN"), NOW)
    assert [v.allowed for v in d.verdicts] == [True, False, False, False]
    assert not d.allowed
    assert len(d.denied) == 3
    assert d.verdicts[1].reason == "FRA cannot be a recipient of its own packet"
    assert d.verdicts[3].reason == "XXX is not a member"
    assert not decide(world.state, PacketMeta("FRA", (), "GREEN"), NOW).allowed


def test_matrix(world: World) -> None:
    world.op("group-create", name="europe", kind="region", start=None, end=None)
    world.op("group-add", name="europe", id="ACME")
    world.grant("FRA", "DEU", tlp="RED", categories=["malware"])
    world.accept("DEU", "FRA", tlp="AMBER")
    world.grant("FRA", "group:europe", tlp="RED")
    world.accept("ACME", "FRA", tlp="RED", categories=["malware", "political"])
    world.rule("ban-category", category="political")
    got = {(c.sender, c.recipient): (c.rank, c.categories) for c in channels(world.state, NOW)}
    assert got == {("FRA", "DEU"): (2, frozenset({"malware"})), ("FRA", "ACME"): (2, frozenset({"malware"}))}


# --- directory changes and key rotation ------------------------------------------------------------------


def test_encryption_key_rotation_needs_the_identity_key(world: World, members: dict[str, identity.Identity]) -> None:
    fra = members["FRA"]
    new_key = seeded_random(b"new enc")(32)
    sig = fra.signing.sign(identity.ENC_KEY_DOMAIN, identity.enc_key_statement("FRA", new_key, NOW + 5))
    with pytest.raises(PolicyError, match="signature does not verify"):
        world.op("member-enc-key", id="FRA", enc_key=new_key, enc_created=NOW + 6, enc_sig=sig)
    world.op("member-enc-key", id="FRA", enc_key=new_key, enc_created=NOW + 5, enc_sig=sig)
    assert world.state.members["FRA"].enc_key == new_key
    with pytest.raises(PolicyError, match="not newer"):
        world.op("member-enc-key", id="FRA", enc_key=new_key, enc_created=NOW + 5, enc_sig=sig)


def test_identity_key_rotation(world: World, members: dict[str, identity.Identity]) -> None:
    old = members["FRA"]
    new = identity.generate("FRA", seeded_random(b"FRA v2"), NOW + 10)
    bad = new.signing.sign(records.REKEY_DOMAIN, records.rekey_message("FRA", ORIGIN, new.bundle.raw))
    with pytest.raises(PolicyError, match="old identity key must sign"):
        world.op("member-rekey", id="FRA", bundle=new.bundle.raw, rekey_sig=bad)
    good = old.signing.sign(records.REKEY_DOMAIN, records.rekey_message("FRA", ORIGIN, new.bundle.raw))
    with pytest.raises(PolicyError, match="is for FRA, not DEU"):
        world.op("member-rekey", id="DEU", bundle=new.bundle.raw, rekey_sig=good)
    g_old = world.grant("FRA", "DEU")  # made under the old key: stays valid
    world.op("member-rekey", id="FRA", bundle=new.bundle.raw, rekey_sig=good)
    assert world.state.members["FRA"].sign_key == new.signing.public
    with pytest.raises(StatementError, match="identity key of FRA"):
        world.grant("FRA", "ITA")  # still the old key in world.members
    world.members["FRA"] = new
    world.grant("FRA", "ITA")
    world.accept("DEU", "FRA")
    assert world.allowed("FRA", "DEU")
    world.revoke("FRA", g_old)  # the new key may revoke what the old key granted
    assert not world.allowed("FRA", "DEU")


def test_identity_keys_by_log_position(world: World, members: dict[str, identity.Identity]) -> None:
    """Nodes check a packet, acknowledgement or retraction against the key in force where the log holds it: the
    history must give the old key up to the rekey record and the new one after it, across two rekeys."""
    admitted = world.state.members["FRA"].position
    keys = [members["FRA"]]
    changed: list[int] = []
    for n in (2, 3):
        new = identity.generate("FRA", seeded_random(b"FRA history %d" % n), NOW + n)
        sig = keys[-1].signing.sign(records.REKEY_DOMAIN, records.rekey_message("FRA", ORIGIN, new.bundle.raw))
        changed.append(world.state.size)
        world.op("member-rekey", id="FRA", bundle=new.bundle.raw, rekey_sig=sig)
        keys.append(new)
    public = [k.signing.public for k in keys]
    assert world.state.key_at("FRA", admitted) is None  # the admission itself: not a member before it
    assert world.state.key_at("FRA", admitted + 1) == public[0]
    assert world.state.key_at("FRA", changed[0]) == public[0]
    assert world.state.key_at("FRA", changed[0] + 1) == public[1]
    assert world.state.key_at("FRA", changed[1]) == public[1]
    assert world.state.key_at("FRA", changed[1] + 1) == public[2]
    assert world.state.key_at("FRA", world.state.size + 100) == public[2]
    assert world.state.key_at("XXX", 5) is None
    assert world.state.identity_keys("FRA") == [public[2], public[1], public[0]]
    assert world.state.identity_keys("DEU") == [members["DEU"].signing.public]
    assert world.state.identity_keys("XXX") == []
    assert refold(world).snapshot() == world.state.snapshot()  # a restart's re-fold gives the same history


def test_directory_errors(world: World, members: dict[str, identity.Identity]) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("group-add", {"name": "nope", "id": "FRA"}, "group nope does not exist"),
        ("member-suspend", {"id": "XXX", "reason": "r"}, "XXX is not a member"),
        ("member-reinstate", {"id": "FRA"}, "not suspended"),
        ("group-create", {"name": "op", "kind": "operation", "start": NOW, "end": NOW}, "end .* is not after"),
        ("group-create", {"name": "eu", "kind": "region", "start": NOW, "end": None}, "region group has no start"),
        ("member-add", {"id": "X", "kind": "embassy", "name": "X", "region": "r", "bundle": b""}, "member kind"),
        ("member-add", {"id": "X", "kind": "desk", "name": "X", "region": "r", "bundle": b"x"}, "malformed public"),
    ]
    for op, fields, message in cases:
        snap = world.state.snapshot()
        with pytest.raises(PolicyError, match=message):
            world.op(op, **fields)
        assert world.state.snapshot() == snap


def test_operator_records_need_the_operator_key_and_the_next_sequence(world: World) -> None:
    other = sign.SigningKey(seeded_random(b"not the operator")(32))
    snap = world.state.snapshot()
    forged = records.rule_record(other, ORIGIN, world.state.operator_seq + 1, NOW, "max-size", size=1)
    with pytest.raises(PolicyError, match="signature does not verify under the operator key"):
        world.state.apply(forged)
    stale = records.rule_record(world.operator, ORIGIN, world.state.operator_seq, NOW, "max-size", size=1)
    with pytest.raises(PolicyError, match="sequence number 5, expected 6"):
        world.state.apply(stale)
    foreign = records.rule_record(
        world.operator, "other.example/log", world.state.operator_seq + 1, NOW, "max-size", size=1
    )
    with pytest.raises(PolicyError, match=r"is for log 'other\.example/log'"):
        world.state.apply(foreign)
    assert world.state.snapshot() == snap


# --- refusing tampered and mis-signed statements ------------------------------------------------------------


def _statement(world: World, author: str = "FRA", **terms: Any) -> bytes:
    key = world.members[author].signing
    return records.grant(key, origin=ORIGIN, author=author, created=NOW, to="DEU", tlp="AMBER", **terms)


def test_every_flipped_byte_of_a_statement_is_refused_and_changes_nothing(world: World) -> None:
    entry = _statement(world)
    snap = world.state.snapshot()
    for i in range(len(entry)):
        bad = bytearray(entry)
        bad[i] ^= 0x01
        try:
            world.state.apply(bytes(bad))
        except PolicyError:
            pass
        else:
            # A flip in the type tag can turn it into another module's entry, which policy skips unread.
            assert records.parse(bytes(bad)) is None, f"flipped byte {i} was accepted"
            world.state.size -= 1
        assert world.state.snapshot() == snap
    world.state.apply(entry)  # the original still applies


def test_statement_signed_by_another_member_is_refused(world: World) -> None:
    body = encoding.unpack(_statement(world), what="t", max_size=99999)
    forged_sig = world.members["DEU"].signing.sign(records.DOMAINS["stmt"], body["body"])
    forged = encoding.pack({**body, "sig": forged_sig})
    with pytest.raises(StatementError, match="signature does not verify under the identity key of FRA"):
        world.state.apply(forged)


def test_operator_cannot_forge_a_statement(world: World) -> None:
    body = encoding.unpack(_statement(world), what="t", max_size=99999)
    forged = encoding.pack({**body, "sig": world.operator.sign(records.DOMAINS["stmt"], body["body"])})
    with pytest.raises(StatementError, match="does not verify"):
        world.state.apply(forged)


def test_replayed_statement_is_refused(world: World) -> None:
    entry = _statement(world)
    world.add(entry)
    snap = world.state.snapshot()
    with pytest.raises(StatementError, match=r"replayed statement .* already in the log at position 5"):
        world.state.apply(entry)
    assert world.state.snapshot() == snap


def test_statement_speaking_for_another_member_is_refused(world: World) -> None:
    g = world.grant("FRA", "DEU")
    with pytest.raises(StatementError, match="was made by FRA; only its author can revoke it"):
        world.revoke("DEU", g)
    world.revoke("FRA", g)
    with pytest.raises(StatementError, match="already revoked"):
        world.revoke("FRA", g, created=NOW + 2)
    with pytest.raises(StatementError, match="no grant or acceptance"):
        world.revoke("FRA", bytes(32))


@pytest.mark.parametrize(
    ("terms", "message"),
    [
        ({"to": "FRA"}, "cannot name itself"),
        ({"to": "XXX"}, "XXX is not a member"),
        ({"to": "group:none"}, "group none does not exist"),
        ({"tlp": "PURPLE"}, "TLP level 'PURPLE' is not valid"),
        ({"categories": []}, "categories is empty"),
        ({"categories": ["Malware"]}, "category 'Malware' is not valid"),
        ({"valid_from": NOW, "valid_until": NOW}, "is not after the start"),
        ({"max_size": 0}, "max_size must be positive"),
        # Past the calendar's end: showing one in a reason once raised, and cost the sender its connection.
        ({"valid_from": 2**63}, "valid_from 9223372036854775808 is not a time between 1970 and the year 9999"),
        ({"valid_until": MAX_CALENDAR_TIME + 1}, "valid_until 253402300800 is not a time between 1970"),
        ({"created": -1}, "created -1 is not a time between 1970"),
    ],
)
def test_malformed_statements_are_refused(world: World, terms: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"origin": ORIGIN, "author": "FRA", "created": NOW, "to": "DEU", "tlp": "AMBER"}
    args.update(terms)
    body = {"v": 1, "k": "grant", "categories": None, "valid_from": None, "valid_until": None, "max_size": None}
    body.update(args)
    body_bytes = encoding.pack(body)
    key = world.members["FRA"].signing
    entry = encoding.pack({"t": "stmt", "body": body_bytes, "sig": key.sign(records.DOMAINS["stmt"], body_bytes)})
    with pytest.raises(StatementError, match=message):
        world.state.apply(entry)


def test_suspended_member_can_only_revoke(world: World) -> None:
    g = world.grant("FRA", "DEU")
    world.op("member-suspend", id="FRA", reason="audit")
    with pytest.raises(StatementError, match="FRA is suspended and can only revoke"):
        world.grant("FRA", "ITA")
    world.revoke("FRA", g)


def test_live_statement_limit(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.state.live["FRA"] = MAX_LIVE_STATEMENTS
    with pytest.raises(LimitError, match="live statements"):
        world.grant("FRA", "DEU")


def test_other_entry_types_are_skipped(world: World) -> None:
    size = world.state.size
    world.state.apply(encoding.pack({"t": "pkt", "digest": bytes(32)}))
    world.state.apply(b"\xc1 not msgpack")
    assert world.state.size == size + 2
    with pytest.raises(LimitError):
        world.state.apply(b"\x00" * 70000)


def test_refold_is_identical(world: World) -> None:
    world.op("group-create", name="europe", kind="region", start=None, end=None)
    world.op("group-add", name="europe", id="ITA")
    g = world.grant("FRA", "group:europe")
    world.accept("ITA", "FRA")
    world.revoke("FRA", g)
    world.rule("ban-category", category="political")
    assert refold(world).snapshot() == world.state.snapshot()
    fast = PolicyState(ORIGIN, world.operator.public, verify_signatures=False)
    fast.apply_all(world.log)
    assert fast.snapshot() == world.state.snapshot()


def test_check_is_apply_without_the_change(world: World) -> None:
    entry = _statement(world)
    snap = world.state.snapshot()
    assert world.state.check(entry) is not None
    assert world.state.check(encoding.pack({"t": "pkt"})) is None
    assert world.state.snapshot() == snap
    world.state.apply(entry)
    with pytest.raises(StatementError, match="replayed"):
        world.state.check(entry)


def test_spec_vector() -> None:
    """specs/policy.md, "Worked example and test vector": recomputed, then checked independently."""
    import hashlib

    import nacl.signing

    seed = bytes.fromhex("ba0a1cab43b91153195e3fa20e9180d4a4a6b1bebe15af4e1efb0939c1b46e5b")
    key = sign.SigningKey(seed)
    assert key.public.hex() == "ad571d613a22ae8ae5e202f6a0d53dba4dd50d0880cef3e92d2198295577dea7"
    entry = records.grant(
        key, origin="valise.example/log", author="FRA", created=1790000000, to="DEU", tlp="AMBER",
        categories=["phishing", "malware"], valid_until=1790086400,
    )  # fmt: skip
    body = bytes.fromhex(
        "8ba6617574686f72a3465241aa63617465676f7269657392a76d616c77617265a87068697368696e67a763726561746564"
        "ce6ab13b80a16ba56772616e74a86d61785f73697a65c0a66f726967696eb276616c6973652e6578616d706c652f6c6f67"
        "a3746c70a5414d424552a2746fa3444555a17601aa76616c69645f66726f6dc0ab76616c69645f756e74696cce6ab28d00"
    )
    sig = bytes.fromhex(
        "6fc1708581db9b9bd733df8b8b3c8375cb433ca19b56b4dee097a05c2846045a"
        "7af0dad0402bb40e8407c45a6fd839d5d47c3e6122d7e6150bbeba81ac16680f"
    )
    assert entry == b"\x83\xa4body\xc4\x93" + body + b"\xa3sig\xc4\x40" + sig + b"\xa1t\xa4stmt"
    assert len(entry) == 232
    nacl.signing.VerifyKey(key.public).verify(b"valise/v1/policy-stmt\x00" + body, sig)
    assert hashlib.sha256(body).hexdigest() == "416778f9d9e076d642d89bc695de9b1a233a6884d8cba34efdc903e1d72b0f5f"
    assert records.parse_policy(entry).id == hashlib.sha256(body).digest()


def test_skipped_positions_only_move_forward() -> None:
    state = PolicyState("test.valise/log", bytes(32))
    state.skip_to(5)  # five entries this reader holds only as leaf hashes
    assert state.size == 5
    with pytest.raises(PolicyError, match="cannot go back"):
        state.skip_to(4)


@pytest.mark.parametrize("t", [-1, MAX_CALENDAR_TIME + 1, 2**63, 2**64 - 1])
def test_a_time_past_the_calendar_is_shown_not_raised(t: int) -> None:
    """A packet's expiry may be any 63-bit time: the reason that names it must still be written."""
    assert utc(t) == f"{t} (Unix time outside 1970..9999)"
    assert utc(0) == "1970-01-01T00:00:00Z"
    assert utc(MAX_CALENDAR_TIME) == "9999-12-31T23:59:59Z"


def test_a_packet_that_expired_far_in_the_future_is_denied_with_a_reason(world: World) -> None:
    world.grant("FRA", "DEU")
    world.accept("DEU", "FRA")
    assert world.reason("FRA", "DEU", now=2**63 - 1, expires=2**63 - 1) == (
        "the packet expired at 9223372036854775807 (Unix time outside 1970..9999)"
    )


def test_the_groups_of_each_member_follow_every_group_change(world: World) -> None:
    """groups_of is kept by inserting and deleting one name (a scan of every group per change was quadratic in a
    log full of groups); it must stay what a scan gives, in sorted order, through adds, removes and removals."""
    rng = random.Random(7)
    ids = ["FRA", "DEU", "ITA", "NGA", "ACME"]
    names = [f"g{i:02d}" for i in range(12)]
    for name in names:
        world.op("group-create", name=name, kind="operation", start=None, end=None)
    for _ in range(150):
        name, mid = rng.choice(names), rng.choice(ids[:-1])  # ACME stays, to be removed at the end
        if mid in world.state.groups[name].members:
            world.op("group-remove", name=name, id=mid)
        else:
            world.op("group-add", name=name, id=mid)
        scanned = {m: tuple(sorted(g.name for g in world.state.groups.values() if m in g.members)) for m in ids}
        assert world.state.groups_of == {m: gs for m, gs in scanned.items() if gs}
    for name in names[:3]:
        world.op("group-add", name=name, id="ACME")
    assert world.state.groups_of["ACME"] == tuple(names[:3])
    world.op("member-remove", id="ACME", reason="left")
    assert "ACME" not in world.state.groups_of
