"""Conformance suite of the log store: every backend must pass every test here.

A new backend adds one factory to BACKENDS (and to DURABLE if its data outlives the object).
"""

from __future__ import annotations

import math
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valise.errors import LimitError, ProofError, StoreError, StoreMoved
from valise.store import MAX_ENTRY_SIZE, LogBackend, MemoryLog
from valise.store.sqlite import SqliteLog
from valise.tlog import merkle

Factory = Callable[[Path], LogBackend]

BACKENDS: dict[str, Factory] = {
    "memory": lambda _dir: MemoryLog(),
    "sqlite": lambda d: SqliteLog.open(d / "log.db"),
}
# Backends whose data survives close(): opening the same place again must give the same log.
DURABLE: dict[str, Factory] = {"sqlite": BACKENDS["sqlite"]}

# RFC 6962 reference data (certificate-transparency test vectors): the 8 leaves and the root over all of them.
RFC_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
RFC_ROOT_8 = bytes.fromhex("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogBackend]:
    s = BACKENDS[request.param](tmp_path)
    yield s
    s.close()


@pytest.fixture(params=sorted(DURABLE))
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], LogBackend]:
    return lambda: DURABLE[request.param](tmp_path)


def entry(i: int) -> bytes:
    return b"entry %d " % i + bytes([i % 251]) * (i % 50)


def reference(entries: Sequence[bytes]) -> merkle.MemoryHashes:
    ref = merkle.MemoryHashes()
    for e in entries:
        ref.append(merkle.hash_leaf(e))
    return ref


# --- appends and reads ---------------------------------------------------------------------------------


def test_empty_store(store: LogBackend) -> None:
    assert store.size() == 0
    assert store.entries(0, 0) == []
    assert store.load_checkpoint() is None
    assert store.tree_hash() == merkle.EMPTY_ROOT
    assert store.read_hashes([]) == []


def test_append_returns_first_index_and_entries_read_back(store: LogBackend) -> None:
    assert store.append([entry(0)]) == 0
    assert store.append([entry(1), entry(2), entry(3)]) == 1
    assert store.append([]) == 4
    assert store.size() == 4
    assert store.entries(0, 4) == [entry(i) for i in range(4)]
    assert store.entries(1, 3) == [entry(1), entry(2)]
    assert store.entries(4, 4) == []


def test_rfc6962_root_of_eight_leaves(store: LogBackend) -> None:
    store.append(RFC_LEAVES[:3])
    store.append(RFC_LEAVES[3:])
    assert store.tree_hash() == RFC_ROOT_8
    assert store.tree_hash(1) == merkle.hash_leaf(b"")


def test_stored_hashes_match_the_reference_for_any_batching(store: LogBackend) -> None:
    data = [entry(i) for i in range(300)]
    start = 0
    for size in (1, 2, 5, 8, 1, 27, 128, 100, 28):
        store.append(data[start : start + size])
        start += size
    assert start == len(data)
    ref = reference(data)
    assert store.read_hashes(range(len(ref.hashes))) == ref.hashes
    assert store.read_hashes([5, 0, 5]) == [ref.hashes[5], ref.hashes[0], ref.hashes[5]]


@settings(max_examples=25, deadline=None)
@given(batches=st.lists(st.integers(min_value=0, max_value=40), max_size=12), backend=st.sampled_from(sorted(BACKENDS)))
def test_any_batching_gives_the_tree_of_the_concatenation(batches: list[int], backend: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = BACKENDS[backend](Path(d))
        try:
            n = 0
            for b in batches:
                assert store.append([entry(i) for i in range(n, n + b)]) == n
                n += b
            ref = reference([entry(i) for i in range(n)])
            assert store.size() == n
            assert store.read_hashes(range(merkle.stored_hash_count(n))) == ref.hashes
            for size in {0, n // 3, n}:
                assert store.tree_hash(size) == merkle.tree_hash(size, ref)
        finally:
            store.close()


def test_entry_sizes_at_the_limit(store: LogBackend) -> None:
    store.append([b"", b"\x00" * MAX_ENTRY_SIZE])
    assert store.entries(0, 2) == [b"", b"\x00" * MAX_ENTRY_SIZE]


def test_oversize_entry_is_refused_and_nothing_of_its_batch_is_written(store: LogBackend) -> None:
    store.append([entry(0)])
    with pytest.raises(LimitError, match=r"entry 1 of the batch is 65536 bytes, over the limit of 65535"):
        store.append([entry(1), b"x" * (MAX_ENTRY_SIZE + 1), entry(2)])
    assert store.size() == 1
    assert store.append([entry(1)]) == 1


def test_an_append_that_must_land_at_an_index_is_refused_whole_once_another_writer_got_there(
    store: LogBackend,
) -> None:
    # The broker decides on packets against the policy folded up to an index; entries appended there by someone
    # else (an operator command) must be folded first, so its append refuses to land anywhere else.
    assert store.append([entry(0), entry(1)], at=0) == 0
    before = store.tree_hash()
    with pytest.raises(StoreMoved) as moved:
        store.append([entry(2)], at=1)
    assert moved.value.size == 2
    assert "2 entries, not the 1" in str(moved.value)
    assert (store.size(), store.tree_hash()) == (2, before)  # nothing of it was written
    assert store.append([entry(2)], at=2) == 2


def test_non_bytes_entry_is_refused(store: LogBackend) -> None:
    with pytest.raises(StoreError, match="entry 0 of the batch is str"):
        store.append(["text"])  # type: ignore[list-item]
    assert store.size() == 0


@pytest.mark.parametrize(("start", "end"), [(-1, 0), (0, 4), (2, 1), (3, 4)])
def test_entries_out_of_range_are_refused(store: LogBackend, start: int, end: int) -> None:
    store.append([entry(0), entry(1), entry(2)])
    with pytest.raises(StoreError, match="not within the log of 3 entries"):
        store.entries(start, end)


def test_reading_a_hash_not_stored_is_refused(store: LogBackend) -> None:
    store.append([entry(0), entry(1)])  # stores 3 hashes
    with pytest.raises(StoreError, match="stored hash 3 does not exist"):
        store.read_hashes([0, 3])
    with pytest.raises(StoreError, match="stored hash -1 does not exist"):
        store.read_hashes([-1])


def test_tree_hash_beyond_the_log_is_refused(store: LogBackend) -> None:
    store.append([entry(0)])
    with pytest.raises(StoreError, match="beyond the 1 durable entries"):
        store.tree_hash(2)


# --- proofs over a store --------------------------------------------------------------------------------


class CountingReader:
    """Passes reads through to a store and counts them (proofs must cost O(log n) reads)."""

    def __init__(self, inner: merkle.HashReader) -> None:
        self.inner = inner
        self.calls = 0
        self.hashes = 0

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        self.calls += 1
        self.hashes += len(indexes)
        return self.inner.read_hashes(indexes)


def test_proofs_from_the_store_verify_and_read_log_n_hashes(store: LogBackend) -> None:
    n = 1000
    store.append([entry(i) for i in range(n)])
    bound = 2 * math.ceil(math.log2(n)) + 2
    for size in (1, 7, 512, 999, 1000):
        root = store.tree_hash(size)
        for index in {0, size // 2, size - 1}:
            reader = CountingReader(store)
            proof = merkle.inclusion_proof(index, size, reader)
            assert reader.calls == 1
            assert reader.hashes <= bound
            merkle.verify_inclusion(merkle.hash_leaf(entry(index)), index, size, proof, root)
        for old in (1, size // 3 + 1, size):
            reader = CountingReader(store)
            proof = merkle.consistency_proof(old, size, reader)
            assert reader.calls <= 1
            assert reader.hashes <= bound
            merkle.verify_consistency(old, size, proof, store.tree_hash(old), root)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(
            merkle.hash_leaf(entry(1)), 0, n, merkle.inclusion_proof(0, n, store), store.tree_hash()
        )


# --- checkpoints ----------------------------------------------------------------------------------------


def test_checkpoint_saves_and_never_goes_backwards(store: LogBackend) -> None:
    store.save_checkpoint(0, b"empty\n")
    assert store.load_checkpoint() == (0, b"empty\n")
    store.append([entry(i) for i in range(5)])
    store.save_checkpoint(5, b"five\n")
    assert store.load_checkpoint() == (5, b"five\n")
    store.save_checkpoint(5, b"five again\n")  # the same tree may be re-signed (e.g. with a new key)
    with pytest.raises(StoreError, match="one of size 5 was already saved"):
        store.save_checkpoint(4, b"four\n")
    assert store.load_checkpoint() == (5, b"five again\n")


def test_checkpoint_of_a_tree_not_yet_stored_is_refused(store: LogBackend) -> None:
    store.append([entry(0)])
    with pytest.raises(StoreError, match="only 1 entries are durable"):
        store.save_checkpoint(2, b"two\n")
    assert store.load_checkpoint() is None


def test_oversize_checkpoint_is_refused(store: LogBackend) -> None:
    with pytest.raises(LimitError, match="checkpoint is 16385 bytes"):
        store.save_checkpoint(0, b"x" * 16385)


def test_closed_store_refuses_use(store: LogBackend) -> None:
    store.append([entry(0)])
    store.close()
    for call in (store.size, lambda: store.append([b"x"]), lambda: store.entries(0, 1), store.load_checkpoint):
        with pytest.raises(StoreError, match="closed"):
            call()
    store.close()  # closing twice is harmless


# --- durable backends -----------------------------------------------------------------------------------


def test_data_survives_reopening(durable: Callable[[], LogBackend]) -> None:
    s = durable()
    s.append([entry(i) for i in range(10)])
    s.save_checkpoint(10, b"ten\n")
    root = s.tree_hash()
    s.close()
    s = durable()
    try:
        assert s.size() == 10
        assert s.entries(0, 10) == [entry(i) for i in range(10)]
        assert s.tree_hash() == root
        assert s.load_checkpoint() == (10, b"ten\n")
        assert s.append([entry(10)]) == 10
    finally:
        s.close()


def test_two_handles_see_each_others_appends(durable: Callable[[], LogBackend]) -> None:
    a, b = durable(), durable()
    try:
        a.append([entry(0), entry(1)])
        assert b.size() == 2
        assert b.append([entry(2)]) == 2  # b's append sees a's entries inside its own transaction
        assert a.entries(0, 3) == [entry(i) for i in range(3)]
        assert a.tree_hash() == b.tree_hash() == merkle.tree_hash(3, reference([entry(i) for i in range(3)]))
    finally:
        a.close()
        b.close()


def test_concurrent_writers_interleave_whole_batches(durable: Callable[[], LogBackend]) -> None:
    handles = [durable() for _ in range(3)]
    starts: dict[int, list[int]] = {k: [] for k in range(3)}

    def writer(k: int) -> None:
        for j in range(20):
            starts[k].append(handles[k].append([b"w%d-%d-%d" % (k, j, x) for x in range(7)]))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = handles[0]
    try:
        assert s.size() == 3 * 20 * 7
        for k, firsts in starts.items():
            for j, first in enumerate(firsts):
                assert s.entries(first, first + 7) == [b"w%d-%d-%d" % (k, j, x) for x in range(7)]
        ref = reference(s.entries(0, s.size()))
        assert s.read_hashes(range(len(ref.hashes))) == ref.hashes
    finally:
        for h in handles:
            h.close()
