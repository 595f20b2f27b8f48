"""Witness quorum policies: which cosignatures make a checkpoint trustworthy (pure; specs/audit.md, "Quorum").

The file format follows the Sigsum policy file that C2SP tlog-policy is drawn from, with C2SP vkeys for keys:

    log <log vkey> [<url>]
    witness <name> <cosignature vkey> [<url>]
    group <name> <k>|any|all <name> <name> ...
    quorum <name>|none

Lines are whitespace-separated words; `#` starts a comment; blank lines are ignored. Witnesses and groups share
one namespace; a group may only name witnesses and groups defined above it (so there are no cycles), and
`none` is reserved for "no cosignature needed". A checkpoint satisfies the policy when the log's own key signed
it and the quorum group is satisfied by the witnesses whose cosignatures verify: a witness is satisfied when
its cosignature verifies, a group when at least `k` of its members are. Nodes and auditors share this parser.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

from valise.errors import NoteError, UsageError
from valise.tlog import cosignature, note
from valise.tlog.checkpoint import Checkpoint, open_checkpoint

MAX_POLICY = 64 * 1024
MAX_WITNESSES = 100  # a note carries at most 100 signatures (specs/log.md)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
NONE = "none"


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    threshold: int
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QuorumPolicy:
    log: note.Ed25519Verifier
    log_url: str | None
    witnesses: dict[str, cosignature.CosignatureVerifier]
    urls: dict[str, str]
    groups: dict[str, Group]
    quorum: str

    @staticmethod
    def simple(log: note.Ed25519Verifier, witnesses: list[cosignature.CosignatureVerifier], k: int) -> QuorumPolicy:
        """The policy of `--witness ... --quorum k`: any k of the listed witnesses."""
        if not 0 <= k <= len(witnesses):
            raise UsageError(f"a quorum of {k} needs at least {k} witnesses (got {len(witnesses)})")
        # Named as their keys are (a vkey names its holder), so reports say who cosigned; a name given twice, to
        # different keys, is told apart by its position.
        names: dict[str, cosignature.CosignatureVerifier] = {}
        for i, w in enumerate(witnesses):
            names[w.name if w.name not in names else f"{w.name}#{i}"] = w
        if k == 0:
            return QuorumPolicy(log, None, names, {}, {}, NONE)
        return QuorumPolicy(log, None, names, {}, {"quorum": Group("quorum", k, tuple(names))}, "quorum")

    def satisfied(self, verified: Collection[str], name: str | None = None) -> bool:
        """Whether the witnesses named in `verified` (policy names) satisfy group `name` (default: the quorum)."""
        name = self.quorum if name is None else name
        if name == NONE:
            return True
        if name in self.witnesses:
            return name in verified
        group = self.groups[name]
        return sum(1 for m in group.members if self.satisfied(verified, m)) >= group.threshold

    def cosigners(self, msg: bytes) -> tuple[Checkpoint, list[str]]:
        """Verify a checkpoint note's log signature and every line by a known witness key; return the checkpoint
        and the names of the witnesses that cosigned, without deciding the quorum (nodes report who is missing).

        Raises NoteError (or CheckpointError) if the log did not sign it or a known key's line does not verify.
        """
        verifiers = list(self.witnesses.values())
        cp, opened = open_checkpoint(msg, self.log, origin=self.log.name, witnesses=verifiers)
        by_id = {(w.name, bytes(w.key_id)): name for name, w in self.witnesses.items()}
        return cp, sorted({by_id[(s.name, s.key_id)] for s in opened.verified if (s.name, s.key_id) in by_id})

    def unchecked(self, msg: bytes) -> list[str]:
        """Key names on the note's other signature lines: cosignatures by keys this policy does not hold, so not
        checked. Their presence says nothing until their keys are pinned (--witness, --policy)."""
        known = {(self.log.name, self.log.key_id)} | {(w.name, w.key_id) for w in self.witnesses.values()}
        return sorted({s.name for s in note.parse_note(msg).signatures if (s.name, s.key_id) not in known})

    def open(self, msg: bytes) -> tuple[Checkpoint, list[str]]:
        """Verify a checkpoint note under this policy; return it and the names of the witnesses that cosigned.

        Raises NoteError (or CheckpointError) if the log did not sign it, a known key's line does not verify,
        or the quorum is not met.
        """
        cp, cosigned = self.cosigners(msg)
        if not self.satisfied(cosigned):
            raise NoteError(
                f"checkpoint of size {cp.size} is cosigned by {len(cosigned)} known witness(es) "
                f"({', '.join(cosigned) or 'none'}), which does not satisfy the quorum {self.quorum!r}"
            )
        return cp, cosigned


def parse(text: str) -> QuorumPolicy:
    """Parse a quorum policy file strictly; every mistake names its line."""
    if len(text) > MAX_POLICY:
        raise UsageError(f"quorum policy is {len(text)} characters, over the limit of {MAX_POLICY}")
    log: note.Ed25519Verifier | None = None
    log_url: str | None = None
    witnesses: dict[str, cosignature.CosignatureVerifier] = {}
    urls: dict[str, str] = {}
    groups: dict[str, Group] = {}
    quorum: str | None = None
    keys: set[bytes] = set()
    for number, raw in enumerate(text.split("\n"), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"quorum policy line {number}"
        kind, args = words[0], words[1:]

        def fail(msg: str, where: str = where) -> UsageError:
            return UsageError(f"{where}: {msg}")

        if kind == "log":
            if log is not None:
                raise fail("a second 'log' line (one policy file describes one log)")
            if len(args) not in (1, 2):
                raise fail("expected 'log <vkey> [<url>]'")
            try:
                log = note.parse_vkey(args[0])
            except NoteError as exc:
                raise fail(exc.what) from None
            log_url = args[1] if len(args) == 2 else None
        elif kind == "witness":
            if len(args) not in (2, 3):
                raise fail("expected 'witness <name> <vkey> [<url>]'")
            name = _new_name(args[0], witnesses, groups, fail)
            try:
                w = cosignature.parse_vkey(args[1])
            except NoteError as exc:
                raise fail(exc.what) from None
            if w.public in keys:
                raise fail(f"witness {name} has the key of an earlier witness (one key serves one witness)")
            if len(witnesses) >= MAX_WITNESSES:
                raise fail(f"more than {MAX_WITNESSES} witnesses")
            keys.add(w.public)
            witnesses[name] = w
            if len(args) == 3:
                urls[name] = args[2]
        elif kind == "group":
            if len(args) < 3:
                raise fail("expected 'group <name> <k>|any|all <member> ...'")
            name = _new_name(args[0], witnesses, groups, fail)
            members = tuple(args[2:])
            for m in members:
                if m not in witnesses and m not in groups:
                    raise fail(f"group {name} names {m!r}, which is not a witness or group defined above")
            if len(set(members)) != len(members):
                raise fail(f"group {name} names a member twice")
            k = {"any": 1, "all": len(members)}.get(args[1])
            if k is None:
                if not (args[1].isdigit() and args[1] == str(int(args[1]))):
                    raise fail(f"group threshold {args[1]!r} is not a number, 'any' or 'all'")
                k = int(args[1])
            if not 1 <= k <= len(members):
                raise fail(f"group {name} threshold {k} is not between 1 and its {len(members)} members")
            groups[name] = Group(name, k, members)
        elif kind == "quorum":
            if quorum is not None:
                raise fail("a second 'quorum' line")
            if len(args) != 1:
                raise fail("expected 'quorum <name>|none'")
            if args[0] != NONE and args[0] not in witnesses and args[0] not in groups:
                raise fail(f"quorum names {args[0]!r}, which is not a witness or group defined above")
            quorum = args[0]
        else:
            raise fail(f"unknown keyword {kind[:32]!r} (expected log, witness, group or quorum)")
    if log is None:
        raise UsageError("quorum policy has no 'log' line")
    if quorum is None:
        raise UsageError("quorum policy has no 'quorum' line (write 'quorum none' to require no cosignature)")
    return QuorumPolicy(log, log_url, witnesses, urls, groups, quorum)


def _new_name(name: str, witnesses: Collection[str], groups: Collection[str], fail: Callable[[str], UsageError]) -> str:
    if not _NAME.fullmatch(name) or name == NONE:
        raise fail(f"{name[:64]!r} is not a valid name (1-64 of A-Z a-z 0-9 . _ -, not 'none')")
    if name in witnesses or name in groups:
        raise fail(f"{name} is defined twice")
    return name
