"""The log service: cadence, durable-only and never-backwards signing, proofs, tiles and their export."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from valise.crypto import sign
from valise.errors import (
    AccessError,
    CheckpointError,
    LimitError,
    NoteError,
    ProofError,
    StoreError,
    TileError,
    UsageError,
)
from valise.logservice import LogService
from valise.store import MAX_ENTRY_SIZE, MemoryLog
from valise.store.export import all_tiles, export_tiles, verify_export
from valise.store.sqlite import SqliteLog
from valise.tlog import checkpoint, merkle, note, tiles

from .conftest import seeded_random

ORIGIN = "valise.example/log"
KEY = sign.SigningKey(seeded_random(b"log key")(32))


def entry(i: int) -> bytes:
    return b"record %d" % i


def service(store: MemoryLog | SqliteLog | None = None, **kw: float) -> LogService:
    return LogService(store or MemoryLog(), ORIGIN, KEY, **kw)  # type: ignore[arg-type]


def root(log: LogService) -> bytes:
    return merkle.tree_hash(log.store.size(), log.store)


def reference(n: int) -> merkle.MemoryHashes:
    ref = merkle.MemoryHashes()
    for i in range(n):
        ref.append(merkle.hash_leaf(entry(i)))
    return ref


VERIFIER = note.Ed25519Signer(ORIGIN, KEY).verifier()


def opened(cp: bytes) -> tuple[int, bytes]:
    got, _ = checkpoint.open_checkpoint(cp, VERIFIER)
    return got.size, got.root


# --- batching and cadence -------------------------------------------------------------------------------


def test_flush_appends_the_queue_in_order_and_reports_indexes() -> None:
    log = service()
    assert log.flush() == range(0, 0)
    assert [log.add(entry(i), now=0.0) for i in range(3)] == [0, 1, 2]
    assert log.store.size() == 0  # nothing is in the log before the flush
    assert log.flush() == range(0, 3)
    assert log.add(entry(3), now=0.0) == 0
    assert log.flush() == range(3, 4)
    assert log.store.entries(0, 4) == [entry(i) for i in range(4)]


def test_flush_splits_into_batches_of_max_batch() -> None:
    log = service(max_batch=4, max_pending=100)
    for i in range(10):
        log.add(entry(i), now=0.0)
    assert log.flush() == range(0, 10)
    assert root(log) == merkle.tree_hash(10, reference(10))


def test_cadence_by_time_and_by_count() -> None:
    log = service(interval=1.0, max_batch=3, max_pending=10)
    assert not log.due(100.0)
    assert log.next_due() is None
    log.add(entry(0), now=10.0)
    log.add(entry(1), now=10.5)
    assert log.next_due() == 11.0
    assert not log.due(10.9)
    assert log.due(11.0)
    assert log.tick(10.9) is None
    cp = log.tick(11.0)
    assert cp is not None
    assert cp.size == 2
    for i in range(3):  # a full batch is due at once
        log.add(entry(2 + i), now=20.0)
    assert log.due(20.0)


def test_limits_on_add() -> None:
    log = service(max_batch=2, max_pending=2)
    with pytest.raises(LimitError, match="65536 bytes, over the limit of 65535"):
        log.add(b"x" * (MAX_ENTRY_SIZE + 1), now=0.0)
    log.add(entry(0), now=0.0)
    log.add(entry(1), now=0.0)
    with pytest.raises(LimitError, match="2 log entries are waiting"):
        log.add(entry(2), now=0.0)
    with pytest.raises(UsageError):
        service(max_batch=0)


def test_a_failed_flush_keeps_the_batch_queued(tmp_path: Path) -> None:
    store = SqliteLog.open(tmp_path / "log.db")
    log = service(store)
    log.add(entry(0), now=0.0)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        log.flush()
    assert log.pending == 1


# --- signing ----------------------------------------------------------------------------------------------


def test_checkpoint_of_the_empty_tree() -> None:
    log = service()
    cp = log.sign()
    assert (cp.size, cp.root) == (0, merkle.EMPTY_ROOT)
    assert opened(cp.note) == (0, merkle.EMPTY_ROOT)
    assert cp.note.startswith(f"{ORIGIN}\n0\n{note.b64(merkle.EMPTY_ROOT)}\n\n— {ORIGIN} ".encode())


def test_only_durable_entries_are_signed() -> None:
    log = service()
    log.add(entry(0), now=0.0)
    assert log.sign().size == 0  # queued, not durable: not signed
    log.flush()
    cp = log.sign()
    assert (cp.size, cp.root) == (1, merkle.hash_leaf(entry(0)))
    assert log.store.load_checkpoint() == (1, cp.note)  # persisted before it was returned


def test_signing_again_without_new_entries_returns_the_same_checkpoint() -> None:
    log = service()
    log.append_and_sign([entry(0)], now=0.0)
    first = log.latest
    assert log.sign() == first


def test_checkpoint_is_reloaded_from_the_store(tmp_path: Path) -> None:
    store = SqliteLog.open(tmp_path / "log.db")
    _, cp = service(store).append_and_sign([entry(i) for i in range(5)], now=0.0)
    store.close()
    with SqliteLog.open(tmp_path / "log.db") as store:
        assert service(store).latest == cp


def test_a_store_rolled_back_below_the_signed_tree_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with SqliteLog.open(path) as store:
        service(store).append_and_sign([entry(i) for i in range(10)], now=0.0)
    # Simulate restoring an old backup: the log loses its last entries (and their hashes), the checkpoint stays.
    db = sqlite3.connect(path)
    db.execute("DELETE FROM log_entries WHERE idx >= 6")
    db.execute("DELETE FROM log_hashes WHERE idx >= ?", (merkle.stored_hash_count(6),))
    db.commit()
    db.close()
    with SqliteLog.open(path) as store:
        log = service(store)
        for i in range(6):
            log.add(b"different %d" % i, now=0.0)
        log.flush()  # 12 entries now, but 6..9 differ from the signed tree of 10
        with pytest.raises(CheckpointError, match="does not match the signed checkpoint"):
            log.sign()
        assert store.load_checkpoint() is not None
        assert store.load_checkpoint()[0] == 10  # type: ignore[index]


def test_a_store_behind_its_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with SqliteLog.open(path) as store:
        service(store).append_and_sign([entry(i) for i in range(10)], now=0.0)
    db = sqlite3.connect(path)
    db.execute("DELETE FROM log_entries WHERE idx >= 6")
    db.execute("DELETE FROM log_hashes WHERE idx >= ?", (merkle.stored_hash_count(6),))
    db.commit()
    db.close()
    with SqliteLog.open(path) as store, pytest.raises(CheckpointError, match="6 entries but checkpoint 10"):
        service(store).sign()


def test_a_forked_tree_is_never_signed() -> None:
    a, b = service(), service()
    _, cp = a.append_and_sign([entry(i) for i in range(4)], now=0.0)
    b.store.append([entry(0), entry(1), b"forged", entry(3), entry(4)])
    b.store.save_checkpoint(4, cp.note)  # b's store claims a's checkpoint
    with pytest.raises(CheckpointError, match="does not match"):
        LogService(b.store, ORIGIN, KEY).sign()


def test_a_checkpoint_from_another_key_is_refused_on_open() -> None:
    store = MemoryLog()
    LogService(store, ORIGIN, sign.SigningKey(b"\x01" * 32)).sign()
    with pytest.raises(NoteError, match="no verifiable signatures"):
        LogService(store, ORIGIN, KEY)


# --- proofs and the read side ----------------------------------------------------------------------------


def test_proofs_verify_against_signed_checkpoints() -> None:
    log = service()
    _, old = log.append_and_sign([entry(i) for i in range(300)], now=0.0)
    _, new = log.append_and_sign([entry(i) for i in range(300, 1000)], now=0.0)
    for index in (0, 299, 300, 999):
        merkle.verify_inclusion(merkle.hash_leaf(entry(index)), index, 1000, log.inclusion_proof(index), new.root)
    merkle.verify_inclusion(merkle.hash_leaf(entry(7)), 7, 300, log.inclusion_proof(7, 300), old.root)
    merkle.verify_consistency(300, 1000, log.consistency_proof(300), old.root, new.root)
    with pytest.raises(ProofError):
        merkle.verify_consistency(299, 1000, log.consistency_proof(299), old.root, new.root)


def test_proofs_beyond_the_signed_tree_are_refused() -> None:
    log = service()
    with pytest.raises(CheckpointError, match="no signed checkpoint"):
        log.inclusion_proof(0)
    log.append_and_sign([entry(0), entry(1)], now=0.0)
    log.add(entry(2), now=0.0)
    log.flush()  # durable but not signed yet
    with pytest.raises(UsageError, match="entry 2 is not in the tree of 2"):
        log.inclusion_proof(2)
    with pytest.raises(UsageError, match="tree size 3 is not within the signed tree"):
        log.consistency_proof(1, 3)


def test_read_side_serves_checkpoint_and_tiles() -> None:
    log = service()
    assert log.read("checkpoint") is None
    n = 256 * 3 + 5
    _, cp = log.append_and_sign([entry(i) for i in range(n)], now=0.0)
    ref = reference(n)
    res = log.read("checkpoint")
    assert res is not None
    assert (res.body, res.immutable) == (cp.note, False)
    full = log.read("tile/0/001")
    assert full is not None
    assert full.immutable
    assert full.body == b"".join(merkle.hash_leaf(entry(i)) for i in range(256, 512))
    part = log.read("tile/0/003.p/5")
    assert part is not None
    assert not part.immutable
    assert part.body == b"".join(merkle.hash_leaf(entry(i)) for i in range(768, 773))
    level1 = log.read("tile/1/000.p/3")
    assert level1 is not None
    assert level1.body == b"".join(ref.read_hashes([merkle.stored_hash_index(8, k) for k in range(3)]))
    bundle = log.read("tile/entries/003.p/2")
    assert bundle is not None
    assert tiles.parse_entries(bundle.body, 2) == [entry(768), entry(769)]
    for missing in ("tile/0/003.p/6", "tile/0/004", "tile/1/000", "tile/entries/003", "tile/0/1", "tile/0/x000/001"):
        assert log.read(missing) is None


def test_read_side_can_withhold_entry_bundles() -> None:
    log = service()
    log.append_and_sign([entry(i) for i in range(300)], now=0.0)
    with pytest.raises(AccessError, match=r"tile/entries/001\.p/44: entry bundles are not served"):
        log.read("tile/entries/001.p/44", entry_bundles=False)
    with pytest.raises(AccessError):
        log.read("tile/entries/000", entry_bundles=False)
    assert log.read("tile/0/000", entry_bundles=False) is not None  # hash tiles stay public
    assert log.read("/tile/entries/000", entry_bundles=True) is None  # not a path of the layout


# --- export ----------------------------------------------------------------------------------------------


def _export(log: LogService, out: Path) -> int:
    cp = log.latest
    assert cp is not None
    return export_tiles(out, cp.note, log.tile, origin=log.origin).written


def test_export_and_verify_round_trip(tmp_path: Path) -> None:
    log = service()
    for n in (0, 1, 255, 256, 257, 256 * 256 + 1):
        log.append_and_sign([entry(i) for i in range(log.store.size(), n)], now=0.0)
        _export(log, tmp_path / "out")
        cp = verify_export(tmp_path / "out", VERIFIER)
        assert (cp.size, cp.root) == (n, root(log))
    # Re-exporting the same tree rewrites only the partial tiles and the checkpoint.
    assert _export(log, tmp_path / "out") == 1 + sum(1 for t in all_tiles(256 * 256 + 1) if t.width < 256)


def test_verify_export_catches_a_changed_entry_and_a_changed_tile(tmp_path: Path) -> None:
    log = service()
    log.append_and_sign([entry(i) for i in range(600)], now=0.0)
    out = tmp_path / "out"
    _export(log, out)
    bundle = out / "tile/entries/001"
    good = bundle.read_bytes()
    bundle.write_bytes(good.replace(entry(300), entry(301)[:-1] + b"9"))
    with pytest.raises(TileError, match="entries of tile/entries/001 do not hash to tile/0/001"):
        verify_export(out, VERIFIER)
    bundle.write_bytes(good)
    level1 = out / "tile/1/000.p/2"
    level1.write_bytes(level1.read_bytes()[:-1] + b"\x00")
    with pytest.raises(TileError, match="level 1 tiles do not match"):
        verify_export(out, VERIFIER)
    (out / "tile/0/002.p/88").unlink()
    with pytest.raises(StoreError, match=r"cannot read tile/0/002\.p/88"):
        verify_export(out, VERIFIER)


def test_export_refuses_a_directory_of_another_log(tmp_path: Path) -> None:
    a = service()
    a.append_and_sign([entry(i) for i in range(300)], now=0.0)
    _export(a, tmp_path / "out")
    b = service()
    b.append_and_sign([b"other %d" % i for i in range(300)], now=0.0)
    with pytest.raises(UsageError, match="differs from this log's tile"):
        _export(b, tmp_path / "out")
    small = service()
    small.append_and_sign([entry(0)], now=0.0)
    with pytest.raises(UsageError, match="holds a larger tree"):
        _export(small, tmp_path / "out")
    other = LogService(MemoryLog(), "other.example/log", KEY)
    other.sign()
    with pytest.raises(UsageError, match="another origin"):
        _export(other, tmp_path / "out")


def test_signing_again_when_another_process_signed_a_larger_tree_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker read the store's size, an operator command appended and signed a larger tree, and the broker's
    save was refused: it logged "refusing to sign a checkpoint" with a traceback. It now signs again."""
    path = tmp_path / "log.db"
    broker, operator = SqliteLog.open(path), SqliteLog.open(path)
    ours = service(broker)
    broker.append([entry(0)])
    ours.sign()
    real_save = broker.save_checkpoint
    raced = []

    def operator_signs_first(size: int, note_bytes: bytes) -> None:
        if not raced:  # between our read of the size and our save, once
            raced.append(size)
            operator.append([entry(2)])
            service(operator).sign()  # a larger tree, saved first
        real_save(size, note_bytes)

    monkeypatch.setattr(broker, "save_checkpoint", operator_signs_first)
    broker.append([entry(1)])
    signed = ours.sign()
    assert raced == [2]  # refused (the operator saved 3 first); the retry found 3 signed already
    assert signed.size == 3
    assert broker.load_checkpoint() == (3, signed.note)


def test_signing_up_to_a_size_leaves_what_lies_above_it_to_its_writer(tmp_path: Path) -> None:
    """An operator command signs up to its own records: a broker batch appended above them meanwhile is the
    broker's to sign, once its mailboxes have it (a checkpoint over it would make them look older than the log)."""
    store = SqliteLog.open(tmp_path / "log.db")
    log = service(store)
    store.append([entry(0), entry(1), entry(2)])
    signed = log.sign(2)
    assert signed.size == 2
    assert store.load_checkpoint() == (2, signed.note)
    assert log.sign(1).size == 2  # a larger checkpoint covers it already: nothing signed again
    with pytest.raises(CheckpointError, match="the store holds 3"):
        log.sign(4)
    assert log.sign().size == 3
