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

Usage: `update = follower.begin(note)`; while `update.wanted()` gives a range, fetch it and `update.add(...)`;
then `follower.commit(update)`, which returns what changed (for the daemon to persist atomically).
`Follower.restore` rebuilds the state from what `commit` asked to persist, without refetching anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from valise import encoding, records
from valise.errors import CheckpointError, EncodingError, Error, NoteError, PolicyError
from valise.genesis import Genesis
from valise.packet.format import Header
from valise.policy import PolicyState
from valise.tlog import checkpoint, merkle, note

PAGE = 256  # entries per GetEntries request (the wire's limit)
STATE_MAX = 1 << 20


class ForkError(CheckpointError):
    """A validly signed checkpoint contradicts the one this node verified: the log equivocated (keep the note)."""

    def __init__(self, what: str, *, evidence: bytes) -> None:
        self.evidence = evidence
        super().__init__(what, hint="the broker showed two different logs; keep the evidence")


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
    return list(r._stack)


def range_from(size: int, stack: Sequence[bytes]) -> merkle.CompactRange:
    """Rebuild a compact range of `size` leaves from its saved subtree hashes (one per set bit of `size`)."""
    if len(stack) != bin(size).count("1") or any(len(h) != merkle.HASH_SIZE for h in stack):
        raise CheckpointError(f"saved compact range does not fit a tree of {size} leaves")
    r = merkle.CompactRange()
    r.size = size
    r._stack = list(stack)
    return r


# --- an update in progress ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Update:
    """Entries being fetched towards `target`; nothing of it is trusted until `Follower.commit` checks the root."""

    target: checkpoint.Checkpoint
    note: bytes
    range: merkle.CompactRange
    start: int
    full: dict[int, bytes] = field(default_factory=dict)  # index -> entry served in full

    @property
    def next_index(self) -> int:
        return self.range.size

    def wanted(self) -> tuple[int, int] | None:
        """The next page [start, end) to fetch, or None when every entry is in."""
        if self.range.size >= self.target.size:
            return None
        return self.range.size, min(self.target.size, self.range.size + PAGE)

    def add(self, start: int, entries: Sequence[bytes], hashed: Sequence[int]) -> None:
        """Take one page: `entries[i]` is entry `start + i`, or its leaf hash if `i` is in `hashed`."""
        if start != self.range.size:
            raise LogMismatchError(f"entries page starts at {start}, expected {self.range.size}")
        if not entries or start + len(entries) > self.target.size:
            raise LogMismatchError(
                f"entries page [{start}, {start + len(entries)}) is empty or beyond the checkpoint of "
                f"{self.target.size}"
            )
        redacted = set(hashed)
        if any(not 0 <= i < len(entries) for i in redacted):
            raise LogMismatchError("entries page names a hashed offset outside the page")
        for i, item in enumerate(entries):
            index = start + i
            if i in redacted:
                if index == 0:
                    raise LogMismatchError("the genesis record (entry 0) must be served in full")
                if len(item) != merkle.HASH_SIZE:
                    raise LogMismatchError(f"leaf hash of entry {index} is {len(item)} bytes, expected 32")
                self.range.append(item)
            else:
                if len(item) > records.ENTRY_MAX:
                    raise LogMismatchError(f"entry {index} is {len(item)} bytes, over {records.ENTRY_MAX}")
                self.range.append(merkle.hash_leaf(item))
                self.full[index] = item


# --- what a commit changed -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Committed:
    """The outcome of an accepted checkpoint, for the daemon to persist in one transaction."""

    size: int
    state: bytes  # the follower's small state (size, root, range, note)
    keep: list[tuple[int, bytes]]  # entries to keep for a re-fold (genesis and policy records), by index
    mine: list[tuple[int, bytes]]  # (index, header digest) of "pkt" entries this member sent
    problems: list[str]  # entries the policy refused although the log holds them (alarms)


class Follower:
    """The verified view of one log: the last accepted checkpoint and the policy folded from its entries."""

    def __init__(self, log_vkey: str, member: str, broker: str, broker_key: bytes | None = None) -> None:
        try:
            self.verifier = note.parse_vkey(log_vkey)
        except NoteError as exc:
            raise CheckpointError(f"the pinned log key is not usable: {exc.what}") from None
        self.origin = self.verifier.name  # C2SP: a log's key is named after its origin
        self.member = member
        self.broker = broker
        self.broker_key = broker_key  # the pinned broker bundle's identity key, if the caller pins one
        self.size = 0
        self.root = merkle.EMPTY_ROOT
        self.range = merkle.CompactRange()
        self.note: bytes | None = None
        self.policy: PolicyState | None = None

    # --- state ------------------------------------------------------------------------------------------------

    def dump(self) -> bytes:
        return encoding.pack(
            {"v": 1, "size": self.size, "root": self.root, "stack": range_stack(self.range), "note": self.note or b""}
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
    ) -> Follower:
        """Rebuild from `dump()` and the entries `commit` asked to keep (re-folded; they were verified before)."""
        f = cls(log_vkey, member, broker, broker_key)
        if state is None:
            return f
        try:
            m = encoding.unpack_map(
                state,
                what="follower state",
                max_size=STATE_MAX,
                fields={"v": int, "size": int, "root": bytes, "stack": list, "note": bytes},
            )
        except EncodingError as exc:
            raise CheckpointError(f"saved follower state is damaged: {exc.what}") from None
        f.range = range_from(m["size"], m["stack"])
        if f.range.root() != m["root"]:
            raise CheckpointError("saved follower state: the compact range does not give the saved root")
        f.size, f.root, f.note = m["size"], m["root"], m["note"] or None
        f._fold(sorted(kept), trusted=True)
        if f.policy is not None:
            f.policy.verify_signatures = True  # the re-fold trusted our own store; new entries are checked
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
        return Update(cp, msg, range_from(self.range.size, range_stack(self.range)), self.size)

    def commit(self, update: Update) -> Committed:
        """Accept `update` if its leaves give the checkpoint's root; then fold its entries into the policy."""
        if update.start != self.size:
            raise LogMismatchError(f"update started at size {update.start}, but the follower is at {self.size}")
        if update.range.size != update.target.size:
            raise LogMismatchError(f"update has {update.range.size} of {update.target.size} entries")
        if update.range.root() != update.target.root:
            raise LogMismatchError(
                f"the entries served do not hash to the root of the checkpoint of size {update.target.size}"
            )
        entries = sorted(update.full.items())
        keep, mine, problems = self._fold(entries, trusted=False, end=update.target.size)
        self.size, self.root, self.range, self.note = update.target.size, update.target.root, update.range, update.note
        return Committed(self.size, self.dump(), keep, mine, problems)

    # --- folding ----------------------------------------------------------------------------------------------

    def _fold(
        self, entries: Sequence[tuple[int, bytes]], *, trusted: bool, end: int | None = None
    ) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]], list[str]]:
        """Fold full entries in index order; indexes missing in between are hashed (non-policy) entries."""
        keep: list[tuple[int, bytes]] = []
        mine: list[tuple[int, bytes]] = []
        problems: list[str] = []
        end = self.size if end is None else end
        for index, entry in entries:
            if index == 0:
                g = parse_genesis(entry, self.origin)
                if g.broker.member_id != self.broker or self.broker_key not in (None, g.broker.sign_key):
                    raise LogMismatchError(
                        f"genesis names broker {g.broker.member_id!r}, not the pinned broker {self.broker!r}"
                    )
                self.policy = PolicyState(g.origin, g.operator_key, verify_signatures=not trusted)
                self.policy.apply(entry)  # not a policy type: counts position 0
                keep.append((0, entry))
                continue
            policy = self.policy
            if policy is None:
                raise LogMismatchError("the log does not start with a genesis record")
            self._skip_to(policy, index)
            try:
                record = policy.apply(entry)
            except (PolicyError, EncodingError) as exc:
                # The log holds it, so positions must stay right; the broker should never have logged it.
                policy.size += 1
                problems.append(f"log entry {index} is refused by the policy: {exc.what}")
                continue
            if record is not None:
                keep.append((index, entry))
            elif not trusted:
                digest = _my_packet(entry, self.member)
                if digest is not None:
                    mine.append((index, digest))
        if self.policy is None and end > 0:
            raise LogMismatchError("the log does not start with a genesis record")
        if self.policy is not None:
            self._skip_to(self.policy, end)
        return keep, mine, problems

    @staticmethod
    def _skip_to(policy: PolicyState, index: int) -> None:
        # Entries not served in full are other members' traffic: not policy, but they hold log positions, and
        # PolicyState records positions (statement and member `position`), so count them.
        if index < policy.size:
            raise LogMismatchError(f"entry {index} folded out of order (policy at {policy.size})")
        policy.size = index

    # --- views ------------------------------------------------------------------------------------------------

    def member_key(self, member_id: str) -> bytes | None:
        """The identity key of `member_id` as of the verified log (None if not a member)."""
        m = self.policy.members.get(member_id) if self.policy else None
        return None if m is None else m.sign_key


def _my_packet(entry: bytes, member: str) -> bytes | None:
    """The header digest if `entry` is a "pkt" record sent by `member` (to check receipts against)."""
    try:
        kind, m = records.entry_type(entry)
        if kind != "pkt" or not isinstance(m.get("header"), bytes):
            return None
        header = Header.parse(m["header"])
    except Error:
        return None
    if header.core.sender != member:
        return None
    return hashlib.sha256(m["header"]).digest()


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
