"""The log's costs as it grows: durable append rate, and verification of the whole log from its tiles.

The log is the broker's own SqliteLog (WAL, one fsynced transaction per batch of 1,000 entries of 300 bytes, the
size of a 1 KiB packet's log entry). At each size (10^3, 10^4, ...) the bench measures:
- append: entries/s over the next batches (median of 5 batches of 1,000), i.e. what group commit costs there;
- verification: the log signs a checkpoint, exports its C2SP tlog-tiles (valise.store.export.export_tiles, the
  layout auditors mirror), then valise.store.export.verify_export recomputes the root from the tiles: the
  checkpoint signature, every entry bundle against its level-0 tile, every tile level against the one below, the
  root. That is the tree part of an audit; replaying policy decisions (the auditor's other half, src/valise/audit,
  in progress when this was written) is not included.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from valise.crypto import sign
from valise.logservice import LogService
from valise.store.export import export_tiles, verify_export
from valise.store.sqlite import SqliteLog

ORIGIN = "bench.valise/log"
ENTRY = 300
BATCH = 1000


def run(work: Path, sizes: list[int]) -> list[dict[str, Any]]:
    store = SqliteLog.open(work / "curve.db")
    log = LogService(store, ORIGIN, sign.SigningKey(bytes(range(32))))
    filler = bytes(range(256)) * 2
    out = []
    n = 0

    def batch(count: int) -> float:
        nonlocal n
        entries = [n.to_bytes(8, "big") + i.to_bytes(4, "big") + filler[: ENTRY - 12] for i in range(count)]
        t = time.perf_counter()
        store.append(entries)
        n += count
        return time.perf_counter() - t

    for size in sizes:
        while n < size:
            batch(min(BATCH, size - n))
        cp = log.sign()
        site = work / f"tiles-{cp.size}"
        t = time.perf_counter()
        export_tiles(site, cp.note, log.tile, origin=ORIGIN)
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        got = verify_export(site, log.verifier)
        verify_s = time.perf_counter() - t
        assert got.root == cp.root
        shutil.rmtree(site)
        rates = [BATCH / batch(BATCH) for _ in range(5)]  # appends at this size (then the log is 5,000 longer)
        out.append(
            {
                "size": cp.size,
                "append_entries_per_s": round(statistics.median(rates)),
                "export_s": round(export_s, 3),
                "verify_s": round(verify_s, 3),
                "verify_entries_per_s": round(cp.size / verify_s),
            }
        )
    store.close()
    return out
