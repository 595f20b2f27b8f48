"""C2SP tlog-checkpoint bodies (https://c2sp.org/tlog-checkpoint), signed as notes (pure: no I/O).

    <origin>\\n
    <tree size, ASCII decimal, no leading zeros, no sign>\\n
    <base64 of the 32-byte RFC 6962 root hash>\\n
    [<non-empty extension line>\\n]...

`open_checkpoint` accepts a checkpoint only if the log's own key signed it and the body parses strictly;
`check_newer` is the rule every client applies before replacing a checkpoint it holds (never go backwards,
never accept a fork): same origin, size not smaller, and a consistency proof from the old tree to the new one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from valise.errors import CheckpointError, NoteError, ProofError
from valise.tlog import merkle, note

MAX_EXTENSIONS = 16
_MAX_SIZE_DIGITS = 19  # 2^63 - 1 has 19 digits


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A checkpoint object is always formattable and re-parses to itself.
        _check_origin(self.origin)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 0 <= self.size <= merkle.MAX_TREE_SIZE:
            raise CheckpointError(f"checkpoint tree size {self.size!r} is not in [0, 2^63)")
        if len(self.root) != merkle.HASH_SIZE:
            raise CheckpointError(f"checkpoint root hash is {len(self.root)} bytes, expected {merkle.HASH_SIZE}")
        if len(self.extensions) > MAX_EXTENSIONS:
            raise CheckpointError(f"checkpoint has {len(self.extensions)} extension lines, over {MAX_EXTENSIONS}")
        for ext in self.extensions:
            if not ext or "\n" in ext:
                raise CheckpointError("checkpoint extension lines must be non-empty single lines")

    def body(self) -> str:
        """The note text: the exact bytes a log signs and witnesses cosign."""
        lines = [self.origin, str(self.size), note.b64(self.root), *self.extensions]
        return "\n".join(lines) + "\n"


def _check_origin(origin: str) -> None:
    if not origin:
        raise CheckpointError("checkpoint origin is empty")
    if "\n" in origin or any(ord(c) < 0x20 for c in origin):
        raise CheckpointError("checkpoint origin contains a control character")


def parse_body(text: str) -> Checkpoint:
    """Parse a checkpoint note text strictly (the size in its one decimal form, the root in canonical base64)."""
    if not text.endswith("\n"):
        raise CheckpointError("checkpoint does not end in a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError("checkpoint has fewer than three lines (origin, size, root hash)")
    origin, size_text, root_text, *extensions = lines
    _check_origin(origin)
    if not (size_text.isascii() and size_text.isdigit()) or len(size_text) > _MAX_SIZE_DIGITS:
        raise CheckpointError(f"checkpoint tree size {size_text[:24]!r} is not a decimal number")
    if size_text != str(int(size_text)):
        raise CheckpointError(f"checkpoint tree size {size_text!r} has leading zeros")
    try:
        root = note.b64decode_strict(root_text, "checkpoint root hash")
    except NoteError as exc:
        raise CheckpointError(exc.what) from None
    return Checkpoint(origin, int(size_text), root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: note.Signer) -> bytes:
    """The log's signed checkpoint note."""
    return note.sign_note(checkpoint.body(), [signer])


def open_checkpoint(
    msg: bytes,
    log: note.Verifier,
    *,
    origin: str | None = None,
    witnesses: Sequence[note.Verifier] = (),
    quorum: int = 0,
) -> tuple[Checkpoint, note.Note]:
    """Verify a checkpoint note: signed by `log`, for `origin` (default: the log key's name), and cosigned by at
    least `quorum` of `witnesses`. Returns the checkpoint and the verified note (for its cosignatures)."""
    opened = note.open_note(msg, [log, *witnesses])
    log_id = (log.name, bytes(log.key_id))
    if not any((s.name, s.key_id) == log_id for s in opened.verified):
        raise NoteError(f"checkpoint is not signed by the log key {log.name}+{log.key_id.hex()}")
    checkpoint = parse_body(opened.text)
    want = log.name if origin is None else origin
    if checkpoint.origin != want:
        raise CheckpointError(f"checkpoint origin {checkpoint.origin[:80]!r} is not the expected {want!r}")
    cosigned = len(opened.verified) - 1
    if cosigned < quorum:
        raise NoteError(f"checkpoint has {cosigned} valid witness cosignatures, fewer than the quorum of {quorum}")
    return checkpoint, opened


def check_newer(old: Checkpoint, new: Checkpoint, proof: Sequence[bytes]) -> None:
    """Raise CheckpointError unless `new` extends `old`: same log, not smaller, and `proof` shows consistency.

    Equal sizes need equal roots (and an empty proof): two different roots at one size are a fork.
    """
    if new.origin != old.origin:
        raise CheckpointError(f"checkpoint origin changed from {old.origin[:80]!r} to {new.origin[:80]!r}")
    if new.size < old.size:
        raise CheckpointError(f"checkpoint goes backwards from size {old.size} to {new.size}")
    try:
        merkle.verify_consistency(old.size, new.size, proof, old.root, new.root)
    except ProofError as exc:
        raise CheckpointError(f"checkpoint of size {new.size} is not consistent with size {old.size}: {exc}") from None
