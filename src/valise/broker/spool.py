"""Packet bodies on the broker's disk (an I/O edge).

A packet arriving over the wire is written to a temporary file as it streams in, its ciphertext hashed on the
way (CiphertextHasher: the broker cannot decrypt, but it can hold the sender to the length and hash it signed),
then fsynced and renamed to `<header digest>.pkt` before its log entry is appended. Memory use per upload is
one chunk, whatever the packet's size. A body is deleted when no mailbox refers to it any more.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import trio

from valise.errors import StoreError
from valise.packet import CiphertextHasher, Head
from valise.store.sqlfile import failure_hint

log = logging.getLogger("valise.broker")

# Packets up to this size travel in the mailbox database, inside the commit batch's transaction, instead of as
# files: a file costs an fsync of its own and of the directory, which bounded the broker at a few hundred small
# packets per second. Memory per open upload stays bounded by this size.
INLINE_MAX = 32 * 1024

# Free disk the spool leaves to the log and the mailboxes: uploads that would eat into it are refused (`internal`,
# retried later), so that a full spool never stops what is logged for everyone (a review filled a broker's disk
# with one member's unfinished uploads, and nothing was logged or checkpointed for anyone until they ended).
RESERVE = 256 * 1024 * 1024


@contextmanager
def _storing() -> Iterator[None]:
    """A file system failure (a full disk, a quota) as a StoreError: the upload is refused with `internal`, and the
    connection and the broker go on. The member is told the cause, not the broker's paths (those are logged)."""
    try:
        yield
    except OSError as exc:
        log.error("spool: %s", exc)
        cause = exc.strerror or type(exc).__name__
        what = f"the broker could not store the packet: {cause}"
        raise StoreError(what, hint=failure_hint(exc), cause=cause) from None


class _Refs(Protocol):
    def unreferenced(self, digests: Sequence[bytes]) -> list[bytes]: ...

    def drop_bodies(self, digests: Sequence[bytes]) -> set[bytes]: ...


class InlineUpload:
    """A small packet received into memory; `finish()` returns its verified bytes for the mailbox transaction."""

    def __init__(self, head: Head, head_bytes: bytes, signed_by: bytes) -> None:
        self.head = head
        self.signed_by = signed_by  # the sender key the head's signature was verified with
        self._hasher = CiphertextHasher(head.header)
        self._data = bytearray(head_bytes)

    def write(self, data: bytes) -> None:
        self._hasher.update(data)
        self._data += data

    def finish(self) -> bytes:
        self._hasher.finish()
        return bytes(self._data)

    def discard(self) -> None:
        self._data = bytearray()


class CheckedUpload:
    """A packet the broker already holds (a sender's retry after a lost receipt): its ciphertext is held to the
    signed length and hash, and kept nowhere. Receiving it again costs no disk: a review re-sent the head of a
    large packet logged long ago, expired and no longer consented to, in uploads it never finished, and filled the
    broker's disk with copies of it."""

    def __init__(self, head: Head, signed_by: bytes) -> None:
        self.head = head
        self.signed_by = signed_by
        self._hasher = CiphertextHasher(head.header)

    def write(self, data: bytes) -> None:
        self._hasher.update(data)

    def finish(self) -> None:
        self._hasher.finish()

    def discard(self) -> None:
        pass


@dataclass(eq=False)
class Promise:
    """Disk room an open upload to a file was promised: what it may still write."""

    member: str
    left: int


class Upload:
    def __init__(
        self,
        head: Head,
        tmp: Path,
        final: Path,
        head_bytes: bytes,
        signed_by: bytes,
        promise: Promise,
        release: Callable[[Promise], None],
    ) -> None:
        self.head = head
        self.signed_by = signed_by  # the sender key the head's signature was verified with
        self._tmp = tmp
        self._final = final
        self._hasher = CiphertextHasher(head.header)
        self._file: BinaryIO | None = None
        self._promise = promise  # shrinks as bytes land on the disk, whose free space then counts them
        self._release: Callable[[Promise], None] | None = release  # gives the rest back, once
        self.received = len(head_bytes)  # bytes of the packet taken so far
        # When the upload began, on the session's clock (it sets it: the spool reads none). Until then, never:
        # an upload whose start nobody noted is never judged too slow, rather than judged at once.
        self.began = math.inf
        try:
            with _storing():
                self._file = open(tmp, "wb")  # noqa: SIM115 - closed in finish() or discard()
                self._file.write(head_bytes)
            promise.left = max(0, promise.left - len(head_bytes))
        except BaseException:
            self.discard()
            raise

    def write(self, data: bytes) -> None:
        """Take one chunk: hash it (refusing bytes past the signed length), then append it to the file."""
        assert self._file is not None
        self._hasher.update(data)
        with _storing():
            self._file.write(data)
        self.received += len(data)
        self._promise.left = max(0, self._promise.left - len(data))

    def finish(self) -> Path:
        """Check length and hash, make the file durable and give it its final name."""
        assert self._file is not None
        try:
            self._hasher.finish()
            self._make_durable()
        except BaseException:
            self.discard()
            raise
        self._given_back()  # written in full: the disk's free space counts it from now on
        return self._final

    async def finish_in_thread(self) -> Path:
        """finish(), with the file's flush, fsync and rename in a worker thread. On the broker's one thread they
        stopped every session, the group commit and the checkpoints for as long as the disk took to take the
        packet: 0.66 s for 1.2 GB on a host-cached virtual disk (a concurrency review), seconds on a real one.
        Not cancellable: the task waits for the thread, so the file is either in place or discarded."""
        assert self._file is not None
        try:
            self._hasher.finish()
            await trio.to_thread.run_sync(self._make_durable)
        except BaseException:
            self.discard()
            raise
        self._given_back()  # here, on the broker's thread: the spool's bookkeeping is not shared with threads
        return self._final

    def _make_durable(self) -> None:
        assert self._file is not None
        with _storing():
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self._tmp, self._final)
            fd = os.open(self._final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # closing flushes, and may fail as the write before it did
                self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)
        self._given_back()

    def _given_back(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self._promise)


class Spool:
    def __init__(self, root: Path, reserve: int = RESERVE) -> None:
        self.root = root
        self.reserve = reserve
        self._open: set[Promise] = set()  # the open uploads to files, and what each may still write
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.part"):  # uploads cut off by a crash: their senders will retry
            stale.unlink()

    @property
    def promised(self) -> dict[str, int]:
        """Bytes each member's open uploads to files may still write."""
        out: dict[str, int] = {}
        for p in self._open:
            out[p.member] = out.get(p.member, 0) + p.left
        return out

    def path(self, digest: bytes) -> Path:
        return self.root / f"{digest.hex()}.pkt"

    def free_space(self) -> int:
        return shutil.disk_usage(self.root).free

    def _promise(self, member: str, size: int) -> Promise:
        """Room for `size` more bytes of `member`'s, or a StoreError saying why not. Open uploads never eat into
        the reserve; and a member's second upload at once (and more) is taken only while its open ones hold at
        most half the room beyond the reserve. One upload may take the whole room: a packet of nearly that size
        must be storable on an idle broker; a member that opens uploads and never finishes them holds at most half
        (and the log goes on whatever they hold)."""
        with _storing():
            room = self.free_space() - self.reserve
        owed = sum(p.left for p in self._open)
        held = sum(p.left for p in self._open if p.member == member)
        if size > room - owed:
            raise StoreError(
                f"the broker has no room for a packet of {size} bytes now: {max(room, 0)} bytes are free beyond the "
                f"{self.reserve} it keeps for its log, and open uploads will write {owed} more ({held} of them "
                f"{member}'s)",
                cause="no room for the packet now",
            )
        if held and held + size > room // 2:
            raise StoreError(
                f"{member}'s open uploads will write {held} more bytes, and with this one ({size} bytes) would hold "
                f"over half of the {max(room, 0)} bytes the broker has free beyond its reserve: send it after them",
                cause="no room for the packet now",
            )
        promise = Promise(member, size)
        self._open.add(promise)
        return promise

    def begin(
        self, head: Head, head_bytes: bytes, signed_by: bytes, *, member: str, keep: bool = True
    ) -> Upload | InlineUpload | CheckedUpload:
        """Receive a packet whose head's signature `signed_by` verified: into memory when small (see INLINE_MAX),
        else into a temporary file, if the disk has room for it (_promise); or, without `keep` (a packet the broker
        holds already), only checked against its signed length and hash."""
        if not keep:
            return CheckedUpload(head, signed_by)
        if head.total_size <= INLINE_MAX:
            return InlineUpload(head, head_bytes, signed_by)
        promise = self._promise(member, head.total_size)  # given back once, when the upload ends either way
        tmp = self.root / f"{secrets.token_hex(8)}.part"
        return Upload(head, tmp, self.path(head.digest), head_bytes, signed_by, promise, self._open.discard)

    def drop_unreferenced(self, refs: _Refs, digests: Sequence[bytes]) -> None:
        """Outside a mailbox transaction: drop the bodies of `digests` that no mailbox item refers to."""
        for path in self.release(refs, digests):
            path.unlink(missing_ok=True)

    def release(self, refs: _Refs, digests: Sequence[bytes]) -> list[Path]:
        """Inside a mailbox transaction: drop the kept bodies of `digests` that no item refers to any more (with
        the transaction), and return their spool files, to unlink once it has committed. Unlinked before, a
        crash or a rollback would leave items whose body is gone for good."""
        gone = refs.unreferenced(digests)
        if not gone:
            return []
        inline = refs.drop_bodies(gone)  # a small packet's body lives in the mailbox database, never in a file
        return [self.path(d) for d in gone if d not in inline]

    def sweep(self, refs: _Refs) -> int:
        """Remove spool files no mailbox item refers to (left by a crash between a commit and an unlink, or by
        an upload logged never); run at start-up, after the mailboxes have caught up with the log."""
        files = {bytes.fromhex(p.stem): p for p in self.root.glob("*.pkt") if _is_digest(p.stem)}
        gone = refs.unreferenced(list(files))
        for digest in gone:
            files[digest].unlink(missing_ok=True)
        return len(gone)


def _is_digest(stem: str) -> bool:
    return len(stem) == 64 and all(c in "0123456789abcdef" for c in stem)
