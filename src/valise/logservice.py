"""The log service: batching, checkpoint signing and the read side over a log store (time passed in).

This is the object the broker daemon drives (issue #5); it does no I/O of its own beyond its store:
- `add(entry)` queues an entry; `flush()` appends the queued batch in one transaction (group commit) and says
  which indexes it got; `due(now)` / `tick(now)` apply the cadence (a batch is cut every `interval` seconds, or
  as soon as `max_batch` entries wait).
- `sign()` signs a checkpoint of the *durable* tree only, and never one that goes backwards: the last signed
  checkpoint is persisted with the store, and before signing a new one the service checks that the store
  still holds that tree (same size or larger, same root at that size). A checkpoint is saved before it is
  returned, so every checkpoint anyone has seen is also in the store.
- `inclusion_proof`, `consistency_proof` and `read(path)` serve the C2SP tlog-tiles read side.

Clock: `now` is any float clock that never goes backwards (the daemon passes trio's), used only for cadence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from valise.crypto import sign
from valise.errors import (
    AccessError,
    CheckpointError,
    CheckpointSuperseded,
    KeyFileError,
    LimitError,
    ProofError,
    StoreError,
    StoreMoved,
    UsageError,
)
from valise.store.base import MAX_ENTRY_SIZE, LogStorage
from valise.tlog import checkpoint, merkle, note, tiles

DEFAULT_INTERVAL = 1.0
SIGN_TRIES = 3  # sign() against other writers that sign between our read of the size and our save
DEFAULT_MAX_BATCH = 4096
# Entries waiting for a flush beyond this are refused: the broker must slow its clients, not grow without bound.
DEFAULT_MAX_PENDING = 65536


@dataclass(frozen=True, slots=True)
class Resource:
    """A file of the tlog-tiles read side. Full tiles never change (`immutable`); the checkpoint does."""

    body: bytes
    immutable: bool
    content_type: str = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    size: int
    root: bytes
    note: bytes


class LogService:
    """Batching and checkpoints for one log (one origin, one signing key) over a store."""

    def __init__(
        self,
        store: LogStorage,
        origin: str,
        key: sign.SigningKey | None,
        *,
        verifier: note.Ed25519Verifier | None = None,
        interval: float = DEFAULT_INTERVAL,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        """`key` None: a service that appends and reads but cannot sign (the log key is sealed and not given); it
        needs the log's `verifier` to check the checkpoints it serves."""
        if interval < 0 or max_batch < 1 or max_pending < max_batch:
            raise UsageError("log cadence needs interval >= 0 and 1 <= max_batch <= max_pending")
        self.store = store
        self.origin = origin
        # C2SP tlog-checkpoint: the log's key is named after its origin.
        self.signer = None if key is None else note.Ed25519Signer(origin, key)
        if self.signer is not None:
            verifier = self.signer.verifier()
        elif verifier is None:
            raise UsageError("a log service without its key needs the log's verifier key")
        self.verifier = verifier
        self.interval = interval
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._pending: list[bytes] = []
        self._oldest: float | None = None
        self._latest: SignedCheckpoint | None = self._load_saved()

    # --- checkpoints ---------------------------------------------------------------------------------

    def _load_saved(self) -> SignedCheckpoint | None:
        saved = self.store.load_checkpoint()
        if saved is None:
            return None
        size = saved[0]
        cp, _ = checkpoint.open_checkpoint(saved[1], self.verifier, origin=self.origin)
        if cp.size != size:
            raise StoreError(f"the saved checkpoint says size {cp.size} but was saved as size {size}")
        return SignedCheckpoint(size, cp.root, saved[1])

    @property
    def latest(self) -> SignedCheckpoint | None:
        """The last signed checkpoint (None before the first `sign()`)."""
        return self._latest

    def sign(self, size: int | None = None) -> SignedCheckpoint:
        """Sign (and persist) a checkpoint of every durable entry, or of the first `size`; return the latest if
        nothing was added (or, with `size`, if a checkpoint at least that large is signed already)."""
        for _ in range(SIGN_TRIES - 1):
            try:
                return self._sign_once(size)
            except CheckpointSuperseded:
                continue  # another process (an operator command) signed a larger tree meanwhile: sign again
        return self._sign_once(size)

    def _sign_once(self, upto: int | None) -> SignedCheckpoint:
        size = self.store.size() if upto is None else upto
        prev = self._load_saved()  # re-read: another process may have signed since we last looked
        if upto is not None and prev is not None and prev.size >= upto:
            self._latest = prev
            return prev
        if upto is not None and upto > self.store.size():
            raise CheckpointError(f"cannot sign a tree of {upto} entries: the store holds {self.store.size()}")
        if prev is not None:
            if size < prev.size:
                raise CheckpointError(
                    f"the store holds {size} entries but checkpoint {prev.size} was signed",
                    hint="was the database restored from an old backup? refusing to sign a tree that goes back",
                )
            if merkle.tree_hash(prev.size, self.store) != prev.root:
                raise CheckpointError(
                    f"the store's tree of size {prev.size} does not match the signed checkpoint of that size",
                    hint="the database was altered; refusing to sign a fork",
                )
            if size == prev.size:
                self._latest = prev
                return prev
        if self.signer is None:
            raise KeyFileError(
                f"cannot sign a checkpoint of size {size}: the log key is sealed and was not given",
                hint="the running broker signs it (valise broker serve --passphrase-env VAR)",
            )
        root = merkle.tree_hash(size, self.store)
        signed = checkpoint.sign_checkpoint(checkpoint.Checkpoint(self.origin, size, root), self.signer)
        self.store.save_checkpoint(size, signed)
        self._latest = SignedCheckpoint(size, root, signed)
        return self._latest

    # --- appends -------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, entry: bytes, now: float) -> int:
        """Queue `entry`; return its position in the batch that the next `flush()` appends."""
        if len(entry) > MAX_ENTRY_SIZE:
            raise LimitError(f"log entry is {len(entry)} bytes, over the limit of {MAX_ENTRY_SIZE}")
        if len(self._pending) >= self.max_pending:
            raise LimitError(f"{len(self._pending)} log entries are waiting for a flush", hint="retry later")
        if not self._pending:
            self._oldest = now
        self._pending.append(bytes(entry))
        return len(self._pending) - 1

    def discard_pending(self) -> int:
        """Drop the entries waiting for a flush (after a failed flush whose callers were all told it failed);
        return how many there were."""
        n = len(self._pending)
        self._pending.clear()
        self._oldest = None
        return n

    def due(self, now: float) -> bool:
        """Whether the cadence asks for a flush now."""
        if not self._pending:
            return False
        assert self._oldest is not None
        return len(self._pending) >= self.max_batch or now - self._oldest >= self.interval

    def next_due(self) -> float | None:
        """When the pending batch falls due (None if nothing waits)."""
        return None if self._oldest is None or not self._pending else self._oldest + self.interval

    def flush(self, at: int | None = None) -> range:
        """Append every queued entry durably (one transaction per `max_batch`); return the indexes they got. With
        `at`, the first must land at index `at` (StoreMoved if another writer appended: nothing is).

        On a store error the batch stays queued and nothing of it is in the log.
        """
        batch = self._pending
        if not batch:
            n = self.store.size()
            return range(n, n)
        first = None
        done = 0
        try:
            while done < len(batch):
                part = batch[done : done + self.max_batch]
                if first is None:
                    first = self.store.append(part, at)
                else:
                    try:  # the parts must follow each other: refused, not appended, if another writer came between
                        self.store.append(part, first + done)
                    except StoreMoved:
                        raise StoreError(
                            "another writer appended in the middle of a flush; indexes are not contiguous"
                        ) from None
                done += len(part)
        finally:
            del batch[:done]
            if not batch:
                self._oldest = None
        assert first is not None
        return range(first, first + done)

    def tick(self, now: float) -> SignedCheckpoint | None:
        """If the batch is due: flush it and sign the new tree. Returns the new checkpoint, if any."""
        if not self.due(now):
            return None
        self.flush()
        return self.sign()

    @property
    def can_sign(self) -> bool:
        return self.signer is not None

    def append_and_sign(self, entries: Sequence[bytes], now: float) -> tuple[range, SignedCheckpoint]:
        """Queue, flush and sign at once (CLI tools and tests; the daemon uses the cadence)."""
        for e in entries:
            self.add(e, now)
        got = self.flush()
        return got, self.sign()

    # --- read side -----------------------------------------------------------------------------------

    def _signed_size(self, size: int | None) -> int:
        latest = self._latest
        if latest is None:
            raise CheckpointError("the log has no signed checkpoint yet", hint="run valise broker init")
        if size is None:
            return latest.size
        if not 0 <= size <= latest.size:
            raise UsageError(f"tree size {size} is not within the signed tree of {latest.size} entries")
        return size

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Proof that entry `index` is in the tree of `size` entries (default: the latest checkpoint)."""
        n = self._signed_size(size)
        if not 0 <= index < n:
            raise UsageError(f"entry {index} is not in the tree of {n} entries")
        return merkle.inclusion_proof(index, n, self.store)

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """Proof that the tree of `size1` entries is a prefix of that of `size2` (default: latest checkpoint)."""
        n = self._signed_size(size2)
        if not 0 <= size1 <= n:
            raise UsageError(f"old tree size {size1} is not within the tree of {n} entries")
        return merkle.consistency_proof(size1, n, self.store)

    def tile(self, tile: tiles.Tile) -> bytes:
        """The bytes of a hash tile or entry bundle; refused (StoreError) unless the log holds all of it."""
        size = self.store.size()
        first = tile.n * tiles.WIDTH
        if (first + tile.width) << (tiles.HEIGHT * max(tile.level, 0)) > size:
            raise StoreError(f"{tile.path} is beyond the {size} entries of the log")
        if tile.level == tiles.ENTRIES:
            return tiles.encode_entries(self.store.entries(first, first + tile.width))
        return tiles.read_tile(tile, self.store)

    def missing_reason(self, path: str) -> str:
        """Why `read(path)` found no file, for the answer a reader gets (a malformed tile path, a tile beyond the
        log): a bare "not found" leaves a client author guessing which."""
        if path == "checkpoint":
            return "the log has no checkpoint yet"
        try:
            self.tile(tiles.parse_path(path))
        except (ProofError, StoreError) as exc:
            return exc.what
        return "no such file"

    def read(self, path: str, *, entry_bundles: bool = True) -> Resource | None:
        """Serve one path of the tlog-tiles layout (`checkpoint`, `tile/...`); None if there is no such file.

        `entry_bundles=False` refuses entry bundles (AccessError): they hold every traffic record. The decision
        is made on the parsed tile, so no spelling of a path can get round it."""
        if path == "checkpoint":
            latest = self._latest
            return None if latest is None else Resource(latest.note, False, "text/plain; charset=utf-8")
        try:
            tile = tiles.parse_path(path)
        except ProofError:  # TileError is a ProofError
            return None
        if tile.level == tiles.ENTRIES and not entry_bundles:
            raise AccessError(f"{path}: entry bundles are not served here")
        try:
            return Resource(self.tile(tile), immutable=tile.width == tiles.WIDTH)
        except (ProofError, StoreError):
            return None
