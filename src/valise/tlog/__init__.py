"""The transparency log core (pure: no I/O): Merkle hashing and proofs, signed notes, checkpoints,
cosignatures, proof bundles and the tlog-tiles layout. specs/log.md is the authority."""

from valise.tlog.merkle import verify_consistency, verify_inclusion

__all__ = ["verify_consistency", "verify_inclusion"]
