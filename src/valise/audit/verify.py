"""The audit: checkpoint, consistency, tree, then every entry (specs/audit.md, "Order of checks").

`audit(source, policy, state=..., now=...)` reads a log through a `TileSource` and returns a `Report`. It does
no I/O of its own beyond the source, reads no clock (`now` is passed in) and keeps everything it needs to
continue in an `AuditState` made of plain values.

Order, each step relying on the one before:
1. the checkpoint: signed by the log key, cosigned to the quorum (else `CheckpointRefused`);
2. against the held state, if any: not smaller, the same root at the same size, and a consistency proof
   assembled from the hash tiles verifies between the two signed roots (else `CheckpointRefused`, with the new
   checkpoint kept as evidence: two validly signed checkpoints that are not consistent prove a fork);
3. the new entries, bundle by bundle: their leaf hashes are compared with the level-0 tile, and both are folded
   into compact ranges; whichever reaches the signed root is the truth. If only the tiles do, each differing
   entry is named (altered, missing, swapped); if neither does, the tree as a whole is reported;
4. every entry is replayed (replay.Replayer): form, signatures, consent, acknowledgements, retractions, purges.
The state advances only when step 3 tied the entries to the signed root.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future
from dataclasses import dataclass, replace
from typing import Any

from valise.audit import tree
from valise.audit.findings import Finding
from valise.audit.quorum import QuorumPolicy
from valise.audit.replay import Replayer, SigCheck, verify_batch
from valise.audit.source import TileSource
from valise.broker.relay import DEFAULT_WINDOW
from valise.errors import AuditAlarm, CheckpointError, NoteError, StoreError, TileError, UsageError
from valise.tlog import checkpoint, note

STATE_FORMAT = "valise-audit/v1"
CHUNK = 4096  # entries per batch of signature checks sent to a worker
CHUNK_BYTES = 8 << 20  # or fewer, when their messages add up to this (4096 headers of 64 KiB would be 256 MiB)
MAX_BATCHES_IN_FLIGHT = 16  # past this the audit waits for the oldest: what workers hold stays bounded
Progress = Callable[[int, int], None]


class CheckpointRefused(AuditAlarm):
    """The served checkpoint must not be accepted; `evidence` is the refused note when the log key signed it."""

    def __init__(self, what: str, *, evidence: bytes | None = None, held: bytes | None = None) -> None:
        super().__init__(what)
        self.evidence = evidence
        self.held = held


@dataclass
class AuditState:
    """Everything an audit needs to continue from a verified checkpoint (saved as JSON by audit.state)."""

    origin: str
    vkey: str
    checkpoint_note: bytes  # the last verified checkpoint note, verbatim
    size: int
    root: bytes
    compact: tree.Compact
    replay: Replayer

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "origin": self.origin,
            "vkey": self.vkey,
            "checkpoint": self.checkpoint_note.decode("utf-8"),
            "size": self.size,
            "root": self.root.hex(),
            "compact": [h.hex() for h in self.compact.stack],
            "replay": self.replay.to_json(),
        }

    @staticmethod
    def from_json(value: dict[str, Any], log: note.Ed25519Verifier) -> AuditState:
        if not isinstance(value, dict) or value.get("format") != STATE_FORMAT:
            raise UsageError(f"not a {STATE_FORMAT} state file")
        if value["vkey"] != log.vkey():
            raise UsageError("the state file belongs to another log key", hint="use one state file per log")
        raw = value["checkpoint"].encode("utf-8")
        cp, _ = checkpoint.open_checkpoint(raw, log)  # our own file, but never trust a checkpoint unverified
        size, root = value["size"], bytes.fromhex(value["root"])
        compact = tree.Compact(size, [bytes.fromhex(h) for h in value["compact"]])
        if (cp.size, cp.root) != (size, root) or compact.root() != root:
            raise UsageError("the state file is inconsistent (checkpoint, size, root and compact range disagree)")
        replay = Replayer.from_json(cp.origin, value["replay"])
        if replay.size != size:
            raise UsageError("the state file's replay does not end at its checkpoint")
        return AuditState(cp.origin, value["vkey"], raw, size, root, compact, replay)


@dataclass
class Report:
    checkpoint: checkpoint.Checkpoint
    checkpoint_note: bytes
    cosigners: list[str]
    start: int  # first entry verified by this run
    findings: list[Finding]  # every finding so far (a resumed audit includes the earlier ones)
    new_findings: list[Finding]
    summary: dict[str, int]
    state: AuditState | None  # None when the entries could not be tied to the checkpoint (or tree_only)
    tree_verified: bool
    unchecked_cosigners: list[str]  # other signature lines, by keys the auditor did not pin (not checked)

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {
            "origin": self.checkpoint.origin,
            "size": self.checkpoint.size,
            "root": self.checkpoint.root.hex(),
            "cosigners": self.cosigners,
            "unchecked_cosigners": self.unchecked_cosigners,
            "verified_from": self.start,
            "tree_verified": self.tree_verified,
            "summary": self.summary,
            "findings": [f.to_json() for f in self.findings],
            "new_findings": len(self.new_findings),
        }


def open_checkpoint(source: TileSource, policy: QuorumPolicy) -> tuple[bytes, checkpoint.Checkpoint, list[str]]:
    raw = source.read("checkpoint")
    if raw is None:
        raise StoreError(f"{source.describe()} has no checkpoint")
    try:
        cp, cosigners = policy.open(raw)
    except (NoteError, CheckpointError) as exc:
        raise CheckpointRefused(f"checkpoint refused: {exc.what}") from None
    return raw, cp, cosigners


def check_extends(source: TileSource, held: AuditState, raw: bytes, cp: checkpoint.Checkpoint) -> None:
    """Refuse `cp` unless it extends the held checkpoint (step 2); a refusal keeps `raw` as evidence."""
    old = checkpoint.Checkpoint(held.origin, held.size, held.root)
    if cp.size < old.size:
        raise CheckpointRefused(
            f"checkpoint goes backwards from size {old.size} to {cp.size}", evidence=raw, held=held.checkpoint_note
        )
    if cp.size == old.size:
        if cp.root != old.root:
            raise CheckpointRefused(
                f"split view: two checkpoints of size {cp.size} with different roots",
                evidence=raw,
                held=held.checkpoint_note,
            )
        return
    try:
        proof = tree.consistency_proof(source, old.size, cp.size)
        checkpoint.check_newer(old, cp, proof)
    except (CheckpointError, TileError) as exc:
        raise CheckpointRefused(
            f"checkpoint of size {cp.size} is not consistent with the held one of size {old.size}: {exc.what}",
            evidence=raw,
            held=held.checkpoint_note,
        ) from None


def audit(
    source: TileSource,
    policy: QuorumPolicy,
    *,
    now: int,
    state: AuditState | None = None,
    window: int = DEFAULT_WINDOW,
    executor: Executor | None = None,
    progress: Progress | None = None,
    tree_only: bool = False,
) -> Report:
    """Run the audit (steps 1-4; `tree_only` stops after step 3 and then returns no state to resume from)."""
    raw, cp, cosigners = open_checkpoint(source, policy)
    if state is not None:
        if state.origin != cp.origin:
            raise UsageError(f"the state is for log {state.origin!r}, the checkpoint for {cp.origin!r}")
        check_extends(source, state, raw, cp)
        replay = state.replay
        signed, served = state.compact.copy(), state.compact.copy()
    else:
        replay = Replayer(cp.origin, window=window)
        signed, served = tree.Compact(), tree.Compact()
    replay.now = now
    start = signed.size
    tree_findings: list[Finding] = []
    # Signature batches in the order they were made: a batch still checking (its checks, its future), or, once
    # checked, only the checks that failed. Failures are applied in that order at the end, whenever each batch
    # finished, so the findings do not depend on timing; and a checked batch keeps none of the messages it
    # checked (each a header of up to 64 KiB), so memory follows the batches in flight, not the log's size.
    batches: list[tuple[list[SigCheck], Future[list[int]]] | list[SigCheck]] = []

    def failures(checks: list[SigCheck], bad: list[int]) -> list[SigCheck]:
        # Without the bytes checked: a log of forged packets would otherwise keep every header it holds.
        return [replace(checks[k], public=b"", message=b"", signature=b"") for k in bad]

    def settle(wait_beyond: int) -> None:
        """Keep only the failures of finished batches; wait for the oldest while more than `wait_beyond` run."""
        running = [i for i, b in enumerate(batches) if isinstance(b, tuple)]
        for n, i in enumerate(running):
            batch = batches[i]
            assert isinstance(batch, tuple)
            checks, future = batch
            if future.done() or len(running) - n > wait_beyond:
                try:
                    bad = future.result()
                except BrokenExecutor as exc:  # a worker killed (out of memory, a signal): say so, not a traceback
                    raise StoreError(f"a process checking signatures stopped: {exc}") from None
                batches[i] = failures(checks, bad)

    def flush_checks() -> None:
        checks = replay.take_checks()
        if not checks:
            return
        items = [(c.public, c.message, c.signature) for c in checks]
        if executor is None:
            batches.append(failures(checks, verify_batch(items)))
            return
        try:
            batches.append((checks, executor.submit(verify_batch, items)))
        except BrokenExecutor as exc:  # a worker died between two batches
            raise StoreError(f"a process checking signatures stopped: {exc}") from None
        settle(MAX_BATCHES_IN_FLIGHT)

    for b in tree.bundles(source, start, cp.size, with_entries=not tree_only):
        width = len(b.hashes)
        # Tree only: the hash tiles are all there is, and tying them to the signed root is the whole check.
        leaves = list(b.hashes) if tree_only else tree.leaf_hashes(b.entries, width)
        signed.extend(b.hashes)
        served.extend(leaves)
        if b.problem is not None:
            tree_findings.append(
                Finding(b.first, "bundle-malformed", f"the bundle holding entry {b.first}: {b.problem}")
            )
        if leaves != b.hashes:
            tree_findings.extend(tree.name_differences(b.first, leaves, b.hashes))
        for i in range(0 if tree_only else width):
            index = b.first + i
            if i < len(b.entries):
                replay.feed(index, b.entries[i])
            else:
                replay.policy.skip_to(
                    replay.policy.size + 1
                )  # a missing entry: nothing to replay, keep positions aligned
            if len(replay.checks) >= CHUNK or replay.checks_bytes >= CHUNK_BYTES:
                flush_checks()
        if progress is not None:
            progress(b.first + width - start, cp.size - start)
    flush_checks()
    settle(0)
    for batch in batches:
        assert not isinstance(batch, tuple)
        for check in batch:
            replay.signature_failed(check)

    tied = True
    malformed = [f for f in tree_findings if f.code == "bundle-malformed"]
    if served.root() != cp.root:
        if signed.root() == cp.root:
            replay.findings.extend(tree_findings)  # the tiles hold the signed hashes: the differences are real
        else:
            tied = False
            replay.findings.append(
                Finding(
                    None,
                    "tree-root",
                    f"neither the entries [{start}, {cp.size}) nor the hash tiles reach the signed root of size "
                    f"{cp.size}",
                )
            )
            replay.findings.extend(malformed)
    else:
        # The entries are the log's, but a bundle carried more than them (entries past its width, trailing bytes):
        # what a reader MUST refuse (log.md), so it is named even though nothing signed was changed.
        replay.findings.extend(malformed)
    replay.findings.sort(key=lambda f: (-1 if f.index is None else f.index, f.code))
    new_state = None
    if tied and served.root() == cp.root and not tree_only:
        new_state = AuditState(cp.origin, policy.log.vkey(), raw, cp.size, cp.root, served, replay)
    new = [f for f in replay.findings if f.index is None or f.index >= start]
    verified = tied and served.root() == cp.root
    unchecked = policy.unchecked(raw)
    return Report(
        cp, raw, cosigners, start, list(replay.findings), new, replay.summary(now), new_state, verified, unchecked
    )
