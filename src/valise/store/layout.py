"""The C2SP tlog-tiles layout: tile paths, which tiles a tree has, and entry bundles.

- `tile/<L>/<N>[.p/<W>]`: the hashes at Merkle level 8·L, numbers N·256 .. N·256+W−1, 32 bytes each;
- `tile/entries/<N>[.p/<W>]`: entries N·256 .. N·256+W−1, each a big-endian uint16 length then its bytes;
- `<N>` in 3-digit groups, all but the last prefixed with `x` (1234067 → `x001/x234/067`); `.p/<W>` only for a
  partial tile (1 ≤ W ≤ 255). Parsing accepts only that one canonical spelling of each path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from valise.errors import LimitError, UsageError
from valise.tlog import merkle

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_LEVEL = 63
_TILE_PATH = re.compile(r"tile/(entries|0|[1-9][0-9]?)/((?:x[0-9]{3}/){0,6}[0-9]{3})(?:\.p/([1-9][0-9]{0,2}))?")


@dataclass(frozen=True, slots=True)
class Tile:
    """A hash tile (`entries=False`, level L) or an entry bundle (`entries=True`, level 0)."""

    level: int
    index: int
    width: int
    entries: bool = False

    def path(self) -> str:
        head = "tile/entries" if self.entries else f"tile/{self.level}"
        tail = "" if self.width == TILE_WIDTH else f".p/{self.width}"
        return f"{head}/{format_index(self.index)}{tail}"

    @property
    def covers(self) -> int:
        """The smallest tree size that holds the whole of this tile."""
        return (self.index * TILE_WIDTH + self.width) << (TILE_HEIGHT * self.level)


def format_index(n: int) -> str:
    groups = [f"{n % 1000:03d}"]
    n //= 1000
    while n:
        groups.append(f"x{n % 1000:03d}")
        n //= 1000
    return "/".join(reversed(groups))


def parse_tile_path(path: str) -> Tile:
    """Parse a canonical tile path; raise UsageError naming what is wrong."""
    m = _TILE_PATH.fullmatch(path)
    if m is None:
        raise UsageError(f"{path[:100]!r} is not a tile path")
    kind, digits, width = m.groups()
    groups = digits.split("/")
    if len(groups) > 1 and groups[0] == "x000":
        raise UsageError(f"{path!r} is not canonical: leading zero group")
    index = int("".join(g.lstrip("x") for g in groups))
    level = 0 if kind == "entries" else int(kind)
    w = TILE_WIDTH if width is None else int(width)
    if level > MAX_LEVEL:
        raise UsageError(f"{path!r} is not a valid tile: level is over {MAX_LEVEL}")
    if width is not None and w >= TILE_WIDTH:
        raise UsageError(f"{path!r} is not a valid tile: a partial tile is narrower than {TILE_WIDTH}")
    return Tile(level, index, w, kind == "entries")


def tiles_for_size(size: int) -> list[Tile]:
    """Every tile (hash tiles of each level, then entry bundles) of a tree of `size` entries, as Go's NewTiles."""
    out: list[Tile] = []
    level = 0
    while size >> (TILE_HEIGHT * level):
        count = size >> (TILE_HEIGHT * level)
        out.extend(Tile(level, n, TILE_WIDTH) for n in range(count // TILE_WIDTH))
        if count % TILE_WIDTH:
            out.append(Tile(level, count // TILE_WIDTH, count % TILE_WIDTH))
        level += 1
    out.extend(Tile(0, n, TILE_WIDTH, True) for n in range(size // TILE_WIDTH))
    if size % TILE_WIDTH:
        out.append(Tile(0, size // TILE_WIDTH, size % TILE_WIDTH, True))
    return out


def hash_tile_indexes(tile: Tile) -> list[int]:
    """The stored-hash indexes (merkle addressing) that make up a hash tile, in order."""
    level = TILE_HEIGHT * tile.level
    base = tile.index * TILE_WIDTH
    return [merkle.stored_hash_index(level, base + i) for i in range(tile.width)]


def entry_bundle(entries: Sequence[bytes]) -> bytes:
    out = bytearray()
    for e in entries:
        if len(e) > 0xFFFF:
            raise LimitError(f"entry of {len(e)} bytes does not fit an entry bundle (limit 65535)")
        out += len(e).to_bytes(2, "big")
        out += e
    return bytes(out)


def parse_entry_bundle(data: bytes, width: int) -> list[bytes]:
    """Split an entry bundle of exactly `width` entries; refuse truncation and trailing bytes."""
    out = []
    pos = 0
    for i in range(width):
        if pos + 2 > len(data):
            raise UsageError(f"entry bundle ends before entry {i} of {width}")
        n = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        if pos + n > len(data):
            raise UsageError(f"entry {i} of the bundle is truncated")
        out.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise UsageError(f"entry bundle has {len(data) - pos} bytes after its {width} entries")
    return out
