"""The tree side of an audit: compact ranges, hash tiles as a HashReader, and naming the entry that differs.

Everything here reads through a `TileSource` and trusts nothing it reads until it is tied to a verified
checkpoint root: a compact range extended with leaf hashes must reach the checkpoint's root, and a consistency
proof assembled from hash tiles must verify between two signed roots.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from valise.audit.findings import Finding
from valise.audit.source import TileSource
from valise.errors import TileError
from valise.tlog import merkle, tiles

_sha256 = hashlib.sha256
_ZERO = bytes(32)


class Compact:
    """A compact range [0, size): one hash per complete subtree (RFC 6962), saved in the audit state."""

    __slots__ = ("size", "stack")

    def __init__(self, size: int = 0, stack: Sequence[bytes] = ()) -> None:
        if len(stack) != bin(size).count("1") or any(len(h) != 32 for h in stack):
            raise TileError(f"a compact range of size {size} needs {bin(size).count('1')} hashes of 32 bytes")
        self.size = size
        self.stack = list(stack)

    def copy(self) -> Compact:
        return Compact(self.size, self.stack)

    def extend(self, leaf_hashes: Sequence[bytes]) -> None:
        stack = self.stack
        n = self.size
        for h in leaf_hashes:
            m = n
            while m & 1:
                h = _sha256(b"\x01" + stack.pop() + h).digest()
                m >>= 1
            stack.append(h)
            n += 1
        self.size = n

    def root(self) -> bytes:
        if not self.stack:
            return merkle.EMPTY_ROOT
        h = self.stack[-1]
        for left in reversed(self.stack[:-1]):
            h = _sha256(b"\x01" + left + h).digest()
        return h


@dataclass(frozen=True, slots=True)
class Bundle:
    """Entries [first, first + len(entries)) as served, and the level-0 hashes the tile says they have."""

    first: int
    entries: list[bytes]
    hashes: list[bytes]  # from the level-0 tile, the same positions
    problem: str | None  # the bundle did not parse as exactly its width


def _fetch(source: TileSource, tile: tiles.Tile) -> bytes:
    data = source.read(tile.path)
    if data is None:
        raise TileError(f"{tile.path} is missing from {source.describe()}")
    return data


def bundles(source: TileSource, start: int, size: int, *, with_entries: bool = True) -> Iterator[Bundle]:
    """The entries [start, size) with their tile hashes, one entry bundle at a time (with `with_entries` False, the
    hashes only: the public hash tiles suffice to check the tree, and a broker serves entry bundles only to
    auditors).

    A bundle that does not parse as exactly its width is read leniently (as many entries as it holds) and
    flagged, so that the auditor can still say which index went missing.
    """
    n = start // tiles.WIDTH
    while n * tiles.WIDTH < size:
        width = min(tiles.WIDTH, size - n * tiles.WIDTH)
        skip = max(0, start - n * tiles.WIDTH)
        hashes = tiles.split_tile(_fetch(source, tiles.Tile(0, n, width)), width)
        if not with_entries:
            yield Bundle(n * tiles.WIDTH + skip, [], hashes[skip:], None)
            n += 1
            continue
        data = _fetch(source, tiles.Tile(tiles.ENTRIES, n, width))
        problem = None
        try:
            entries = tiles.parse_entries(data, width)
        except TileError as exc:
            entries, problem = _lenient(data), exc.what
        yield Bundle(n * tiles.WIDTH + skip, entries[skip:], hashes[skip:], problem)
        n += 1


def _lenient(data: bytes) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    while pos + 2 <= len(data) and len(out) < tiles.WIDTH + 1:
        size = int.from_bytes(data[pos : pos + 2], "big")
        out.append(data[pos + 2 : pos + 2 + size])
        pos += 2 + size
    return out


def leaf_hashes(entries: Sequence[bytes], width: int) -> list[bytes]:
    """Leaf hashes of `entries`, padded (or cut) to `width` with a hash no entry has, for a malformed bundle."""
    out = [_sha256(b"\x00" + e).digest() for e in entries[:width]]
    out.extend([_ZERO] * (width - len(out)))
    return out


def name_differences(first: int, leaves: Sequence[bytes], signed: Sequence[bytes]) -> list[Finding]:
    """Name the entries whose leaf hash is not the signed one: altered, missing (later ones shifted) or swapped.

    `signed` are hashes already tied to a verified root; `leaves` are hashes of the entries as served.
    """
    findings: list[Finding] = []
    where = {h: i for i, h in enumerate(signed)}
    i = 0
    reported: set[int] = set()
    while i < len(signed):
        if leaves[i] == signed[i] or i in reported:
            i += 1
            continue
        j = where.get(leaves[i])
        if j is not None and j > i and leaves[j] == signed[i]:
            findings.append(Finding(first + i, "entries-swapped", f"entries {first + i} and {first + j} are swapped"))
            reported.add(j)
            i += 1
            continue
        if j == i + 1:  # what is served at i is the signed i+1: entry i is gone and the rest moved up
            k = i
            while k + 1 < len(signed) and leaves[k] == signed[k + 1]:
                k += 1
            findings.append(
                Finding(first + i, "entry-missing", f"entry {first + i} is missing; entries after it moved up by one")
            )
            i = k + 1
            continue
        findings.append(Finding(first + i, "entry-altered", f"entry {first + i} does not hash to leaf {first + i}"))
        i += 1
    return findings


class TileHashes:
    """A merkle.HashReader over the hash tiles of a tree of `size` (what tlog-tiles clients build proofs from).

    A stored hash at tree level l, 8·L <= l < 8·(L+1), is the root of 2^(l - 8L) consecutive hashes of tile
    level L; tiles are fetched at the width they have in the tree of `size`, and cached.
    """

    def __init__(self, source: TileSource, size: int) -> None:
        self.source = source
        self.size = size
        self.cache: dict[tuple[int, int], list[bytes]] = {}

    def _tile(self, level: int, n: int) -> list[bytes]:
        got = self.cache.get((level, n))
        if got is None:
            count = self.size >> (tiles.HEIGHT * level)  # hashes at tree level 8·level
            width = min(tiles.WIDTH, count - n * tiles.WIDTH)
            if width <= 0:
                raise TileError(f"tile {level}/{n} is beyond a tree of {self.size}")
            got = tiles.split_tile(_fetch(self.source, tiles.Tile(level, n, width)), width)
            self.cache[(level, n)] = got
        return got

    def hash_at(self, level: int, n: int) -> bytes:
        tile_level, sub = divmod(level, tiles.HEIGHT)
        lo = n << sub
        hi = (n + 1) << sub
        t = lo >> tiles.HEIGHT
        hashes = self._tile(tile_level, t)[lo - t * tiles.WIDTH : hi - t * tiles.WIDTH]
        if len(hashes) != hi - lo:
            raise TileError(f"tree hash ({level}, {n}) is not complete in a tree of {self.size}")
        while len(hashes) > 1:
            hashes = [_sha256(b"\x01" + hashes[i] + hashes[i + 1]).digest() for i in range(0, len(hashes), 2)]
        return hashes[0]

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        return [self.hash_at(*merkle.split_stored_hash_index(i)) for i in indexes]


def consistency_proof(source: TileSource, old: int, new: int) -> list[bytes]:
    """The RFC 9162 consistency proof from `old` to `new`, assembled from the hash tiles of the tree of `new`."""
    return merkle.consistency_proof(old, new, TileHashes(source, new))


def inclusion_proof(source: TileSource, index: int, size: int) -> list[bytes]:
    return merkle.inclusion_proof(index, size, TileHashes(source, size))
