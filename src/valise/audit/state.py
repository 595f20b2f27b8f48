"""The audit state file and the evidence directory (the audit's only writes; specs/audit.md, "State file").

The state is one JSON document, replaced atomically (write a temporary file, fsync, rename, fsync the
directory), so a crash leaves either the old state or the new one, never a torn file. A refused checkpoint
that the log key signed is kept next to it, in `<state>.evidence/`, together with the checkpoint held at the
time: two validly signed checkpoints that are not consistent are a portable proof that the log forked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from valise.audit.verify import AuditState
from valise.errors import Error, StoreError, UsageError
from valise.tlog import checkpoint, note

MAX_STATE = 1 << 30


def load(path: Path, log: note.Ed25519Verifier) -> AuditState | None:
    """The saved state, or None if `path` does not exist yet."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_STATE:
        raise UsageError(f"{path} is larger than any audit state should be")
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past the stack
        raise UsageError(f"cannot read the audit state {path}: {type(exc).__name__}: {exc}") from None
    try:
        return AuditState.from_json(value, log)
    except (Error, KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
        # A state file is the auditor's own, but a damaged or altered one must stop it with this, not a traceback.
        raise UsageError(f"{path} is not a valid audit state: {type(exc).__name__}: {exc}") from None


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from None


def save(path: Path, state: AuditState) -> None:
    write_atomic(path, json.dumps(state.to_json(), separators=(",", ":"), sort_keys=True).encode())


def keep_evidence(path: Path, refused: bytes, held: bytes | None) -> Path:
    """Store a refused (validly signed) checkpoint and the one held then; return the evidence directory."""
    directory = path.with_name(path.name + ".evidence")
    cp = checkpoint.parse_body(note.parse_note(refused).text)
    name = f"{cp.size}-{cp.root.hex()[:16]}"
    write_atomic(directory / f"{name}.refused", refused)
    if held is not None:
        write_atomic(directory / f"{name}.held", held)
    return directory
