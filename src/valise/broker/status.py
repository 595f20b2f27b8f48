"""`valise broker status`: what an operator checks first, read from the broker directory without disturbing it.

Whether the broker runs, how far the log and its checkpoint are, whether the delivery queues have taken in
everything the log holds (they lag when the broker's storage fails: specs/protocol.md, "When the broker cannot
write"), what waits for whom and since when, orphans, the spool, and the disk's free space. Everything is read
through read-only connections, so a running broker is never held up by more than SQLite's readers are.
"""

from __future__ import annotations

import fcntl
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from valise.broker.home import BrokerHome
from valise.errors import StoreError

# Below this share of the volume free, `problems` says so: SQLite and the spool need room to commit at all.
LOW_DISK = 0.05


def running(home: BrokerHome) -> bool:
    """Whether a broker holds the directory's serve lock (taken and given back at once if none does)."""
    try:
        with open(home.serve_lock_path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except FileNotFoundError:
        return False
    return False


def _readonly(path: Path) -> sqlite3.Connection:
    try:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None


def _log(home: BrokerHome) -> tuple[int, int | None]:
    conn = _readonly(home.db_path)
    try:
        (size,) = conn.execute("SELECT coalesce(max(idx) + 1, 0) FROM log_entries").fetchone()
        row = conn.execute("SELECT size FROM log_checkpoint WHERE id = 1").fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the log in {home.db_path}: {exc}") from None
    finally:
        conn.close()
    return int(size), None if row is None else int(row[0])


def _queues(home: BrokerHome) -> tuple[int | None, dict[str, dict[str, Any]], int]:
    """The mailboxes' mark, what waits for each member, and how many orphans there are."""
    if not home.mailbox_path.is_file():
        return None, {}, 0
    conn = _readonly(home.mailbox_path)
    try:
        conn.execute("BEGIN")  # one snapshot: a running broker commits the mark with the changes
        mark = conn.execute("SELECT value FROM meta WHERE key = 'readers_size'").fetchone()
        rows = conn.execute(
            "SELECT m.member, count(p.digest), coalesce(sum(p.size), 0), min(p.received), count(*) - count(p.digest)"
            " FROM mailbox AS m LEFT JOIN packets AS p ON m.kind = 'packet' AND p.digest = m.digest"
            " GROUP BY m.member ORDER BY m.member"
        ).fetchall()
        (orphans,) = conn.execute("SELECT count(*) FROM orphans").fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the delivery queues in {home.mailbox_path}: {exc}") from None
    finally:
        conn.close()
    queues = {
        str(member): {"packets": int(n), "bytes": int(size), "oldest": oldest, "notices": int(notices)}
        for member, n, size, oldest, notices in rows
    }
    return (None if mark is None else int(mark[0])), queues, int(orphans)


def _spool(home: BrokerHome) -> dict[str, int]:
    files = [p for p in (home.root / "spool").glob("*.pkt") if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def status(home: BrokerHome) -> dict[str, Any]:
    size, checkpoint = _log(home)
    mark, queues, orphans = _queues(home)
    disk = shutil.disk_usage(home.root)
    problems = []
    behind = None if mark is None else max(size - mark, 0)
    if behind and (checkpoint is None or checkpoint < size):
        # Operator commands append without the mailboxes for a moment; a lag that stays means failing writes.
        problems.append(
            f"the delivery queues have not taken in the last {behind} log entries: if this persists, the broker "
            "cannot write (see its log); nothing past them is checkpointed until it can"
        )
    if disk.total and disk.free / disk.total < LOW_DISK:
        problems.append(f"the disk holding {home.root} is {100 - 100 * disk.free // disk.total}% full")
    return {
        "dir": str(home.root),
        "origin": home.config().origin,
        "running": running(home),
        "log_size": size,
        "checkpoint_size": checkpoint,
        "queues_behind": behind,
        "queues": queues,
        "orphans": orphans,
        "spool": _spool(home),
        "disk": {"free": disk.free, "total": disk.total},
        "problems": problems,
    }
