"""The auditor: offline verification of the log and replay of every relay against the policy (specs/audit.md).

- `source`   where the log is read from (a `TileSource`: an exported directory or a tlog-tiles HTTP server);
- `tree`     compact ranges, hash tiles as proofs, naming an entry that differs from the signed tree;
- `replay`   the entry-by-entry fold: signatures with keys as of each position, consent, acks, retractions;
- `verify`   the audit in order (checkpoint, consistency, tree, entries) and its resumable state;
- `quorum`   witness quorum policy files (C2SP tlog-policy style), shared with nodes;
- `proof`    offline C2SP tlog-proof bundles: export and verify;
- `state`    the state file and the evidence kept of refused checkpoints.
"""

from valise.audit.findings import Finding
from valise.audit.quorum import QuorumPolicy
from valise.audit.verify import AuditState, CheckpointRefused, Report, audit

__all__ = ["AuditState", "CheckpointRefused", "Finding", "QuorumPolicy", "Report", "audit"]
