"""PolicyState: the directory, the statements and the operator rules, folded from the log in order (pure).

Everything that changes the policy lives here, and only `apply` changes it. `apply(entry)` first checks the
whole record against the current state (form, origin, signer, sequence, replay, references), and only then
commits; so a refused record raises and changes nothing, and two folds of the same entries give the same
state. That is what lets an auditor replay the policy in force at any log position exactly.

The state is indexed for `decide`: active grants by author then counterpart, active acceptances likewise,
and each member's groups, so a decision is a few dict lookups per recipient, never a scan.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from valise import identity, labels
from valise.crypto import sign
from valise.errors import (
    BundleError,
    LimitError,
    PolicyError,
    SignatureError,
    StatementError,
    StatementSignatureError,
)
from valise.policy import records
from valise.policy.records import DIR, GRANT, GROUP_PREFIX, REVOKE, RULE, STMT, Record

ACTIVE, SUSPENDED, REMOVED = "active", "suspended", "removed"
# A member can hold this many live (unrevoked) statements; it bounds the state one member can make the
# broker keep, and the work of one decision.
MAX_LIVE_STATEMENTS = 4096

# A checked change, ready to apply: it only assigns, so it cannot fail half-way.
_Commit = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Member:
    id: str
    kind: str
    name: str
    region: str
    sign_key: bytes
    enc_key: bytes
    enc_created: int
    bundle: bytes
    status: str = ACTIVE
    reason: str | None = None
    position: int = 0  # log index of the record that admitted it


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    kind: str  # "region" or "operation"
    start: int | None
    end: int | None
    members: frozenset[str]

    def running(self, now: int) -> bool:
        """Within its window (start ≤ now < end); a region group always is."""
        return (self.start is None or self.start <= now) and (self.end is None or now < self.end)


@dataclass(frozen=True, slots=True)
class Statement:
    """A member's Grant, Accept or Revoke as applied; terms are pre-digested for `decide`."""

    id: bytes
    short: str
    kind: str
    author: str
    counterpart: str  # grant: "to"; accept: "from"; "ID" or "group:NAME"; revoke: the revoked id in hex
    group: str | None  # the group name when the counterpart is a group
    tlp: str
    rank: int
    categories: frozenset[str] | None  # None = any category
    valid_from: int | None
    valid_until: int | None
    max_size: int | None
    created: int
    position: int
    entry: bytes


@dataclass(frozen=True, slots=True)
class Rule:
    id: bytes
    short: str
    kind: str
    value: str | int
    position: int
    entry: bytes


class PolicyState:
    """The policy as of `size` log entries. Build with `PolicyState(origin, operator_key)` then `apply` each entry.

    `verify_signatures=False` skips the Ed25519 checks (everything else is still checked); use it only to
    re-fold entries this process verified before, e.g. a broker restarting from its own store.
    """

    def __init__(self, origin: str, operator_key: bytes, *, verify_signatures: bool = True) -> None:
        if len(operator_key) != sign.PUBLIC_KEY_SIZE:
            raise PolicyError(f"operator key is {len(operator_key)} bytes, expected {sign.PUBLIC_KEY_SIZE}")
        self.origin = origin
        self.operator_key = operator_key
        self.verify_signatures = verify_signatures
        self.size = 0  # log entries folded (policy or not): the position the next entry will have
        self.operator_seq = 0  # sequence number of the last operator record (dir or rule)
        self.members: dict[str, Member] = {}
        self.groups: dict[str, Group] = {}
        self.groups_of: dict[str, tuple[str, ...]] = {}  # member -> names of its groups, sorted
        self.statements: dict[bytes, Statement] = {}  # every grant, accept and revoke applied
        self.revoked: dict[bytes, int] = {}  # statement id -> log position of its revoke
        self.grants: dict[str, dict[str, list[Statement]]] = {}  # author -> counterpart -> live grants, log order
        self.accepts: dict[str, dict[str, list[Statement]]] = {}
        self.live: dict[str, int] = {}  # author -> live statement count
        self.rules: list[Rule] = []  # the rules in force, in log order
        self.lifted: dict[bytes, int] = {}  # rule id -> log position of the record that lifted it
        self.banned: dict[str, Rule] = {}  # category -> the rule that banned it first
        self.size_limit: Rule | None = None  # the tightest max-size rule
        self.tlp_limit: Rule | None = None  # the tightest max-tlp rule
        self.seen: dict[bytes, int] = {}  # record id -> log position (replay guard)
        # member -> (position of a member-rekey, the identity key in force before it), in log order: what signed
        # a member's earlier entries, which nodes still check (a packet sent before a rekey, delivered after).
        self.retired_keys: dict[str, list[tuple[int, bytes]]] = {}

    # --- folding --------------------------------------------------------------------------------------

    def apply(self, entry: bytes) -> Record | None:
        """Fold one log entry. Returns the policy record, or None for an entry type policy does not own.

        Raises PolicyError (StatementError for statements) naming what is wrong; the state is then unchanged.
        """
        record, commit = self._prepare(entry)
        # Everything before this point only reads; from here on nothing can fail.
        if commit is not None:
            commit()
        if record is not None:
            self.seen[record.id] = self.size
        self.size += 1
        return record

    def skip_to(self, position: int) -> None:
        """Account for log entries up to `position` that have no policy effect here: other members' traffic a
        reader holds only as leaf hashes, a missing entry, or a record the log holds but policy refuses. Positions
        matter (statements and members record theirs), so the count must stay aligned with the log."""
        if position < self.size:
            raise PolicyError(f"cannot go back from log position {self.size} to {position}")
        self.size = position

    def check(self, entry: bytes) -> Record | None:
        """Would `apply(entry)` succeed as the next entry? Raises as apply would; never changes the state."""
        return self._prepare(entry)[0]

    def _prepare(self, entry: bytes) -> tuple[Record | None, _Commit | None]:
        record = records.parse(entry)
        if record is None:
            return None, None
        if record.id in self.seen:
            error = StatementError if record.type == STMT else PolicyError
            raise error(
                f"replayed {_what(record)} {records.short(record.id)}: already in the log at position "
                f"{self.seen[record.id]}"
            )
        if record.body["origin"] != self.origin:
            raise (StatementError if record.type == STMT else PolicyError)(
                f"{_what(record)} {records.short(record.id)} is for log {record.body['origin'][:128]!r}, "
                f"not {self.origin!r}"
            )
        commit = self._check_statement(record) if record.type == STMT else self._check_operator(record)
        return record, commit

    def apply_all(self, entries: list[bytes]) -> None:
        for entry in entries:
            self.apply(entry)

    # --- operator records -----------------------------------------------------------------------------

    def _check_operator(self, record: Record) -> _Commit:
        body = record.body
        if body["seq"] != self.operator_seq + 1:
            raise PolicyError(
                f"{_what(record)} has sequence number {body['seq']}, expected {self.operator_seq + 1}",
                hint="replayed, reordered or built on an old state",
            )
        if self.verify_signatures:
            try:
                record.verify(self.operator_key, what=f"{_what(record)} #{body['seq']}")
            except SignatureError as exc:
                raise PolicyError(
                    f"{exc.what} under the operator key", hint="signed by another key, or altered"
                ) from None
        check = self._check_dir(record) if record.type == DIR else self._check_rule(record)

        def commit() -> None:
            check()
            self.operator_seq = body["seq"]

        return commit

    def _member(self, member_id: str, what: str, *, allow_removed: bool = False) -> Member:
        member = self.members.get(member_id)
        if member is None:
            raise PolicyError(f"{what}: {member_id} is not a member")
        if member.status == REMOVED and not allow_removed:
            raise PolicyError(f"{what}: {member_id} was removed")
        return member

    def _check_dir(self, record: Record) -> _Commit:
        # Named by the operator's sequence number (the log index is not known to the fold's callers in advance).
        b, op, what = record.body, record.kind, f"directory record #{record.body['seq']} ({record.kind})"
        position = self.size
        if op == "member-add":
            if b["id"] in self.members:
                raise PolicyError(f"{what}: {b['id']} is already in the directory", hint="member ids are never reused")
            bundle = _bundle(b["bundle"], b["id"], what)
            member = Member(
                b["id"], b["kind"], b["name"], b["region"], bundle.sign_key, bundle.enc_key, bundle.enc_created,
                bundle.raw, position=position,
            )  # fmt: skip
            return lambda: self._set_member(member)
        if op == "group-create":
            if b["name"] in self.groups:
                raise PolicyError(f"{what}: group {b['name']} already exists")
            group = Group(b["name"], b["kind"], b["start"], b["end"], frozenset())
            return lambda: self.groups.__setitem__(group.name, group)
        if op in ("group-add", "group-remove"):
            grp = self.groups.get(b["name"])
            if grp is None:
                raise PolicyError(f"{what}: group {b['name']} does not exist")
            self._member(b["id"], what)
            inside = b["id"] in grp.members
            if op == "group-add" and inside:
                raise PolicyError(f"{what}: {b['id']} is already in group {grp.name}")
            if op == "group-remove" and not inside:
                raise PolicyError(f"{what}: {b['id']} is not in group {grp.name}")
            members = grp.members | {b["id"]} if op == "group-add" else grp.members - {b["id"]}
            return lambda: self._set_group(replace(grp, members=members), (b["id"],))
        member = self._member(b["id"], what)
        if op == "member-suspend":
            if member.status != ACTIVE:
                raise PolicyError(f"{what}: {member.id} is not active (it is {member.status})")
            new = replace(member, status=SUSPENDED, reason=b["reason"])
        elif op == "member-reinstate":
            if member.status != SUSPENDED:
                raise PolicyError(f"{what}: {member.id} is not suspended")
            new = replace(member, status=ACTIVE, reason=None)
        elif op == "member-remove":
            new = replace(member, status=REMOVED, reason=b["reason"])
        elif op == "member-enc-key":
            if len(b["enc_key"]) != 32:
                raise PolicyError(f"{what}: the encryption key is not 32 bytes")
            if b["enc_created"] <= member.enc_created:
                raise PolicyError(f"{what}: the new encryption key is not newer than the current one")
            try:
                sign.verify(
                    member.sign_key,
                    identity.ENC_KEY_DOMAIN,
                    identity.enc_key_statement(member.id, b["enc_key"], b["enc_created"]),
                    b["enc_sig"],
                    what=f"{what}: key statement of {member.id}",
                )
            except SignatureError as exc:
                raise PolicyError(exc.what, hint="a new encryption key must be signed by the identity key") from None
            new = replace(member, enc_key=b["enc_key"], enc_created=b["enc_created"])
        else:  # member-rekey
            bundle = _bundle(b["bundle"], member.id, what)
            if bundle.sign_key == member.sign_key:
                raise PolicyError(f"{what}: the new bundle has the same identity key")
            try:
                sign.verify(
                    member.sign_key,
                    records.REKEY_DOMAIN,
                    records.rekey_message(member.id, self.origin, bundle.raw),
                    b["rekey_sig"],
                    what=f"{what}: hand-over signature of {member.id}",
                )
            except SignatureError as exc:
                raise PolicyError(exc.what, hint="the old identity key must sign the new bundle") from None
            new = replace(
                member, sign_key=bundle.sign_key, enc_key=bundle.enc_key, enc_created=bundle.enc_created,
                bundle=bundle.raw,
            )  # fmt: skip
        if op == "member-remove":
            return lambda: self._remove_member(new)
        return lambda: self._set_member(new)

    def _set_member(self, member: Member) -> None:
        old = self.members.get(member.id)
        if old is not None and old.sign_key != member.sign_key:
            self.retired_keys.setdefault(member.id, []).append((self.size, old.sign_key))
        self.members[member.id] = member

    def _set_group(self, group: Group, changed: Iterable[str]) -> None:
        """Store `group`, whose membership changed for the members `changed`: only this group's name moves in
        their lists (scanning every group for each was quadratic in a log the operator can fill with groups)."""
        self.groups[group.name] = group
        name = group.name
        for mid in changed:
            names = list(self.groups_of.get(mid, ()))  # sorted; kept so by inserting, not re-sorting
            at = bisect.bisect_left(names, name)
            present = at < len(names) and names[at] == name
            if mid in group.members and not present:
                names.insert(at, name)
            elif mid not in group.members and present:
                del names[at]
            if names:
                self.groups_of[mid] = tuple(names)
            else:
                self.groups_of.pop(mid, None)

    def _remove_member(self, member: Member) -> None:
        # A removed member leaves its groups; its statements stay in the record but can never be used again.
        self.members[member.id] = member
        for name in self.groups_of.get(member.id, ()):
            grp = self.groups[name]
            self._set_group(replace(grp, members=grp.members - {member.id}), (member.id,))

    def _check_rule(self, record: Record) -> _Commit:
        b = record.body
        if record.kind == "lift":
            return self._check_lift(record)
        value: str | int = b.get("category", b.get("size", b.get("tlp", "")))
        rule = Rule(record.id, records.short(record.id), record.kind, value, self.size, record.raw)

        def commit() -> None:
            self.rules.append(rule)
            self._restrict(rule)

        return commit

    def _check_lift(self, record: Record) -> _Commit:
        target: bytes = record.body["lifts"]
        if not any(r.id == target for r in self.rules):
            lifted = self.lifted.get(target)
            raise PolicyError(
                f"operator rule {records.short(target)} is not in force"
                + (f": it was lifted at log position {lifted}" if lifted is not None else ""),
                hint="valise policy show lists the rules in force with their ids",
            )
        position = self.size

        def commit() -> None:
            self.rules = [r for r in self.rules if r.id != target]
            self.lifted[target] = position
            # The limits are the tightest of the rules still in force: recompute them from scratch.
            self.banned, self.size_limit, self.tlp_limit = {}, None, None
            for rule in self.rules:
                self._restrict(rule)

        return commit

    def _restrict(self, rule: Rule) -> None:
        if rule.kind == "ban-category":
            self.banned.setdefault(str(rule.value), rule)
        elif rule.kind == "max-size":
            if self.size_limit is None or int(rule.value) < int(self.size_limit.value):
                self.size_limit = rule
        elif self.tlp_limit is None or labels.tlp_rank(str(rule.value)) < labels.tlp_rank(str(self.tlp_limit.value)):
            self.tlp_limit = rule

    # --- member statements ----------------------------------------------------------------------------

    def _check_statement(self, record: Record) -> _Commit:
        b, kind = record.body, record.kind
        sid = records.short(record.id)
        what = f"{kind} {sid} by {b['author']}"
        author = self.members.get(b["author"])
        if author is None:
            raise StatementError(f"{what}: {b['author']} is not a member")
        if author.status == REMOVED:
            raise StatementError(f"{what}: {author.id} was removed")
        if self.verify_signatures:
            try:
                record.verify(author.sign_key, what=f"{what}")
            except SignatureError as exc:
                raise StatementSignatureError(
                    f"{exc.what} under the identity key of {author.id}",
                    hint="signed by another key, or altered after signing",
                ) from None
        if kind == REVOKE:
            return self._check_revoke(record, author, what)
        if author.status != ACTIVE:
            raise StatementError(f"{what}: {author.id} is {author.status} and can only revoke")
        if self.live.get(author.id, 0) >= MAX_LIVE_STATEMENTS:
            raise LimitError(f"{what}: {author.id} already holds {MAX_LIVE_STATEMENTS} live statements")
        counterpart: str = b["to"] if kind == GRANT else b["from"]
        group = counterpart[len(GROUP_PREFIX) :] if counterpart.startswith(GROUP_PREFIX) else None
        if group is not None:
            if group not in self.groups:
                raise StatementError(f"{what}: group {group} does not exist")
        else:
            if counterpart == author.id:
                raise StatementError(f"{what}: a member cannot name itself as counterpart")
            other = self.members.get(counterpart)
            if other is None or other.status == REMOVED:
                raise StatementError(f"{what}: {counterpart} is not a member")
        cats = b["categories"]
        stmt = Statement(
            id=record.id, short=sid, kind=kind, author=author.id, counterpart=counterpart, group=group,
            tlp=b["tlp"], rank=labels.tlp_rank(b["tlp"]), categories=None if cats is None else frozenset(cats),
            valid_from=b["valid_from"], valid_until=b["valid_until"], max_size=b.get("max_size"),
            created=b["created"], position=self.size, entry=record.raw,
        )  # fmt: skip
        index = self.grants if kind == GRANT else self.accepts

        def commit() -> None:
            self.statements[stmt.id] = stmt
            index.setdefault(stmt.author, {}).setdefault(counterpart, []).append(stmt)
            self.live[stmt.author] = self.live.get(stmt.author, 0) + 1

        return commit

    def _check_revoke(self, record: Record, author: Member, what: str) -> _Commit:
        target_id: bytes = record.body["statement"]
        target = self.statements.get(target_id)
        if target is None or target.kind == REVOKE:
            raise StatementError(f"{what}: no grant or acceptance {target_id.hex()} in the log")
        if target.author != author.id:
            raise StatementError(
                f"{what}: statement {target.short} was made by {target.author}; only its author can revoke it"
            )
        if target_id in self.revoked:
            raise StatementError(f"{what}: {target.kind} {target.short} is already revoked")
        stmt = Statement(
            id=record.id, short=records.short(record.id), kind=REVOKE, author=author.id, counterpart=target_id.hex(),
            group=None, tlp="", rank=-1, categories=None, valid_from=None, valid_until=None, max_size=None,
            created=record.body["created"], position=self.size, entry=record.raw,
        )  # fmt: skip
        index = self.grants if target.kind == GRANT else self.accepts

        def commit() -> None:
            self.statements[stmt.id] = stmt
            self.revoked[target_id] = self.size
            index[target.author][target.counterpart].remove(target)
            self.live[target.author] -= 1

        return commit

    # --- views ----------------------------------------------------------------------------------------

    def status(self, stmt: Statement, now: int) -> str:
        """What a grant or acceptance is at `now`: active, revoked, expired or pending (not yet valid)."""
        if stmt.id in self.revoked:
            return "revoked"
        if stmt.valid_until is not None and now >= stmt.valid_until:
            return "expired"
        if stmt.valid_from is not None and now < stmt.valid_from:
            return "pending"
        return "active"

    # --- identity keys by log position -----------------------------------------------------------------

    def key_at(self, member_id: str, position: int) -> bytes | None:
        """The identity key that an entry of `member_id` at log `position` was checked against (the state
        before it): None if the member was not admitted yet there."""
        member = self.members.get(member_id)
        if member is None or position <= member.position:
            return None
        for changed, key in self.retired_keys.get(member_id, ()):
            if position <= changed:
                return key
        return member.sign_key

    def identity_keys(self, member_id: str) -> list[bytes]:
        """Every identity key `member_id` has had, the current one first, then the retired ones, newest first."""
        member = self.members.get(member_id)
        if member is None:
            return []
        return [member.sign_key, *(key for _, key in reversed(self.retired_keys.get(member_id, ())))]

    def snapshot(self) -> dict[str, Any]:
        """Everything the state holds, as plain values (for tests and audits comparing two folds)."""
        return {
            "size": self.size,
            "operator_seq": self.operator_seq,
            "members": sorted(self.members.values(), key=lambda m: m.id),
            "groups": sorted(self.groups.values(), key=lambda g: g.name),
            "groups_of": dict(sorted(self.groups_of.items())),
            "statements": sorted(self.statements),
            "revoked": sorted(self.revoked.items()),
            "grants": {a: {c: [s.id for s in v] for c, v in d.items()} for a, d in sorted(self.grants.items())},
            "accepts": {a: {c: [s.id for s in v] for c, v in d.items()} for a, d in sorted(self.accepts.items())},
            "live": dict(sorted(self.live.items())),
            "rules": [r.id for r in self.rules],
            "lifted": sorted(self.lifted.items()),
            "seen": sorted(self.seen.items()),
            "retired_keys": dict(sorted(self.retired_keys.items())),
        }


def _what(record: Record) -> str:
    return {DIR: "directory record", RULE: "operator rule", STMT: "statement"}[record.type]


def _bundle(raw: bytes, member_id: str, what: str) -> identity.PublicBundle:
    try:
        bundle = identity.PublicBundle.from_bytes(raw)
    except BundleError as exc:
        raise PolicyError(f"{what}: {exc.what}") from None
    if bundle.member_id != member_id:
        raise PolicyError(f"{what}: the bundle is for {bundle.member_id}, not {member_id}")
    return bundle
