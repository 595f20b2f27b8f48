"""The C2SP tlog-tiles layout (https://c2sp.org/tlog-tiles), tile height 8 (pure: no I/O).

Tile (L, N) holds the stored hashes at tree level 8·L with indexes N·256 ... N·256 + W − 1: at level 0 the
leaf hashes, above that the root of each full tile of the level below. A tile is *full* at W = 256 (8192 bytes)
and *partial* (`.p/<W>`, 1 <= W <= 255) at the right edge of the tree. Entry bundle N holds the entries whose
leaf hashes are level-0 tile N, each as a big-endian uint16 length then the bytes.

Paths: `tile/<L>/<N>[.p/<W>]` and `tile/entries/<N>[.p/<W>]`, N written as three-digit groups, all but the last
prefixed by "x" (1234067 -> x001/x234/067). Parsing accepts only that one form.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from valise.errors import TileError
from valise.tlog import merkle

HEIGHT = 8
WIDTH = 1 << HEIGHT
HASH_SIZE = merkle.HASH_SIZE
FULL_TILE_SIZE = WIDTH * HASH_SIZE
MAX_ENTRY_SIZE = 0xFFFF
MAX_LEVEL = 63
# Paths name N as decimal; anything beyond a 2^63 tree has no meaning.
_MAX_N = merkle.MAX_TREE_SIZE >> HEIGHT
ENTRIES = -1  # the `level` of an entry bundle in a Tile


@dataclass(frozen=True, slots=True, order=True)
class Tile:
    """Tile coordinates: `level` (or ENTRIES for an entry bundle), index `n`, and `width` (256 when full)."""

    level: int
    n: int
    width: int = WIDTH

    def __post_init__(self) -> None:
        if not (self.level == ENTRIES or 0 <= self.level <= MAX_LEVEL):
            raise TileError(f"tile level {self.level} is not in 0..{MAX_LEVEL}")
        if not 0 <= self.n <= _MAX_N:
            raise TileError(f"tile index {self.n} is out of range")
        if not 1 <= self.width <= WIDTH:
            raise TileError(f"tile width {self.width} is not in 1..{WIDTH}")

    @property
    def path(self) -> str:
        level = "entries" if self.level == ENTRIES else str(self.level)
        suffix = "" if self.width == WIDTH else f".p/{self.width}"
        return f"tile/{level}/{format_index(self.n)}{suffix}"

    def hash_indexes(self) -> list[int]:
        """Stored-hash indexes (merkle.stored_hash_index) of the hashes in this tile (a level-0 tile for entries)."""
        level = 0 if self.level == ENTRIES else HEIGHT * self.level
        start = self.n * WIDTH
        return [merkle.stored_hash_index(level, start + i) for i in range(self.width)]


def format_index(n: int) -> str:
    """1234067 -> "x001/x234/067"; 5 -> "005"."""
    groups = []
    while True:
        groups.append(f"{n % 1000:03d}")
        n //= 1000
        if n == 0:
            break
    groups.reverse()
    return "/".join(["x" + g for g in groups[:-1]] + groups[-1:])


def parse_path(path: str) -> Tile:
    """The tile a `tile/...` path names, accepting only the canonical form."""
    if len(path) > 128 or not path.isascii():
        raise TileError("tile path is too long or not ASCII")
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise TileError(f"{path!r} is not a tile path")
    if parts[1] == "entries":
        level = ENTRIES
    elif parts[1].isdigit() and parts[1] == str(int(parts[1])):
        level = int(parts[1])
    else:
        raise TileError(f"tile path {path!r} has a bad level")
    rest = parts[2:]
    width = WIDTH
    if len(rest) >= 2 and rest[-2].endswith(".p"):
        w = rest[-1]
        if not (w.isdigit() and w == str(int(w)) and 1 <= int(w) < WIDTH):
            raise TileError(f"tile path {path!r} has a bad partial width")
        width = int(w)
        rest = [*rest[:-2], rest[-2][:-2]]
    n = 0
    for i, group in enumerate(rest):
        digits = group[1:] if i < len(rest) - 1 and group.startswith("x") else group
        if (i < len(rest) - 1) != group.startswith("x") or len(digits) != 3 or not digits.isdigit():
            raise TileError(f"tile path {path!r} has a bad index element {group!r}")
        n = n * 1000 + int(digits)
    tile = Tile(level, n, width)
    if tile.path != path:  # e.g. "x000/005": a leading zero group
        raise TileError(f"tile path {path!r} is not in canonical form")
    return tile


def tiles_for_size(size: int) -> list[Tile]:
    """Every hash tile of a tree of `size` leaves (full ones, then each level's partial one), level by level."""
    return list(_tiles(0, size))


def new_tiles(old_size: int, new_size: int) -> list[Tile]:
    """The hash tiles a tree of `new_size` has that one of `old_size` lacks (new or wider): what to export."""
    return list(_tiles(old_size, new_size))


def _tiles(old_size: int, new_size: int) -> Iterator[Tile]:
    if not 0 <= old_size <= new_size <= merkle.MAX_TREE_SIZE:
        raise TileError(f"tree sizes {old_size} -> {new_size} are not in order")
    level = 0
    while new_size >> (HEIGHT * level):
        old = old_size >> (HEIGHT * level)
        new = new_size >> (HEIGHT * level)
        for n in range(old >> HEIGHT, (new >> HEIGHT) + 1):
            width = min(WIDTH, new - n * WIDTH)
            if width <= 0:
                break
            if n == old >> HEIGHT and width == old - n * WIDTH:
                continue  # unchanged since the old size
            yield Tile(level, n, width)
        level += 1


def entry_tiles_for_size(size: int) -> list[Tile]:
    """The entry bundles of a tree of `size` leaves."""
    return [Tile(ENTRIES, t.n, t.width) for t in tiles_for_size(size) if t.level == 0]


# --- contents ------------------------------------------------------------------------------------------


def read_tile(tile: Tile, reader: merkle.HashReader) -> bytes:
    """A hash tile's bytes, from a store's stored hashes."""
    if tile.level == ENTRIES:
        raise TileError("entry bundles are not hash tiles")
    hashes = reader.read_hashes(tile.hash_indexes())
    if len(hashes) != tile.width:
        raise TileError(f"hash reader returned {len(hashes)} hashes for a tile of width {tile.width}")
    return b"".join(hashes)


def split_tile(data: bytes, width: int) -> list[bytes]:
    """The hashes of a tile of `width`; the length must be exact."""
    if len(data) != width * HASH_SIZE:
        raise TileError(f"tile is {len(data)} bytes, expected {width * HASH_SIZE} for width {width}")
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def encode_entries(entries: Iterable[bytes]) -> bytes:
    """An entry bundle: each entry as uint16 big-endian length ‖ bytes."""
    out = bytearray()
    count = 0
    for entry in entries:
        if len(entry) > MAX_ENTRY_SIZE:
            raise TileError(f"log entry is {len(entry)} bytes, over the tlog-tiles limit of {MAX_ENTRY_SIZE}")
        out += len(entry).to_bytes(2, "big")
        out += entry
        count += 1
    if count > WIDTH:
        raise TileError(f"entry bundle has {count} entries, over {WIDTH}")
    return bytes(out)


def parse_entries(data: bytes, width: int) -> list[bytes]:
    """Exactly `width` entries, no trailing bytes."""
    if not 1 <= width <= WIDTH:
        raise TileError(f"entry bundle width {width} is not in 1..{WIDTH}")
    if len(data) > WIDTH * (2 + MAX_ENTRY_SIZE):
        raise TileError(f"entry bundle is {len(data)} bytes, over the largest possible bundle")
    entries = []
    pos = 0
    end = len(data)
    for i in range(width):
        if pos + 2 > end:
            raise TileError(f"entry bundle ends before entry {i} of {width}")
        size = (data[pos] << 8) | data[pos + 1]
        pos += 2
        if pos + size > end:
            raise TileError(f"entry bundle entry {i} claims {size} bytes, past the end")
        entries.append(data[pos : pos + size])
        pos += size
    if pos != end:
        raise TileError(f"entry bundle has {end - pos} bytes after its {width} entries")
    return entries


# --- audit: recompute the root from exported tiles -----------------------------------------------------


def _level0_widths(size: int) -> Iterator[int]:
    for _ in range(size >> HEIGHT):
        yield WIDTH
    if size % WIDTH:
        yield size % WIDTH


def root_from_level0_tiles(size: int, tiles: Iterable[bytes]) -> bytes:
    """The root of a tree of `size` leaves from its level-0 tiles in order (full ones, then the partial one).

    An auditor compares the result with a verified checkpoint's root: equal means every leaf hash is right.
    """
    acc = merkle.CompactRange()
    it = iter(tiles)
    for i, width in enumerate(_level0_widths(size)):
        data = next(it, None)
        if data is None:
            raise TileError(f"level-0 tile {i} is missing for a tree of size {size}")
        acc.extend(split_tile(data, width))
    if next(it, None) is not None:
        raise TileError(f"more level-0 tiles than a tree of size {size} has")
    return acc.root()


def root_from_entry_bundles(size: int, bundles: Iterable[bytes]) -> bytes:
    """The root of a tree of `size` leaves from its entry bundles in order (each entry hashed as a leaf)."""
    acc = merkle.CompactRange()
    leaf = merkle.hash_leaf
    it = iter(bundles)
    for i, width in enumerate(_level0_widths(size)):
        data = next(it, None)
        if data is None:
            raise TileError(f"entry bundle {i} is missing for a tree of size {size}")
        acc.extend([leaf(e) for e in parse_entries(data, width)])
    if next(it, None) is not None:
        raise TileError(f"more entry bundles than a tree of size {size} has")
    return acc.root()
