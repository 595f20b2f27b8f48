"""Write the log's C2SP tlog-tiles read side to a directory, and check such a directory end to end.

`export_tiles` writes every tile of a signed tree, then the checkpoint itself last (atomically), so a static web
server serving the directory never serves a checkpoint whose tiles are missing. Full tiles never change: one
already present is compared, not rewritten, so re-exporting costs only the new tiles, and a directory holding a
different log is refused rather than overwritten.

`verify_export` is what a mirror or auditor does with such a directory: check the checkpoint's signature, hash
every entry against its level-0 tile, check each higher tile against the level below, and recompute the root
of the checkpoint's tree from the tiles.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from valise.errors import CheckpointError, NoteError, ProofError, StoreError, TileError, UsageError
from valise.tlog import checkpoint, merkle, note, tiles

# The largest file a tile path can hold: a full entry bundle of maximal entries.
MAX_TILE_FILE = tiles.WIDTH * (2 + tiles.MAX_ENTRY_SIZE)


@dataclass(frozen=True, slots=True)
class Exported:
    size: int
    written: int  # files written (unchanged full tiles are compared, not rewritten)


def all_tiles(size: int) -> list[tiles.Tile]:
    """Hash tiles of every level, then the entry bundles, of a tree of `size` entries."""
    return tiles.tiles_for_size(size) + tiles.entry_tiles_for_size(size)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_tiles(out: Path, signed: bytes, tile: Callable[[tiles.Tile], bytes], *, origin: str) -> Exported:
    """Write the tiles of the tree that checkpoint note `signed` names (read through `tile`), then `signed`."""
    size = checkpoint.parse_body(note.parse_note(signed).text).size
    old = out / "checkpoint"
    if old.is_file():
        try:
            held = checkpoint.parse_body(note.parse_note(old.read_bytes()).text)
        except (CheckpointError, NoteError) as exc:
            raise UsageError(f"{out} holds something else than a checkpoint: {exc.what}") from None
        if held.origin != origin:
            raise UsageError(f"{out} holds the log of another origin ({held.origin[:80]!r})")
        if held.size > size:
            raise UsageError(f"{out} holds a larger tree ({held.size} entries) than this log's ({size})")
    written = 0
    for t in all_tiles(size):
        path = out / t.path
        data = tile(t)
        if t.width == tiles.WIDTH and path.is_file():
            if path.read_bytes() != data:
                raise UsageError(f"{path} differs from this log's tile; {out} holds another log")
            continue
        _write_atomic(path, data)
        written += 1
    _write_atomic(old, signed)
    return Exported(size, written + 1)


class _TileHashes:
    """A HashReader over checked tiles: levels 8·L come from tiles, the levels between are recomputed."""

    def __init__(self, levels: list[list[bytes]]) -> None:
        self.levels = levels  # levels[L] = every hash at tree level 8·L, in order

    def hash_at(self, level: int, n: int) -> bytes:
        if level % tiles.HEIGHT == 0:
            return self.levels[level // tiles.HEIGHT][n]
        return merkle.hash_children(self.hash_at(level - 1, 2 * n), self.hash_at(level - 1, 2 * n + 1))

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        return [self.hash_at(*merkle.split_stored_hash_index(i)) for i in indexes]


def _subtree_root(hashes: list[bytes]) -> bytes:
    sha = hashlib.sha256
    while len(hashes) > 1:
        hashes = [sha(b"\x01" + hashes[i] + hashes[i + 1]).digest() for i in range(0, len(hashes), 2)]
    return hashes[0]


def _read(directory: Path, t: tiles.Tile) -> bytes:
    try:
        with (directory / t.path).open("rb") as f:
            data = f.read(MAX_TILE_FILE + 1)
    except OSError as exc:
        raise StoreError(f"cannot read {t.path}: {exc.strerror}") from None
    return data


def verify_export(directory: Path, log: note.Verifier, *, origin: str | None = None) -> checkpoint.Checkpoint:
    """Check a tiles directory against its checkpoint signed by `log`; return the checkpoint.

    Raises ProofError (TileError) if an entry, a tile or the root disagrees, StoreError if a file is missing.
    """
    try:
        raw = (directory / "checkpoint").read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {directory / 'checkpoint'}: {exc.strerror}") from None
    cp, _ = checkpoint.open_checkpoint(raw, log, origin=origin)
    sha = hashlib.sha256
    levels: list[list[bytes]] = [[]]
    for bundle in tiles.entry_tiles_for_size(cp.size):
        leaves = [sha(b"\x00" + e).digest() for e in tiles.parse_entries(_read(directory, bundle), bundle.width)]
        hash_tile = tiles.Tile(0, bundle.n, bundle.width)
        if b"".join(leaves) != _read(directory, hash_tile):
            raise TileError(f"the entries of {bundle.path} do not hash to {hash_tile.path}")
        levels[0].extend(leaves)
    hash_tiles = tiles.tiles_for_size(cp.size)
    level = 0
    while len(levels[level]) >= tiles.WIDTH:
        below = levels[level]
        above = [_subtree_root(below[i : i + tiles.WIDTH]) for i in range(0, len(below) - tiles.WIDTH + 1, tiles.WIDTH)]
        stored = b"".join(_read(directory, t) for t in hash_tiles if t.level == level + 1)
        if b"".join(above) != stored:
            raise TileError(f"the level {level + 1} tiles do not match the level {level} tiles below them")
        levels.append(above)
        level += 1
    if merkle.tree_hash(cp.size, _TileHashes(levels)) != cp.root:
        raise ProofError(f"the tiles' root hash does not match the checkpoint of size {cp.size}")
    return cp
