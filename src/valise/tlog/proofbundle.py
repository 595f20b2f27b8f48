"""Offline proof bundles in the C2SP tlog-proof format (https://c2sp.org/tlog-proof) (pure: no I/O).

    c2sp.org/tlog-proof@v1\\n
    [extra <base64 opaque data>\\n]
    index <decimal, no leading zeros>\\n
    <base64 inclusion proof hash>\\n ...   (leaf's sibling first, up to the root's child)
    \\n
    <the (co)signed checkpoint note, verbatim>

A holder checks it with nothing but the log's verifier key (and witness keys): the checkpoint's signatures,
then the inclusion of the entry's leaf hash at `index` under the checkpoint's root. The extra data is not
authenticated; callers must not trust it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from valise.errors import NoteError, ProofError
from valise.tlog import merkle, note
from valise.tlog.checkpoint import Checkpoint, open_checkpoint

HEADER = "c2sp.org/tlog-proof@v1"
# A proof has at most 63 hashes; the note is capped separately. Extra data is for small context only.
MAX_EXTRA = 4096
MAX_BUNDLE_SIZE = note.MAX_NOTE_SIZE + MAX_EXTRA * 2 + 64 * 46


@dataclass(frozen=True, slots=True)
class ProofBundle:
    index: int
    proof: tuple[bytes, ...]
    checkpoint_note: bytes
    extra: bytes | None = None

    def to_bytes(self) -> bytes:
        lines = [HEADER]
        if self.extra is not None:
            if not self.extra or len(self.extra) > MAX_EXTRA:
                raise ProofError(f"proof bundle extra data must be 1 to {MAX_EXTRA} bytes")
            lines.append("extra " + note.b64(self.extra))
        lines.append(f"index {self.index}")
        for h in self.proof:
            if len(h) != merkle.HASH_SIZE:
                raise ProofError(f"proof bundle hash is {len(h)} bytes, expected {merkle.HASH_SIZE}")
            lines.append(note.b64(h))
        out = ("\n".join(lines) + "\n\n").encode("ascii") + self.checkpoint_note
        parse(out)  # what we write, we can read
        return out


def parse(data: bytes) -> ProofBundle:
    """Split a proof bundle strictly (no signature or proof checks: see `verify`)."""
    if len(data) > MAX_BUNDLE_SIZE:
        raise ProofError(f"proof bundle is {len(data)} bytes, over the limit of {MAX_BUNDLE_SIZE}")
    head, sep, checkpoint_note = data.partition(b"\n\n")
    if not sep:
        raise ProofError("proof bundle has no blank line before its checkpoint")
    try:
        lines = head.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise ProofError("proof bundle header is not ASCII") from None
    if lines[0] != HEADER:
        raise ProofError(f"proof bundle does not start with {HEADER}")
    pos = 1
    extra = None
    if pos < len(lines) and lines[pos].startswith("extra "):
        extra = _b64(lines[pos][len("extra ") :], "proof bundle extra data")
        if not extra or len(extra) > MAX_EXTRA:
            raise ProofError(f"proof bundle extra data must be 1 to {MAX_EXTRA} bytes")
        pos += 1
    if pos >= len(lines) or not lines[pos].startswith("index "):
        raise ProofError("proof bundle lacks its 'index' line")
    digits = lines[pos][len("index ") :]
    if not digits.isdigit() or len(digits) > 19 or digits != str(int(digits)) or int(digits) > merkle.MAX_TREE_SIZE:
        raise ProofError(f"proof bundle index {digits[:24]!r} is not a decimal number without leading zeros")
    hash_lines = lines[pos + 1 :]
    if len(hash_lines) > 63:
        raise ProofError(f"proof bundle has {len(hash_lines)} proof hashes, more than any tree needs")
    proof = tuple(_b64(line, f"proof bundle hash {i}") for i, line in enumerate(hash_lines))
    for i, h in enumerate(proof):
        if len(h) != merkle.HASH_SIZE:
            raise ProofError(f"proof bundle hash {i} is {len(h)} bytes, expected {merkle.HASH_SIZE}")
    return ProofBundle(int(digits), proof, checkpoint_note, extra)


def _b64(text: str, what: str) -> bytes:
    try:
        return note.b64decode_strict(text, what)
    except NoteError as exc:
        raise ProofError(exc.what) from None


def create(index: int, proof: Sequence[bytes], checkpoint_note: bytes, extra: bytes | None = None) -> bytes:
    """A proof bundle for the entry at `index`, given its inclusion proof under the checkpoint note's tree."""
    return ProofBundle(index, tuple(proof), checkpoint_note, extra).to_bytes()


def verify(
    data: bytes,
    leaf_hash: bytes,
    log: note.Verifier,
    *,
    origin: str | None = None,
    witnesses: Sequence[note.Verifier] = (),
    quorum: int = 0,
) -> tuple[ProofBundle, Checkpoint]:
    """Check a proof bundle for the entry whose leaf hash is `leaf_hash` (merkle.hash_leaf of its bytes).

    Raises NoteError/CheckpointError for the checkpoint and its signatures, ProofError for the inclusion.
    """
    bundle = parse(data)
    checkpoint, _ = open_checkpoint(bundle.checkpoint_note, log, origin=origin, witnesses=witnesses, quorum=quorum)
    merkle.verify_inclusion(leaf_hash, bundle.index, checkpoint.size, bundle.proof, checkpoint.root)
    return bundle, checkpoint
