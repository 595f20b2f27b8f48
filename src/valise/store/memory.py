"""The in-memory reference log store: the model every durable backend must behave like (not durable)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from valise.errors import StoreError
from valise.store.base import LogBackend, check_checkpoint, check_range


class MemoryLog(LogBackend):
    """Entries, stored hashes and the saved checkpoint in Python lists, behind one lock."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: list[bytes] = []
        self._hashes: list[bytes] = []
        self._checkpoint: tuple[int, bytes] | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the log store is closed")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._check_open()
            # All or nothing: roll the lists back if the batch fails half way.
            n_entries, n_hashes = len(self._entries), len(self._hashes)
            try:
                yield
            except BaseException:
                del self._entries[n_entries:]
                del self._hashes[n_hashes:]
                raise

    def _size(self) -> int:
        self._check_open()
        return len(self._entries)

    def _write(self, first_entry: int, entries: Sequence[bytes], first_hash: int, hashes: Sequence[bytes]) -> None:
        if first_entry != len(self._entries) or first_hash != len(self._hashes):
            raise StoreError("log store out of step: a batch does not start at the end of the log")
        self._entries.extend(entries)
        self._hashes.extend(hashes)

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        self._check_open()
        stored = self._hashes
        try:
            out = [stored[i] for i in indexes]
        except IndexError:
            out = []
        if len(out) != len(indexes) or any(i < 0 for i in indexes):
            bad = next(i for i in indexes if not 0 <= i < len(stored))
            raise StoreError(f"stored hash {bad} does not exist (the store holds {len(stored)})")
        return out

    def entries(self, start: int, end: int) -> list[bytes]:
        with self._lock:
            check_range(start, end, self._size())
            return self._entries[start:end]

    def load_checkpoint(self) -> tuple[int, bytes] | None:
        self._check_open()
        return self._checkpoint

    def save_checkpoint(self, size: int, note: bytes) -> None:
        with self._lock:
            saved = self._checkpoint[0] if self._checkpoint else None
            check_checkpoint(size, note, self._size(), saved)
            self._checkpoint = (size, bytes(note))

    def close(self) -> None:
        self._closed = True
