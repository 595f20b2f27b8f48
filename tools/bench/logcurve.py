"""The log's costs as it grows: durable append rate, and verification of the whole log from its tiles.

At each size (10^3, 10^4, ...) the bench measures, on two logs grown side by side:
- append: the broker's own SqliteLog (WAL, one fsynced transaction per batch of 1,000 entries of 300 bytes, the
  size of a 1 KiB packet's log entry): entries/s over the next batches (median of 5 batches of 1,000), i.e. what
  group commit costs there;
- tree verification: the log signs a checkpoint, exports its C2SP tlog-tiles (valise.store.export.export_tiles,
  the layout auditors mirror), then valise.store.export.verify_export recomputes the root from the tiles (the
  checkpoint signature, every entry bundle against its level-0 tile, every tile level against the one below);
- the audit: a log of realistic records (tools/bench_audit.py's generator: genesis, members, signed grants and
  acceptances, then packets with real signed headers, their recipients' signed acknowledgements, retractions and
  purges) exported as tiles and audited by valise.audit.verify.audit, what `valise audit verify` runs: the tree,
  every signature, and every relay replayed against the policy in force, on every core.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from common import TOOLS

from valise.crypto import sign
from valise.logservice import LogService
from valise.store.export import export_tiles, verify_export
from valise.store.sqlite import SqliteLog

sys.path.insert(0, str(TOOLS))
import bench_audit  # the realistic log generator (a sibling tool)

from valise.audit import quorum
from valise.audit.source import DirSource
from valise.audit.verify import audit
from valise.tlog import note

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

    real = _RealLog(work)
    for size in sizes:
        while n < size:
            batch(min(BATCH, size - n))
        audit_s = real.audit_at(size)
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
                "audit_s": round(audit_s, 3),
                "audit_entries_per_s": round(size / audit_s),
            }
        )
    store.close()
    real.close()
    return out


class _RealLog:
    """A log of realistic, signed records, grown to each size and audited in full from its exported tiles."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.store = SqliteLog.open(work / "audit-curve.db")
        self.gen = bench_audit.Generator(self.store)
        verifier = note.Ed25519Signer(bench_audit.ORIGIN, self.gen.log_key).verifier()
        self.policy = quorum.QuorumPolicy.simple(verifier, [], 0)
        self.pool = ProcessPoolExecutor(os.cpu_count() or 1)

    def audit_at(self, size: int) -> float:
        """Grow the log to `size` entries, export it, and return the seconds a full audit of it takes."""
        self.gen.fill(size)
        signed = self.gen.service.sign()
        site = self.work / f"audit-tiles-{signed.size}"
        export_tiles(site, signed.note, self.gen.service.tile, origin=bench_audit.ORIGIN)
        t = time.perf_counter()
        report = audit(DirSource(site), self.policy, now=bench_audit.NOW, executor=self.pool)
        seconds = time.perf_counter() - t
        if not report.clean:
            raise SystemExit(f"the audit of the generated log found problems: {report.findings[:3]}")
        shutil.rmtree(site)
        return seconds

    def close(self) -> None:
        self.pool.shutdown()
        self.store.close()
