"""The tlog-tiles layout: paths, which tiles exist, tile contents, entry bundles, root recomputation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valise.errors import ProofError, TileError
from valise.tlog import merkle, tiles
from valise.tlog.tiles import ENTRIES, Tile


def entry(i: int) -> bytes:
    return b"entry %d" % i


def tree(n: int) -> merkle.MemoryHashes:
    store = merkle.MemoryHashes()
    for i in range(n):
        store.append(merkle.hash_leaf(entry(i)))
    return store


STORE = tree(70_000)


@pytest.mark.parametrize(
    ("tile", "path"),
    [
        (Tile(0, 0), "tile/0/000"),
        (Tile(0, 1234067), "tile/0/x001/x234/067"),  # the tlog-tiles example
        (Tile(1, 5, 17), "tile/1/005.p/17"),
        (Tile(ENTRIES, 1000, 3), "tile/entries/x001/000.p/3"),
        (Tile(63, 0, 1), "tile/63/000.p/1"),
    ],
)
def test_paths_round_trip(tile: Tile, path: str) -> None:
    assert tile.path == path
    assert tiles.parse_path(path) == tile


@pytest.mark.parametrize(
    "path",
    [
        "tile/0/5", "tile/0/0005", "tile/00/000", "tile/64/000", "tile/0/x000/005", "tile/0/001/002",
        "tile/0/x001", "tile/0/000.p/256", "tile/0/000.p/0", "tile/0/000.p/05", "tile/0/000.p", "tiles/0/000",
        "tile/-1/000", "tile/0/x1/000", "tile/entries/000.p/", "tile/0/٠٠٠",
    ],
)  # fmt: skip
def test_non_canonical_paths_are_rejected(path: str) -> None:
    with pytest.raises(TileError):
        tiles.parse_path(path)


def test_tiles_for_size_follows_the_spec_examples() -> None:
    # tlog-tiles: size 70,000 is 273 full level-0 tiles, a partial of 112, one full level-1 tile, a partial of
    # 17, and a level-2 partial of 1; size 256 is a full level-0 tile and a level-1 partial of width 1.
    got = tiles.tiles_for_size(70_000)
    assert got == [*(Tile(0, n) for n in range(273)), Tile(0, 273, 112), Tile(1, 0), Tile(1, 1, 17), Tile(2, 0, 1)]
    assert tiles.tiles_for_size(256) == [Tile(0, 0), Tile(1, 0, 1)]
    assert tiles.tiles_for_size(0) == []
    assert tiles.entry_tiles_for_size(300) == [Tile(ENTRIES, 0), Tile(ENTRIES, 1, 44)]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 70_000), st.integers(0, 70_000))
def test_new_tiles_is_the_difference(a: int, b: int) -> None:
    old, new = min(a, b), max(a, b)
    assert tiles.new_tiles(old, new) == sorted(set(tiles.tiles_for_size(new)) - set(tiles.tiles_for_size(old)))


def test_tile_contents_are_the_stored_hashes() -> None:
    level0 = tiles.read_tile(Tile(0, 3), STORE)
    hashes = tiles.split_tile(level0, 256)
    assert hashes[5] == merkle.hash_leaf(entry(3 * 256 + 5))
    # Each level-1 hash is the root of a full level-0 tile.
    level1 = tiles.split_tile(tiles.read_tile(Tile(1, 0), STORE), 256)
    assert level1[3] == merkle.root_from_leaf_hashes(hashes)
    assert tiles.split_tile(tiles.read_tile(Tile(2, 0, 1), STORE), 1)[0] == merkle.tree_hash(65536, STORE)
    with pytest.raises(TileError, match="expected 8192"):
        tiles.split_tile(level0[:-1], 256)
    with pytest.raises(TileError, match="not hash tiles"):
        tiles.read_tile(Tile(ENTRIES, 0), STORE)


def test_entry_bundles() -> None:
    entries = [b"", b"a", b"\x00" * 65535]
    data = tiles.encode_entries(entries)
    assert data[:5] == b"\x00\x00\x00\x01a"
    assert tiles.parse_entries(data, 3) == entries
    with pytest.raises(TileError, match="over the tlog-tiles limit"):
        tiles.encode_entries([b"x" * 65536])
    with pytest.raises(TileError, match="after its 2 entries"):
        tiles.parse_entries(data, 2)
    with pytest.raises(TileError, match="before entry 3"):
        tiles.parse_entries(data, 4)
    with pytest.raises(TileError, match="past the end"):
        tiles.parse_entries(data[:-1], 3)
    with pytest.raises(TileError, match="width 0"):
        tiles.parse_entries(b"", 0)


@pytest.mark.parametrize("size", [1, 255, 256, 257, 1000])
def test_root_from_tiles_and_bundles(size: int) -> None:
    root = merkle.tree_hash(size, STORE)
    level0 = [tiles.read_tile(t, STORE) for t in tiles.tiles_for_size(size) if t.level == 0]
    assert tiles.root_from_level0_tiles(size, level0) == root
    bundles = [
        tiles.encode_entries(entry(t.n * 256 + i) for i in range(t.width)) for t in tiles.entry_tiles_for_size(size)
    ]
    assert tiles.root_from_entry_bundles(size, bundles) == root
    # A changed entry changes the root; a missing or surplus tile is an error.
    damaged = [bundles[0].replace(b"entry 0", b"entry X"), *bundles[1:]]
    assert tiles.root_from_entry_bundles(size, damaged) != root
    with pytest.raises(TileError, match="missing"):
        tiles.root_from_level0_tiles(size, level0[:-1])
    with pytest.raises(TileError, match="more level-0 tiles"):
        tiles.root_from_level0_tiles(size, [*level0, level0[0]])


def test_tile_error_is_a_proof_error() -> None:
    assert issubclass(TileError, ProofError)
