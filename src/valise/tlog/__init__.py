"""The transparency log core (pure: no I/O). specs/log.md is the authority.

- merkle: RFC 6962 hashing, stored-hash addressing, proofs, verifiers
- note: C2SP signed notes (Ed25519); checkpoint: C2SP tlog-checkpoint; cosignature: C2SP tlog-cosignature
- proofbundle: C2SP tlog-proof; tiles: C2SP tlog-tiles layout, entry bundles, root recomputation
"""

from valise.tlog.merkle import verify_consistency, verify_inclusion

__all__ = ["verify_consistency", "verify_inclusion"]
