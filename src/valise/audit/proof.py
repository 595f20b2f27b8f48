"""Offline proofs that an entry is in the log (C2SP tlog-proof bundles; specs/audit.md, "Proof bundles").

`export_proof` builds a bundle for entry `index` from any TileSource: the checkpoint as served (with its
cosignatures), the inclusion proof assembled from hash tiles, and, when it fits, the entry itself as the
bundle's `extra` data. The extra data is not authenticated by the bundle format; `verify_proof` therefore
trusts it only after its leaf hash passed the inclusion proof under a checkpoint the log key signed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from valise import records
from valise.audit import tree
from valise.audit.quorum import QuorumPolicy
from valise.audit.source import TileSource
from valise.errors import Error, ProofError, StoreError, UsageError
from valise.packet.format import Header
from valise.tlog import merkle, proofbundle, tiles


@dataclass(frozen=True, slots=True)
class ProvenEntry:
    index: int
    size: int
    root: bytes
    entry: bytes
    cosigners: list[str]
    unchecked_cosigners: list[str]  # other signature lines, by keys the reader did not pin (not checked)

    def describe(self) -> dict[str, Any]:
        """What the entry says, for a person (only ever called on an entry whose inclusion verified)."""
        out: dict[str, Any] = {"index": self.index, "checkpoint_size": self.size, "root": self.root.hex()}
        out["cosigners"] = self.cosigners
        out["unchecked_cosigners"] = self.unchecked_cosigners
        try:
            kind, m = records.entry_type(self.entry)
        except Error:
            return {**out, "type": None}
        out["type"] = kind
        if kind == "pkt":
            # In the log is not well formed: a broker can log anything under "pkt" (an auditor names such an
            # entry pkt-malformed); shown here only if it is a packet record with a parsable header.
            header_bytes, at = m.get("header"), m.get("at")
            if isinstance(header_bytes, bytes) and (at is None or type(at) is int):
                try:
                    header = Header.parse(header_bytes)
                except Error:
                    return out
                out.update(
                    sender=header.core.sender,
                    to=list(header.core.recipients),
                    packet_id=header.core.packet_id.hex(),
                    digest=hashlib.sha256(header.raw).hexdigest(),
                    at=at,
                )
        return out


def export_proof(source: TileSource, index: int, policy: QuorumPolicy, *, entry_limit: int = 4096) -> bytes:
    """A tlog-proof bundle for entry `index` under the checkpoint `source` serves (verified first)."""
    raw = source.read("checkpoint")
    if raw is None:
        raise StoreError(f"{source.describe()} has no checkpoint")
    cp, _ = policy.open(raw)
    if not 0 <= index < cp.size:
        raise UsageError(f"entry {index} is not in the checkpoint of {cp.size} entries")
    proof = tree.inclusion_proof(source, index, cp.size)
    n = index // tiles.WIDTH
    width = min(tiles.WIDTH, cp.size - n * tiles.WIDTH)
    data = source.read(tiles.Tile(tiles.ENTRIES, n, width).path)
    if data is None:
        raise StoreError(f"the entry bundle for entry {index} is missing")
    entry = tiles.parse_entries(data, width)[index - n * tiles.WIDTH]
    return build_proof(raw, index, proof, entry, policy, entry_limit=entry_limit)


def build_proof(
    checkpoint_note: bytes,
    index: int,
    proof: Sequence[bytes],
    entry: bytes,
    policy: QuorumPolicy,
    *,
    entry_limit: int = 4096,
) -> bytes:
    """A tlog-proof bundle from its parts, however they were fetched (tiles, or a node's wire requests): checked
    first as `verify_proof` will check it, so that no bundle is handed out that its holder cannot verify."""
    cp, _ = policy.open(checkpoint_note)
    if not 0 <= index < cp.size:
        raise UsageError(f"entry {index} is not in the checkpoint of {cp.size} entries")
    merkle.verify_inclusion(merkle.hash_leaf(entry), index, cp.size, proof, cp.root)
    extra = entry if 0 < len(entry) <= min(entry_limit, proofbundle.MAX_EXTRA) else None
    return proofbundle.create(index, proof, checkpoint_note, extra)


def verify_proof(data: bytes, policy: QuorumPolicy, entry: bytes | None = None) -> ProvenEntry:
    """Check a bundle: the checkpoint under `policy`, then the inclusion of `entry` (default: the extra data)."""
    bundle = proofbundle.parse(data)
    if entry is None:
        if bundle.extra is None:
            raise UsageError("the proof bundle carries no entry; give the entry bytes (--entry FILE)")
        entry = bundle.extra
    cp, cosigners = policy.open(bundle.checkpoint_note)
    try:
        merkle.verify_inclusion(merkle.hash_leaf(entry), bundle.index, cp.size, bundle.proof, cp.root)
    except ProofError as exc:
        raise ProofError(f"entry {bundle.index} is not in the log's checkpoint of size {cp.size}: {exc.what}") from None
    return ProvenEntry(bundle.index, cp.size, cp.root, entry, cosigners, policy.unchecked(bundle.checkpoint_note))
