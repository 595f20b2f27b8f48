"""Following the broker's log: checkpoints, entries and the policy state a node trusts (pure: no I/O).

A node's one root of trust is the pinned log key. Everything else (the operator key, every member's keys,
groups and statements) is learned by folding the log entries under a checkpoint the node verified itself:

1. a new checkpoint note must carry the log key's signature for the pinned origin;
2. it must not be smaller than the stored one, nor the same size with another root (a fork): such a note is
   refused, and since it is validly signed it is *evidence* of equivocation, which the caller keeps;
3. the entries from the stored size up to the new size are fetched in pages; each is either the entry itself
   or, for other members' traffic that the broker redacts, its RFC 6962 leaf hash. Leaf hashes are appended
   to a compact range over everything verified so far, and the new checkpoint is accepted only if the range's
   root equals the checkpoint's root: then every entry (full or hashed) is exactly what the log committed to;
4. only then are the full entries folded, in log order, into `PolicyState`. Entry 0 must be the genesis
   record, which names the operator key: the directory is learned from the verified log, never from the
   broker's word.

With a witness quorum policy (audit.quorum), verifying and *using* a checkpoint are two steps. `commit` verifies
(steps 1-3: what the node witnesses and cosigns), but the entries are only folded, and so only used for keys,
directory changes and receipts, once `trust` is given a cosigned note of a verified tree that meets the quorum.
Until then they wait, verified, in `pending`. A quorum can only form after witnesses cosigned, so witnessing
must never wait for it. Without a policy every verified checkpoint is trusted at once (as before).

Usage: `update = follower.begin(note)`; while `update.wanted()` gives a range, fetch it and `update.add(...)`;
then `follower.commit(update)`, which returns what changed (for the daemon to persist atomically).
`Follower.restore` rebuilds the state from what `commit` asked to persist, without refetching anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from valise import encoding, identity, records
from valise.crypto import sign
from valise.errors import CheckpointError, EncodingError, Error, NoteError, ProofError
from valise.genesis import Genesis
from valise.packet.format import Core, Header
from valise.policy import PolicyState
from valise.policy import records as policy_records
from valise.tlog import checkpoint, merkle, note

if TYPE_CHECKING:
    from valise.audit.quorum import QuorumPolicy

PAGE = 256  # items per `entries` answer (the wire's limit)
STATE_MAX = 1 << 20


class ForkError(CheckpointError):
    """A validly signed checkpoint contradicts the one this node verified: the log equivocated (keep the note)."""

    def __init__(self, what: str, *, evidence: bytes) -> None:
        self.evidence = evidence
        super().__init__(what, hint="the broker showed two different logs; keep the evidence")


class AwaitingQuorum(NoteError):
    """A checkpoint the log signed but whose cosignatures do not (yet) meet this node's witness quorum."""


class ForgedCosignature(NoteError):
    """A cosignature line by a witness key of the quorum policy does not verify (the note was tampered with)."""


class LogMismatchError(CheckpointError):
    """The entries served do not hash to the checkpoint's root, or break the log's own rules (e.g. no genesis)."""


def parse_genesis(entry: bytes, origin: str) -> Genesis:
    try:
        return Genesis.parse(entry, origin=origin)
    except Error as exc:  # StoreError, or BundleError for the broker's bundle
        raise LogMismatchError(f"log entry 0 is refused: {exc.what}") from None


# --- the compact range, persisted ------------------------------------------------------------------------------


def range_stack(r: merkle.CompactRange) -> list[bytes]:
    """The complete-subtree hashes of a compact range, left to right (what must be saved to resume it)."""
    return r.state()[1]


def range_from(size: int, stack: Sequence[bytes]) -> merkle.CompactRange:
    """Rebuild a compact range of `size` leaves from its saved subtree hashes (one per set bit of `size`)."""
    try:
        return merkle.CompactRange.resume(size, stack)
    except ProofError:
        raise CheckpointError(f"saved compact range does not fit a tree of {size} leaves") from None


# --- an update in progress ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Update:
    """Entries being fetched towards `target`; nothing of it is trusted until `Follower.commit` checks the root."""

    target: checkpoint.Checkpoint
    note: bytes
    range: merkle.CompactRange
    start: int
    member: str  # whose node follows: its own packets' entries are kept
    full: dict[int, bytes] = field(default_factory=dict)  # index -> entry served in full and needed by the fold
    parsed: dict[int, Traffic] = field(default_factory=dict)  # index -> what a traffic entry in `full` holds

    @property
    def next_index(self) -> int:
        return self.range.size

    def wanted(self) -> tuple[int, int] | None:
        """The entries [start, end) still to fetch, or None when every entry is in (the broker answers a prefix)."""
        if self.range.size >= self.target.size:
            return None
        return self.range.size, self.target.size

    def add(self, start: int, entries: Sequence[bytes], hashed: Sequence[int], levels: Sequence[int]) -> None:
        """Take one answer: items stand for entries from `start` on, in order; `entries[i]` is an entry, or, if `i`
        is in `hashed`, the root of the complete subtree of 2^level entries that starts there (the matching
        `levels` item; 0: one entry's leaf hash): records this member may not read (protocol.md, "Reading the
        log"). Nothing here is trusted until the commit compares the root with the checkpoint."""
        if start != self.range.size:
            raise LogMismatchError(f"entries page starts at {start}, expected {self.range.size}")
        if len(levels) != len(hashed):
            raise LogMismatchError("entries page gives a level for some hashed items and not others")
        spans = dict(zip(hashed, levels, strict=True))
        if len(spans) != len(hashed) or any(not 0 <= i < len(entries) for i in spans):
            raise LogMismatchError("entries page names a hashed offset outside the page, or twice")
        covered = len(entries) - len(spans) + sum(1 << min(level, merkle.MAX_LEVEL + 1) for level in spans.values())
        if not entries or start + covered > self.target.size:
            raise LogMismatchError(
                f"entries page [{start}, {start + covered}) is empty or beyond the checkpoint of {self.target.size}"
            )
        for i, item in enumerate(entries):
            index = self.range.size
            level = spans.get(i)
            if level is not None:
                if index == 0:
                    raise LogMismatchError("the genesis record (entry 0) must be served in full")
                if len(item) != merkle.HASH_SIZE:
                    raise LogMismatchError(f"subtree hash at entry {index} is {len(item)} bytes, expected 32")
                try:
                    self.range.append_subtree(item, level)
                except ProofError as exc:
                    raise LogMismatchError(f"subtree hash at entry {index}: {exc.what}") from None
            else:
                if len(item) > records.ENTRY_MAX:
                    raise LogMismatchError(f"entry {index} is {len(item)} bytes, over {records.ENTRY_MAX}")
                self.range.append(merkle.hash_leaf(item))
                # Held until the commit only if the fold will use it: a broker that served other members'
                # traffic in full (all of a large tree, say) would otherwise grow this node's memory without end.
                needed, traffic = (True, None) if index == 0 else _needed(item, self.member)
                if needed:
                    self.full[index] = item
                    if traffic is not None:
                        self.parsed[index] = traffic


# --- what a commit changed -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Committed:
    """The outcome of an accepted checkpoint, for the daemon to persist in one transaction."""

    size: int
    state: bytes  # the follower's small state (size, root, range, note)
    keep: list[tuple[int, bytes]]  # entries to keep for a re-fold (genesis and policy records), by index
    mine: list[tuple[int, bytes]]  # (index, header digest) of "pkt" entries this member sent
    problems: list[tuple[str, bytes]]  # what is wrong with an entry the log holds, and the entry (alarms)
    pending: list[tuple[int, bytes]] = field(default_factory=list)  # verified entries not folded yet (a quorum)
    trusted: int = 0  # the trusted size after this change: pending entries below it are folded (drop them)
    acks: list[records.Ack] = field(default_factory=list)  # verified acknowledgements of this member's packets
    # (index, header digest, expires, sender) of "pkt" entries addressed to this member and not in its inbox yet:
    # where each is logged tells which of its sender's identity keys must have signed it, should the sender move to
    # new keys before it is delivered (until it expires: then it is never taken anyway).
    received: list[tuple[int, bytes, int, str]] = field(default_factory=list)
    # Retractions of packets addressed to this member, not marked in its inbox yet or still to arrive, verified
    # under their sender's key at their position: a broker that logs one cannot keep it from the recipient (as
    # acknowledgements from the sender).
    retractions: list[records.Retraction] = field(default_factory=list)


@dataclass(slots=True)
class _Folded:
    keep: list[tuple[int, bytes]] = field(default_factory=list)
    mine: list[tuple[int, bytes]] = field(default_factory=list)
    acks: list[records.Ack] = field(default_factory=list)
    problems: list[tuple[str, bytes]] = field(default_factory=list)
    received: list[tuple[int, bytes, int, str]] = field(default_factory=list)
    retractions: list[records.Retraction] = field(default_factory=list)
    inbox: dict[bytes, bool] = field(default_factory=dict)  # asked of Follower.in_inbox in this fold (a packet,
    # then this member's acknowledgement of it, ask about the same digest)
    coming: set[bytes] = field(default_factory=set)  # the digests in `received`, for retractions in the same fold

    def in_inbox(self, f: Follower, digest: bytes) -> bool:
        """Whether the inbox holds `digest` (True without an inbox to ask: nothing is then missing from it)."""
        if f.in_inbox is None:
            return True
        known = self.inbox.get(digest)
        if known is None:
            known = self.inbox[digest] = f.in_inbox(digest)
        return known

    def committed(self, f: Follower) -> Committed:
        return Committed(
            f.size, f.dump(), self.keep, self.mine, self.problems, [], f.trusted_size, self.acks, self.received,
            self.retractions,
        )  # fmt: skip


class Follower:
    """The verified view of one log: the last verified checkpoint, the last trusted one, and the policy folded
    from the trusted one's entries (the two are the same when no quorum policy is set)."""

    def __init__(
        self,
        log_vkey: str,
        member: str,
        broker: str,
        broker_key: bytes | None = None,
        quorum: QuorumPolicy | None = None,
    ) -> None:
        try:
            self.verifier = note.parse_vkey(log_vkey)
        except NoteError as exc:
            raise CheckpointError(f"the pinned log key is not usable: {exc.what}") from None
        self.origin = self.verifier.name  # C2SP: a log's key is named after its origin
        if quorum is not None and quorum.log.vkey() != self.verifier.vkey():
            raise CheckpointError("the witness policy names another log key than the one this node pins")
        self.member = member
        self.broker = broker
        self.broker_key = broker_key  # the pinned broker bundle's identity key, if the caller pins one
        self.quorum = quorum
        # The verified tree: what this node witnesses (and cosigns); every checkpoint must extend it.
        self.size = 0
        self.root = merkle.EMPTY_ROOT
        self.range = merkle.CompactRange()
        self.note: bytes | None = None
        # The trusted tree (a prefix of the verified one): the last checkpoint that met the quorum.
        self.trusted_size = 0
        self.trusted_root = merkle.EMPTY_ROOT
        self.trusted_note: bytes | None = None
        self.pending: dict[int, bytes] = {}  # full entries in [trusted_size, size), verified, not yet folded
        self.policy: PolicyState | None = None
        # Whether an acknowledgement of ours, byte for byte, is already kept (set by the daemon, which keeps them).
        self.known_ack: Callable[[records.Ack], bool] | None = None
        # Whether a packet (by header digest) is in this node's inbox (set by the daemon): a packet this member
        # acknowledged is there, unless node.db was restored from an older backup or another node runs with
        # this identity, and then the sender, holding the acknowledgement, never sends it again.
        self.in_inbox: Callable[[bytes], bool] | None = None
        # Whether a retraction of a packet (by header digest) by a sender would change anything here (set by the
        # daemon): the inbox holds it unmarked, or does not hold it yet. Only then is a logged one checked.
        self.retraction_wanted: Callable[[bytes, str], bool] | None = None

    # --- state ------------------------------------------------------------------------------------------------

    def dump(self) -> bytes:
        return encoding.pack(
            {
                "v": 2,
                "size": self.size,
                "root": self.root,
                "stack": range_stack(self.range),
                "note": self.note or b"",
                "trusted_size": self.trusted_size,
                "trusted_root": self.trusted_root,
                "trusted_note": self.trusted_note or b"",
            }
        )

    @classmethod
    def restore(
        cls,
        log_vkey: str,
        member: str,
        broker: str,
        state: bytes | None,
        kept: Sequence[tuple[int, bytes]],
        broker_key: bytes | None = None,
        *,
        quorum: QuorumPolicy | None = None,
        pending: Sequence[tuple[int, bytes]] = (),
    ) -> Follower:
        """Rebuild from `dump()` and the entries `commit` asked to keep (re-folded; they were verified before) and
        to hold pending (verified, not trusted yet). Without a quorum, call `catch_up` next: pending entries left
        by an earlier policy are then trusted."""
        f = cls(log_vkey, member, broker, broker_key, quorum)
        if state is None:
            return f
        v1: dict[str, type | tuple[type, ...]] = {"v": int, "size": int, "root": bytes, "stack": list, "note": bytes}
        v2 = {**v1, "trusted_size": int, "trusted_root": bytes, "trusted_note": bytes}
        try:
            version = encoding.unpack(state, what="follower state", max_size=STATE_MAX)
            fields = v1 if isinstance(version, dict) and version.get("v") == 1 else v2
            m = encoding.check_map(version, what="follower state", fields=fields)
        except EncodingError as exc:
            raise CheckpointError(f"saved follower state is damaged: {exc.what}") from None
        f.range = range_from(m["size"], m["stack"])
        if f.range.root() != m["root"]:
            raise CheckpointError("saved follower state: the compact range does not give the saved root")
        f.size, f.root, f.note = m["size"], m["root"], m["note"] or None
        if m["v"] == 1:  # before quorum policies, everything verified was trusted
            f.trusted_size, f.trusted_root, f.trusted_note = f.size, f.root, f.note
        else:
            f.trusted_size, f.trusted_root, f.trusted_note = m["trusted_size"], m["trusted_root"], m["trusted_note"]
            f.trusted_note = f.trusted_note or None
            if not 0 <= f.trusted_size <= f.size:
                raise CheckpointError("saved follower state: the trusted size is beyond the verified size")
        f._fold(sorted(kept), trusted=True, end=f.trusted_size)
        if f.policy is not None:
            f.policy.verify_signatures = True  # the re-fold trusted our own store; new entries are checked
        f.pending = {i: e for i, e in pending if f.trusted_size <= i < f.size}
        return f

    # --- checkpoints ------------------------------------------------------------------------------------------

    def open(self, msg: bytes) -> checkpoint.Checkpoint:
        """Verify a checkpoint note under the pinned log key and origin (NoteError / CheckpointError if not)."""
        cp, _ = checkpoint.open_checkpoint(msg, self.verifier, origin=self.origin)
        return cp

    def begin(self, msg: bytes, proof: tuple[int, Sequence[bytes]] | None = None) -> Update | None:
        """Start moving to the checkpoint `msg`; None if it is the one already held.

        Raises ForkError (with the note as evidence) if it is smaller, or the same size with another root, or if
        `proof` — a consistency proof (old size, hashes) offered with it — shows it does not extend ours.
        """
        cp = self.open(msg)
        if cp.size < self.size:
            raise ForkError(f"checkpoint of size {cp.size} is older than the verified size {self.size}", evidence=msg)
        if cp.size == self.size:
            if cp.root != self.root:
                raise ForkError(f"two different roots for the log at size {cp.size}", evidence=msg)
            return None
        if proof is not None and proof[0] == self.size and self.note is not None:
            try:
                checkpoint.check_newer(checkpoint.Checkpoint(self.origin, self.size, self.root), cp, proof[1])
            except CheckpointError as exc:
                raise ForkError(exc.what, evidence=msg) from None
        return Update(cp, msg, range_from(self.range.size, range_stack(self.range)), self.size, self.member)

    def commit(self, update: Update) -> Committed:
        """Accept `update` if its leaves give the checkpoint's root; then fold its entries into the policy (at
        once without a quorum policy; with one, they wait in `pending` for `trust`)."""
        if update.start != self.size:
            raise LogMismatchError(f"update started at size {update.start}, but the follower is at {self.size}")
        if update.range.size != update.target.size:
            raise LogMismatchError(f"update has {update.range.size} of {update.target.size} entries")
        if update.range.root() != update.target.root:
            raise LogMismatchError(
                f"the entries served do not hash to the root of the checkpoint of size {update.target.size}"
            )
        if self.quorum is None:
            # Fold first: a log the fold refuses (no genesis, another broker) leaves the follower where it was.
            entries = sorted({**self.pending, **update.full}.items())
            folded = self._fold(entries, trusted=False, end=update.target.size, parsed=update.parsed)
            self._verified(update)
            self.pending.clear()
            self.trusted_size, self.trusted_root, self.trusted_note = self.size, self.root, self.note
            return folded.committed(self)
        if 0 in update.full:  # a log that is not ours is refused now, not when it reaches the quorum
            self._genesis(update.full[0])
        self._verified(update)
        # A packet to this member that its inbox holds already folds to nothing: not kept waiting (nor written).
        waiting = {i: e for i, e in update.full.items() if not self._delivered(update.parsed.get(i))}
        self.pending.update(waiting)
        return Committed(self.size, self.dump(), [], [], [], sorted(waiting.items()), self.trusted_size)

    def _delivered(self, traffic: Traffic | None) -> bool:
        if not isinstance(traffic, tuple) or traffic[0].sender == self.member or self.in_inbox is None:
            return False
        return self.in_inbox(traffic[1])

    def _verified(self, update: Update) -> None:
        self.size, self.root, self.range, self.note = update.target.size, update.target.root, update.range, update.note

    # --- the quorum -------------------------------------------------------------------------------------------

    def cosigners(self, msg: bytes) -> list[str]:
        """The policy's witnesses whose cosignatures on `msg` verify (ForgedCosignature if one of them fails)."""
        assert self.quorum is not None
        try:
            _, names = self.quorum.cosigners(msg)
        except CheckpointError:
            raise
        except NoteError as exc:
            raise ForgedCosignature(f"checkpoint note refused: {exc.what}") from None
        return names

    def trust_needs_proof(self, cp: checkpoint.Checkpoint) -> bool:
        """Whether trusting `cp` needs a consistency proof from it to the verified tree (it lies in between)."""
        return self.trusted_size < cp.size < self.size

    def trust(self, msg: bytes, proof: Sequence[bytes] | None = None) -> Committed | None:
        """Use the checkpoint `msg` if it meets the quorum and is a tree this node verified; None if it changes
        nothing (it is not newer than the trusted one).

        Raises AwaitingQuorum if the cosignatures fall short, ForgedCosignature if one is bad, CheckpointError if
        the tree is not verified yet (call `begin`/`commit` first), and ForkError (with the note) if it contradicts
        the verified or trusted tree. A tree smaller than the verified one needs `proof`, the consistency proof
        from it to the verified size (`trust_needs_proof`).
        """
        cp = self.open(msg)
        if self.quorum is None:
            raise CheckpointError("no witness policy is set: every verified checkpoint is trusted")
        # A fork first: a split view is evidence whether or not witnesses cosigned it.
        if cp.size > self.size:
            raise CheckpointError(f"checkpoint of size {cp.size} is beyond the verified size {self.size}")
        if (cp.size == self.size and cp.root != self.root) or (
            cp.size == self.trusted_size and cp.root != self.trusted_root
        ):
            raise ForkError(f"two different roots for the log at size {cp.size}", evidence=msg)
        if self.trust_needs_proof(cp):
            if proof is None:
                raise CheckpointError(f"trusting the checkpoint of size {cp.size} needs a consistency proof")
            try:
                merkle.verify_consistency(cp.size, self.size, proof, cp.root, self.root)
            except Error as exc:
                raise ForkError(
                    f"checkpoint of size {cp.size} is not consistent with the verified size {self.size}: {exc.what}",
                    evidence=msg,
                ) from None
        names = self.cosigners(msg)
        if not self.quorum.satisfied(names):
            raise AwaitingQuorum(
                f"checkpoint of size {cp.size} is cosigned by {len(names)} known witness(es) "
                f"({', '.join(names) or 'none'}), short of the quorum {self.quorum.quorum!r}"
            )
        if cp.size <= self.trusted_size:
            return None
        return self._advance(cp, msg)

    def catch_up(self) -> Committed | None:
        """Without a quorum policy, trust the verified tree (entries left pending by an earlier policy)."""
        if self.quorum is not None or self.trusted_size == self.size:
            return None
        assert self.note is not None
        return self._advance(checkpoint.Checkpoint(self.origin, self.size, self.root), self.note)

    def _advance(self, cp: checkpoint.Checkpoint, msg: bytes) -> Committed:
        """Fold the pending entries below `cp.size` and make `cp` the trusted checkpoint."""
        entries = sorted((i, e) for i, e in self.pending.items() if i < cp.size)
        folded = self._fold(entries, trusted=False, end=cp.size)
        for i, _ in entries:
            del self.pending[i]
        self.trusted_size, self.trusted_root, self.trusted_note = cp.size, cp.root, msg
        return folded.committed(self)

    @property
    def awaiting(self) -> bool:
        """Whether verified entries wait for a checkpoint that meets the quorum."""
        return self.trusted_size < self.size

    def pending_keys(self, member_id: str) -> list[bytes]:
        """The new identity keys of `member_id` in member-rekey records among the verified entries that wait for
        the quorum: what it signs with them cannot be taken until then, and what none of them signs is forged
        (asked only when a signature fails). Only a rekey the trusted state would take counts (signed by the
        operator, handed over by the member's trusted key): the broker alone cannot make a member's forgeries
        wait instead of being refused."""
        policy = self.policy
        member = policy.members.get(member_id) if policy is not None else None
        if policy is None or member is None:
            return []
        keys = []
        for entry in self.pending.values():
            try:
                record = policy_records.parse(entry)
                if record is None or record.kind != "member-rekey" or record.body.get("id") != member_id:
                    continue
                record.verify(policy.operator_key, what="pending member-rekey")
                bundle = record.body["bundle"]
                message = policy_records.rekey_message(member_id, self.origin, bundle)
                sign.verify(member.sign_key, policy_records.REKEY_DOMAIN, message, record.body["rekey_sig"],
                            what="pending member-rekey hand-over")  # fmt: skip
                keys.append(identity.PublicBundle.from_bytes(bundle).sign_key)
            except Error:
                continue
        return keys

    def _genesis(self, entry: bytes) -> Genesis:
        g = parse_genesis(entry, self.origin)
        if g.broker.member_id != self.broker or self.broker_key not in (None, g.broker.sign_key):
            raise LogMismatchError(
                f"genesis names broker {g.broker.member_id!r}, not the pinned broker {self.broker!r}"
            )
        return g

    # --- folding ----------------------------------------------------------------------------------------------

    def _fold(
        self,
        entries: Sequence[tuple[int, bytes]],
        *,
        trusted: bool,
        end: int | None = None,
        parsed: Mapping[int, Traffic] | None = None,
    ) -> _Folded:
        """Fold full entries in index order; indexes missing in between are hashed (non-policy) entries."""
        out = _Folded()
        end = self.size if end is None else end
        unheld: list[tuple[int, records.Ack, bytes]] = []
        for index, entry in entries:
            if index == 0:
                g = self._genesis(entry)
                self.policy = PolicyState(g.origin, g.operator_key, verify_signatures=not trusted)
                self.policy.apply(entry)  # not a policy type: counts position 0
                out.keep.append((0, entry))
                continue
            policy = self.policy
            if policy is None:
                raise LogMismatchError("the log does not start with a genesis record")
            self._skip_to(policy, index)
            try:
                record = policy.apply(entry)
            except Error as exc:  # refused by the rules, malformed, or over a limit (a LimitError once wedged us)
                # The log holds it, so positions must stay right; the broker should never have logged it. It is
                # kept all the same: a record of a kind this version does not know (one added to the format
                # later) folds once the node is upgraded, which re-folds what it kept.
                policy.skip_to(index + 1)
                out.problems.append((f"log entry {index} is refused by the policy: {exc.what}", entry))
                out.keep.append((index, entry))
                continue
            if record is not None:
                out.keep.append((index, entry))
            elif not trusted:
                traffic = parsed.get(index) if parsed is not None else None
                self._traffic(index, entry, out, unheld, traffic or _parse_traffic(entry))
        if unheld:
            first_index, first, evidence = unheld[0]
            out.problems.append(
                (
                    f"{len(unheld)} packet(s) this member acknowledged are not in this node's inbox (the first: log "
                    f"entry {first_index}, packet {first.packet_id.hex()} from {first.sender}); their senders hold "
                    "the acknowledgements and will not send them again. node.db was restored from an older backup, "
                    "or another node runs with this identity",
                    evidence,
                )
            )
        if self.policy is None and end > 0:
            raise LogMismatchError("the log does not start with a genesis record")
        if self.policy is not None:
            self._skip_to(self.policy, end)
        return out

    def _traffic(
        self,
        index: int,
        entry: bytes,
        out: _Folded,
        unheld: list[tuple[int, records.Ack, bytes]],
        traffic: Traffic | None,
    ) -> None:
        """This member's own packets (to check receipts against), the acknowledgements of them, its own
        acknowledgements of packets it received (which its inbox must hold: `unheld` gets those it does not), the
        packets addressed to it that its inbox does not hold yet, and retractions of those it holds.

        Acknowledgements and retractions are taken from the log as well as from the broker's forwarding: a broker
        that logs one cannot keep it from the member it is for, who reads it here in the verified log, checked
        under its signer's key at its position (specs/protocol.md)."""
        if isinstance(traffic, tuple):
            core, digest = traffic
            if core.sender == self.member:
                out.mine.append((index, digest))
            elif self.member in core.recipients and not out.in_inbox(self, digest):
                out.received.append((index, digest, core.expires, core.sender))
                out.coming.add(digest)
            return
        if isinstance(traffic, records.Retraction):
            self._retraction(index, entry, traffic, out)
            return
        if not isinstance(traffic, records.Ack):
            return
        ack = traffic
        assert self.policy is not None
        if ack.recipient == self.member and ack.sender != self.member:
            if out.in_inbox(self, ack.digest):
                return
            me = self.policy.members.get(self.member)
            try:  # only now: one that is ours is checked once, when its packet turns out to be missing
                records.Ack.verified(ack.raw, me.sign_key if me else bytes(32))
            except Error as exc:
                what = f"log entry {index} is an acknowledgement in this member's name that does not verify"
                out.problems.append((f"{what}: {exc.what}", entry))
                return
            unheld.append((index, ack, entry))
            return
        if ack.sender != self.member or (self.known_ack is not None and self.known_ack(ack)):
            return  # not ours, or already kept, verified, when it was forwarded: no second Ed25519 check
        signer = self.policy.members.get(ack.recipient)
        try:
            if signer is None:
                raise Error(f"{ack.recipient} is not a member at that position")
            out.acks.append(records.Ack.verified(ack.raw, signer.sign_key))
        except Error as exc:
            out.problems.append((f"log entry {index} is an acknowledgement that does not verify: {exc.what}", entry))

    def _retraction(self, index: int, entry: bytes, retraction: records.Retraction, out: _Folded) -> None:
        if retraction.sender == self.member or self.retraction_wanted is None:
            return
        coming = retraction.digest in out.coming  # a packet this fold found still to arrive (not stored yet)
        if not coming and not self.retraction_wanted(retraction.digest, retraction.sender):
            return  # not a packet to this member, or marked already (forwarded, verified): no Ed25519 check
        assert self.policy is not None
        signer = self.policy.members.get(retraction.sender)
        try:
            if signer is None:
                raise Error(f"{retraction.sender} is not a member at that position")
            out.retractions.append(records.Retraction.verified(retraction.raw, signer.sign_key, logged=True))
        except Error as exc:
            out.problems.append((f"log entry {index} is a retraction that does not verify: {exc.what}", entry))

    @staticmethod
    def _skip_to(policy: PolicyState, index: int) -> None:
        # Entries not served in full are other members' traffic: not policy, but they hold log positions, and
        # PolicyState records positions (statement and member `position`), so count them.
        if index < policy.size:
            raise LogMismatchError(f"entry {index} folded out of order (policy at {policy.size})")
        policy.skip_to(index)

    # --- views ------------------------------------------------------------------------------------------------

    def member_key(self, member_id: str) -> bytes | None:
        """The identity key of `member_id` as of the verified log (None if not a member)."""
        m = self.policy.members.get(member_id) if self.policy else None
        return None if m is None else m.sign_key

    def identity_keys(self, member_id: str) -> list[bytes]:
        """Every identity key `member_id` has had in the trusted log, the current one first (none: not a member)."""
        return self.policy.identity_keys(member_id) if self.policy else []

    def key_at(self, member_id: str, index: int) -> bytes | None:
        """The identity key that signed `member_id`'s entry at log `index` (None: not a member there)."""
        return self.policy.key_at(member_id, index) if self.policy else None


# A traffic record, unverified: a packet's header core and digest, an acknowledgement, or a retraction.
Traffic = tuple[Core, bytes] | records.Ack | records.Retraction


def _needed(entry: bytes, member: str) -> tuple[bool, Traffic | None]:
    """Whether the fold uses `entry` (a policy record, a packet `member` sent or is sent, an acknowledgement by or
    for it, a retraction for it, or one that does not parse, which the fold reports), and the traffic record it
    holds, decoded once here for the fold; other traffic only holds a position, which its leaf hash gives."""
    try:
        kind, m = records.entry_type(entry)
    except Error:
        return True, None
    if kind in (policy_records.DIR, policy_records.RULE, policy_records.STMT):
        return True, None
    traffic = _traffic_of(kind, m)
    if isinstance(traffic, tuple):
        return traffic[0].sender == member or member in traffic[0].recipients, traffic
    if isinstance(traffic, records.Ack):
        return member in (traffic.sender, traffic.recipient), traffic
    if isinstance(traffic, records.Retraction):
        return traffic.sender != member, traffic
    return False, None


def _parse_traffic(entry: bytes) -> Traffic | None:
    try:
        kind, m = records.entry_type(entry)
    except Error:
        return None
    return _traffic_of(kind, m)


def _traffic_of(kind: str, m: dict[str, Any]) -> Traffic | None:
    """The traffic record a decoded entry holds (None: another kind, or malformed)."""
    try:
        if kind == "pkt" and isinstance(m.get("header"), bytes):
            return Header.parse(m["header"]).core, hashlib.sha256(m["header"]).digest()
        if kind == "ack" and isinstance(m.get("notice"), bytes):
            return records.Ack.parse(m["notice"])[0]
        if kind == "retract" and isinstance(m.get("notice"), bytes):
            return records.Retraction.parse(m["notice"], logged=True)[0]
    except Error:
        return None
    return None


__all__ = [
    "PAGE",
    "Committed",
    "Follower",
    "ForkError",
    "Genesis",
    "LogMismatchError",
    "Update",
    "parse_genesis",
]
