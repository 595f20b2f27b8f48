"""Write the log's C2SP tlog-tiles read side to a directory, and recompute a root from such a directory.

`export_tiles` writes every tile of the latest signed checkpoint, then the checkpoint itself last (atomically),
so a static web server serving the directory never serves a checkpoint whose tiles are missing. Full tiles
never change: one already present is compared, not rewritten, so re-exporting costs only the new tiles, and a
directory holding a different log is refused rather than overwritten.

`verify_export` is what a mirror or auditor does with such a directory: check the checkpoint's signature, hash
every entry, check each hash tile against the level below, and recompute the root of the checkpoint's tree.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from valise.errors import CheckpointError, NoteError, ProofError, StoreError, UsageError
from valise.store.layout import TILE_HEIGHT, TILE_WIDTH, Tile, parse_entry_bundle, tiles_for_size
from valise.tlog import merkle, note

MAX_TILE_FILE = TILE_WIDTH * (2 + 65535)


@dataclass(frozen=True, slots=True)
class Exported:
    size: int
    root: bytes
    written: int  # files written (unchanged full tiles are not rewritten)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_tiles(
    out: Path, size: int, root: bytes, checkpoint: bytes, tile: Callable[[Tile], bytes], *, origin: str
) -> Exported:
    """Write the tiles of the tree of `size` entries (read through `tile`) and `checkpoint` under `out`."""
    old = out / "checkpoint"
    if old.is_file():
        try:
            old_size, _ = parse_checkpoint(note.parse_note(old.read_bytes()).text, origin)
        except (CheckpointError, NoteError) as exc:
            raise UsageError(f"{out} holds something else than a checkpoint of {origin}: {exc.what}") from None
        if old_size > size:
            raise UsageError(f"{out} holds a larger tree ({old_size} entries) than this log ({size})")
    written = 0
    for t in tiles_for_size(size):
        path = out / t.path()
        data = tile(t)
        if t.width == TILE_WIDTH and path.is_file():
            if path.read_bytes() != data:
                raise UsageError(f"{path} differs from this log's tile; {out} holds another log")
            continue
        _write_atomic(path, data)
        written += 1
    _write_atomic(old, checkpoint)
    return Exported(size, root, written + 1)


def read_checkpoint(directory: Path, origin: str, verifier: note.Verifier) -> tuple[int, bytes]:
    """Read and verify `directory/checkpoint`; return (size, root)."""
    path = directory / "checkpoint"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    return parse_checkpoint(note.open_note(raw, [verifier]).text, origin)


def parse_checkpoint(text: str, origin: str) -> tuple[int, bytes]:
    """The (size, root) of a C2SP tlog-checkpoint body for `origin` (extension lines are allowed)."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise CheckpointError("malformed checkpoint: fewer than three lines")
    if lines[0] != origin:
        raise CheckpointError(f"checkpoint origin {lines[0][:80]!r} is not {origin!r}")
    digits = lines[1]
    if not digits.isascii() or not digits.isdigit() or (len(digits) > 1 and digits[0] == "0") or len(digits) > 19:
        raise CheckpointError("malformed checkpoint: invalid log size")
    root = note.b64decode_strict(lines[2], "checkpoint root hash")
    if len(root) != merkle.HASH_SIZE:
        raise CheckpointError(f"malformed checkpoint: root hash is {len(root)} bytes")
    return int(digits), root


class _TileHashes:
    """A HashReader over verified tiles: levels 8·L come from tiles, the levels between are recomputed."""

    def __init__(self, levels: list[list[bytes]]) -> None:
        self.levels = levels  # levels[L] = every hash at Merkle level 8·L, in order

    def hash_at(self, level: int, n: int) -> bytes:
        if level % TILE_HEIGHT == 0:
            return self.levels[level // TILE_HEIGHT][n]
        return merkle.hash_children(self.hash_at(level - 1, 2 * n), self.hash_at(level - 1, 2 * n + 1))

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        return [self.hash_at(*merkle.split_stored_hash_index(i)) for i in indexes]


def _subtree_root(hashes: list[bytes]) -> bytes:
    sha = hashlib.sha256
    while len(hashes) > 1:
        hashes = [sha(b"\x01" + hashes[i] + hashes[i + 1]).digest() for i in range(0, len(hashes), 2)]
    return hashes[0]


def _read_tile(directory: Path, t: Tile) -> bytes:
    path = directory / t.path()
    try:
        with path.open("rb") as f:
            data = f.read(MAX_TILE_FILE + 1)
    except OSError as exc:
        raise StoreError(f"cannot read {t.path()}: {exc.strerror}") from None
    if not t.entries and len(data) != merkle.HASH_SIZE * t.width:
        raise ProofError(f"{t.path()} is {len(data)} bytes, expected {merkle.HASH_SIZE * t.width}")
    return data


def verify_export(directory: Path, origin: str, verifier: note.Verifier) -> tuple[int, bytes]:
    """Check a tiles directory end to end against its signed checkpoint; return (size, root).

    Raises ProofError if an entry, a tile or the root disagrees, StoreError if a file is missing.
    """
    size, root = read_checkpoint(directory, origin, verifier)
    sha = hashlib.sha256
    tiles = tiles_for_size(size)
    levels: list[list[bytes]] = [[]]
    for t in tiles:
        if not t.entries:
            continue
        entries = parse_entry_bundle(_read_tile(directory, t), t.width)
        leaves = [sha(b"\x00" + e).digest() for e in entries]
        hash_tile = Tile(0, t.index, t.width)
        if b"".join(leaves) != _read_tile(directory, hash_tile):
            raise ProofError(f"the entries of {t.path()} do not hash to {hash_tile.path()}")
        levels[0].extend(leaves)
    level = 0
    while len(levels[level]) >= TILE_WIDTH:
        below = levels[level]
        above = [_subtree_root(below[i : i + TILE_WIDTH]) for i in range(0, len(below) - TILE_WIDTH + 1, TILE_WIDTH)]
        stored = b"".join(_read_tile(directory, t) for t in tiles if t.level == level + 1 and not t.entries)
        if b"".join(above) != stored:
            raise ProofError(f"the level {level + 1} tiles do not match the level {level} tiles below them")
        levels.append(above)
        level += 1
    got = merkle.tree_hash(size, _TileHashes(levels))
    if got != root:
        raise ProofError(f"the tiles' root hash does not match the checkpoint of size {size}")
    return size, root
