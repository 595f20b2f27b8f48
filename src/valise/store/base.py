"""The storage protocol of the transparency log, and the append logic every backend shares.

A log store keeps three things (specs/log.md, "Durable store"):
- the entries, in order, each at most MAX_ENTRY_SIZE bytes (opaque to the store);
- the *stored hashes* of the tree (valise.tlog.merkle addressing): the leaf hash of every entry plus the hash of
  every complete subtree, a flat append-only array of 2n − popcount(n) hashes for n entries;
- the latest signed checkpoint (a C2SP signed note) together with the tree size it signs.

Entries and their hashes are written in one transaction, so a crash leaves either the whole batch or none of
it, and the hash array always matches the entries. Every tree hash and proof then needs O(log n) hash reads
in one query, never a pass over the entries.

A backend implements the small set of primitives of `LogBackend` (a transaction, the raw writes and reads);
`LogBackend.append` does the rest. A new backend (e.g. PostgreSQL) only has to pass tests/test_store.py.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from valise.errors import CheckpointSuperseded, LimitError, StoreError, StoreMoved
from valise.tlog import merkle

# C2SP tlog-tiles entry bundles prefix each entry with a big-endian uint16 length.
MAX_ENTRY_SIZE = 65535
# One append call is one transaction; past this, a caller should split (memory, lock hold time).
MAX_BATCH = 100_000
# Checkpoints are short text (origin, size, root, a few signature lines); anything larger is a bug or abuse.
MAX_CHECKPOINT_SIZE = 16384


class LogStorage(Protocol):
    """What the log service and the rest of valise need from a log store."""

    def size(self) -> int:
        """The number of durable entries."""
        ...

    def append(self, entries: Sequence[bytes], at: int | None = None) -> int:
        """Durably append `entries` (with their stored hashes, atomically); return the first one's index. With
        `at`, only if that is the first one's index: else raise StoreMoved and append nothing."""
        ...

    def entries(self, start: int, end: int) -> list[bytes]:
        """Entries start..end-1; raise StoreError if the range is not within [0, size]."""
        ...

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        """Stored hashes at `indexes`, in that order; raise StoreError for one not stored."""
        ...

    def load_checkpoint(self) -> tuple[int, bytes] | None:
        """The latest saved checkpoint as (tree size, signed note bytes), or None if none was saved."""
        ...

    def save_checkpoint(self, size: int, note: bytes) -> None:
        """Replace the saved checkpoint; refuse one for a tree larger than the store or smaller than the saved one."""
        ...

    def close(self) -> None: ...


def check_entries(entries: Sequence[bytes]) -> None:
    """Refuse a batch the store cannot hold, before any hashing or writing."""
    if len(entries) > MAX_BATCH:
        raise LimitError(f"batch of {len(entries)} entries is over the limit of {MAX_BATCH}", hint="split it")
    for i, e in enumerate(entries):
        if not isinstance(e, bytes):
            raise StoreError(f"entry {i} of the batch is {type(e).__name__}, not bytes")
        if len(e) > MAX_ENTRY_SIZE:
            raise LimitError(f"entry {i} of the batch is {len(e)} bytes, over the limit of {MAX_ENTRY_SIZE}")


def check_range(start: int, end: int, size: int) -> None:
    if not 0 <= start <= end <= size:
        raise StoreError(f"entry range [{start}, {end}) is not within the log of {size} entries")


def check_checkpoint(size: int, note: bytes, stored_size: int, saved: int | None) -> None:
    """The rules every backend applies inside the transaction that saves a checkpoint."""
    if len(note) > MAX_CHECKPOINT_SIZE:
        raise LimitError(f"checkpoint is {len(note)} bytes, over the limit of {MAX_CHECKPOINT_SIZE}")
    if size > stored_size:
        raise StoreError(f"refusing a checkpoint of size {size}: only {stored_size} entries are durable")
    if saved is not None and size < saved:
        raise CheckpointSuperseded(f"refusing a checkpoint of size {size}: one of size {saved} was already saved")


class _BatchHashes:
    """A HashReader over the hashes of the batch being written plus the frontier of the tree before it.

    A new leaf only ever needs older hashes that are roots of the complete subtrees of the tree before the
    batch (its frontier, popcount(n) hashes), so one read up front serves the whole batch.
    """

    __slots__ = ("first", "frontier", "pending")

    def __init__(self, first: int, frontier: dict[int, bytes]) -> None:
        self.first = first
        self.frontier = frontier
        self.pending: list[bytes] = []

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        first, pending, frontier = self.first, self.pending, self.frontier
        out = []
        for i in indexes:
            if i >= first:
                out.append(pending[i - first])
            else:
                try:
                    out.append(frontier[i])
                except KeyError:
                    raise StoreError(f"stored hash {i} is not in the frontier of the tree") from None
        return out


def frontier_indexes(size: int) -> list[int]:
    """Stored indexes of the complete subtrees whose concatenation is the tree of `size` leaves."""
    out = []
    lo = 0
    while lo < size:
        level = (size - lo).bit_length() - 1
        out.append(merkle.stored_hash_index(level, lo >> level))
        lo += 1 << level
    return out


def batch_hashes(size: int, entries: Sequence[bytes], reader: merkle.HashReader) -> list[bytes]:
    """The stored hashes to append after a tree of `size` leaves when `entries` are added, in stored order."""
    wanted = frontier_indexes(size)
    overlay = _BatchHashes(merkle.stored_hash_count(size), dict(zip(wanted, reader.read_hashes(wanted), strict=True)))
    pending = overlay.pending
    leaf = merkle.hash_leaf
    for i, e in enumerate(entries, size):
        pending.extend(merkle.stored_hashes_for_leaf(i, leaf(e), overlay))
    return pending


class LogBackend(abc.ABC):
    """Shared logic over a backend's primitives; subclasses provide a transaction and raw reads/writes."""

    @abc.abstractmethod
    def _transaction(self) -> AbstractContextManager[None]:
        """A write transaction: exclusive against other writers, all or nothing, durable on exit."""

    @abc.abstractmethod
    def _size(self) -> int:
        """Entries stored (inside or outside a transaction)."""

    @abc.abstractmethod
    def _write(self, first_entry: int, entries: Sequence[bytes], first_hash: int, hashes: Sequence[bytes]) -> None:
        """Insert entries at first_entry.. and hashes at first_hash.. (inside the transaction)."""

    @abc.abstractmethod
    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]: ...

    @abc.abstractmethod
    def entries(self, start: int, end: int) -> list[bytes]: ...

    @abc.abstractmethod
    def load_checkpoint(self) -> tuple[int, bytes] | None: ...

    @abc.abstractmethod
    def save_checkpoint(self, size: int, note: bytes) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def size(self) -> int:
        return self._size()

    def append(self, entries: Sequence[bytes], at: int | None = None) -> int:
        entries = list(entries)
        check_entries(entries)
        with self._transaction():
            # Read the size inside the transaction: another writer may have appended since we last looked. A
            # caller that decided on its entries as of `at` (the broker's policy) learns of it here, where no
            # other writer can slip in before the entries land.
            start = self._size()
            if at is not None and start != at:
                raise StoreMoved(at, start)
            if entries:
                hashes = batch_hashes(start, entries, self)
                self._write(start, entries, merkle.stored_hash_count(start), hashes)
        return start

    def tree_hash(self, size: int | None = None) -> bytes:
        """The root hash of the first `size` entries (default: all durable entries)."""
        n = self._size() if size is None else size
        if n > self._size():
            raise StoreError(f"tree size {n} is beyond the {self._size()} durable entries")
        return merkle.tree_hash(n, self)

    def iter_entries(self, start: int, end: int, chunk: int = 4096) -> Iterator[bytes]:
        for lo in range(start, end, chunk):
            yield from self.entries(lo, min(end, lo + chunk))
