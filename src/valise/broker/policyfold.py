"""Folding the broker's own log into its policy without reading every traffic record (an I/O edge).

The broker folds its whole log when it starts, and so does every operator command before it appends. Folding
reads each entry, and at the rates a relay logs traffic (two entries per packet) that is millions an hour, almost
all of them packets and acknowledgements with no policy effect. The mailbox database already records, for each
log entry the broker has taken in, who may read it (readers.py): every record that is not traffic is readable by
everyone (`*`). So below the mailboxes' mark, the fold reads only the entries recorded as public, a superset of
the policy records, and counts the positions in between; past the mark (what other writers appended since, or a
batch a crash cut short) it reads every entry.

Only the broker's own folds use this. `--verify` folds, auditors and nodes read every entry and trust no index;
an index that missed a policy record would make the broker's decisions differ from their replay, which an audit
names.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from valise.errors import Error
from valise.policy import PolicyState
from valise.store.sqlite import SqliteLog

PAGE = 4096  # entries read at a time


@dataclass(frozen=True, slots=True)
class PublicIndex:
    """Log entries [0, mark) have their readers recorded; `public` are those of them readable by everyone.
    `mismatch`: why the mailbox database does not describe this log (then the index is empty)."""

    mark: int = 0
    public: Sequence[int] = ()
    mismatch: str | None = None


def read_public_index(mailbox_db: Path, store: SqliteLog) -> PublicIndex:
    """The index as a running broker left it, read in one snapshot (the mark, the hash of the entry just below it
    and the readers below it are written in one transaction), and checked against `store`: an index of another
    log (the log restored from an older backup than the mailboxes, say) would hide policy records. Empty if there
    is no mailbox database yet, or one from before the mark; the full fold is always right, only slower."""
    if not mailbox_db.is_file():
        return PublicIndex()
    try:
        conn = sqlite3.connect(f"{mailbox_db.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error:
        return PublicIndex()
    try:
        conn.execute("BEGIN")
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('readers_size', 'readers_tail')"))
        if "readers_size" not in meta:
            return PublicIndex()
        mark = int(meta["readers_size"])
        if (why := _mismatch(store, mark, meta.get("readers_tail"))) is not None:
            return PublicIndex(mismatch=why)
        if "readers_tail" not in meta:
            return PublicIndex()  # recorded before the tail was: it cannot be checked, so it is not used
        rows = conn.execute("SELECT idx FROM readers WHERE member = '*' AND idx < ? ORDER BY idx", (mark,))
        return PublicIndex(mark, [int(r[0]) for r in rows])
    except sqlite3.Error:
        return PublicIndex()
    finally:
        conn.close()


def _mismatch(store: SqliteLog, mark: int, tail: object) -> str | None:
    size = store.size()
    if mark > size:
        return f"it has taken in {mark} log entries, but the log holds {size}"
    if isinstance(tail, bytes) and mark > 0 and hashlib.sha256(store.entries(mark - 1, mark)[0]).digest() != tail:
        return f"log entry {mark - 1} is not the one it took in"
    return None


def fold(
    state: PolicyState,
    store: SqliteLog,
    upto: int,
    index: PublicIndex = PublicIndex(),
    on_refused: Callable[[int, Error], None] | None = None,
) -> None:
    """Fold log entries [state.size, upto) into `state` in order: below `index.mark` only the public ones, from
    there on all. An entry the policy refuses stays in the log with no effect (`on_refused` is told)."""
    public = [i for i in index.public if state.size <= i < min(upto, index.mark)]
    for start in range(0, len(public), PAGE):
        chunk = public[start : start + PAGE]
        for i, entry in zip(chunk, store.entries_at(chunk), strict=True):
            state.skip_to(i)
            _apply(state, i, entry, on_refused)
    if state.size < min(upto, index.mark):
        state.skip_to(min(upto, index.mark))
    while state.size < upto:
        first = state.size
        for i, entry in enumerate(store.entries(first, min(upto, first + PAGE)), first):
            _apply(state, i, entry, on_refused)


def _apply(state: PolicyState, i: int, entry: bytes, on_refused: Callable[[int, Error], None] | None) -> None:
    try:
        state.apply(entry)
    except Error as exc:
        state.skip_to(i + 1)
        if on_refused is not None:
            on_refused(i, exc)
