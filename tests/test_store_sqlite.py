"""SQLite-specific behaviour of the log store (the shared behaviour is in test_store.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from valise.errors import StoreError
from valise.store.sqlite import SqliteLog


def test_open_creates_the_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.db"
    path.parent.mkdir()
    with SqliteLog.open(path) as log:
        assert log.size() == 0
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"log_entries", "log_hashes", "log_checkpoint", "log_meta"} <= tables
    finally:
        db.close()


def test_tables_of_other_modules_in_the_same_database_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE mailbox (id INTEGER PRIMARY KEY, body BLOB)")
    db.execute("INSERT INTO mailbox(body) VALUES (x'01')")
    db.commit()
    db.close()
    with SqliteLog.open(path) as log:
        log.append([b"a"])
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM mailbox").fetchone()[0] == 1
    db.close()


def test_missing_hashes_are_detected_on_open(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    with SqliteLog.open(path) as log:
        log.append([b"a", b"b", b"c"])
    db = sqlite3.connect(path)
    db.execute("DELETE FROM log_hashes WHERE idx = (SELECT max(idx) FROM log_hashes)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="corrupt: 3 entries but 3 stored hashes"):
        SqliteLog.open(path)


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    SqliteLog.open(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE log_meta SET value = 99 WHERE key = 'log_schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99 is not supported"):
        SqliteLog.open(path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the log store"):
        SqliteLog.open(path)


def test_entries_at_reads_scattered_entries_in_the_order_asked(tmp_path: Path) -> None:
    with SqliteLog.open(tmp_path / "log.db") as store:
        store.append([b"entry %d" % i for i in range(1200)])
        wanted = [1199, 3, 700, 3, 0]
        assert store.entries_at(wanted) == [b"entry %d" % i for i in wanted]
        assert store.entries_at([]) == []
        with pytest.raises(StoreError, match="entry 1200 does not exist"):
            store.entries_at([5, 1200])
