"""Benchmark of the durable transparency log (issue #3), medians side by side in one run.

    .venv/bin/python tools/bench_log.py                # 1,000,000 entries
    .venv/bin/python tools/bench_log.py --quick        # 100,000 entries, one recompute pass
    .venv/bin/python tools/bench_log.py --entries N --json

1. durable append rate: 300-byte entries appended to a SQLite log in batches (one fsynced transaction each);
   the median over batches of batch size / batch time.                          target >= 20,000 entries/s
2. inclusion proof generation at N entries: the median over 1,000 random leaves.  target <= 1 ms
3. recomputing the root of the exported log from its tiles (checkpoint signature, every entry against its
   level-0 tile, every level against the one below, the root): N / median time. target >= 200,000 entries/s
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from valise.crypto import sign
from valise.logservice import LogService
from valise.store.export import export_tiles, verify_export
from valise.store.sqlite import SqliteLog
from valise.tlog import merkle

ORIGIN = "bench.example/log"
ENTRY_SIZE = 300


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=None, help="log size (default 1,000,000; --quick 100,000)")
    ap.add_argument("--batch", type=int, default=1000, help="entries per append transaction (default 1000)")
    ap.add_argument("--quick", action="store_true", help="a smaller log and a single recompute pass")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    n = args.entries or (100_000 if args.quick else 1_000_000)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = run(Path(tmp), n, args.batch, 1 if args.quick else 3)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


def run(work: Path, n: int, batch: int, passes: int) -> dict[str, object]:
    rnd = random.Random(1)
    key = sign.SigningKey(bytes(32))
    store = SqliteLog.open(work / "log.db")
    log = LogService(store, ORIGIN, key)
    payload = os.urandom(ENTRY_SIZE * 2)

    # 1. durable appends, one transaction per batch
    times = []
    total = time.perf_counter()
    for start in range(0, n, batch):
        entries = [
            start.to_bytes(8, "big") + i.to_bytes(4, "big") + payload[(i * 7) % ENTRY_SIZE :][: ENTRY_SIZE - 12]
            for i in range(min(batch, n - start))
        ]
        t = time.perf_counter()
        store.append(entries)
        times.append((time.perf_counter() - t) / len(entries))
    total = time.perf_counter() - total
    append_rate = 1 / statistics.median(times)
    cp = log.sign()

    # 2. inclusion proofs at size n
    proof_times = []
    for _ in range(1000):
        index = rnd.randrange(n)
        t = time.perf_counter()
        proof = log.inclusion_proof(index)
        proof_times.append(time.perf_counter() - t)
        assert len(proof) <= 2 * n.bit_length()
    leaf = merkle.hash_leaf(store.entries(index, index + 1)[0])
    merkle.verify_inclusion(leaf, index, n, proof, cp.root)  # the last one, as a sanity check
    proof_ms = statistics.median(proof_times) * 1000

    # 3. export, then recompute the root from the tiles
    out = work / "site"
    t = time.perf_counter()
    export_tiles(out, cp.note, log.tile, origin=ORIGIN)
    export_s = time.perf_counter() - t
    store.close()
    verify_times = []
    for _ in range(passes):
        t = time.perf_counter()
        got = verify_export(out, log.verifier)
        verify_times.append(time.perf_counter() - t)
        assert got.root == cp.root
    recompute_rate = n / statistics.median(verify_times)
    return {
        "entries": n,
        "batch": batch,
        "entry_size": ENTRY_SIZE,
        "append_entries_per_s": round(append_rate),
        "append_overall_entries_per_s": round(n / total),
        "inclusion_proof_ms": round(proof_ms, 4),
        "export_s": round(export_s, 2),
        "recompute_entries_per_s": round(recompute_rate),
        "targets": {"append_entries_per_s": 20_000, "inclusion_proof_ms": 1.0, "recompute_entries_per_s": 200_000},
    }


def print_table(r: dict[str, object]) -> None:
    targets = r["targets"]
    assert isinstance(targets, dict)
    rows = [
        ("durable append (median over batches)", f"{r['append_entries_per_s']:,} entries/s", ">= 20,000/s",
         int(r["append_entries_per_s"]) >= targets["append_entries_per_s"]),  # type: ignore[call-overload]
        (f"inclusion proof at {r['entries']:,} entries (median)", f"{r['inclusion_proof_ms']} ms", "<= 1 ms",
         float(r["inclusion_proof_ms"]) <= targets["inclusion_proof_ms"]),  # type: ignore[arg-type]
        ("recompute root from exported tiles (median)", f"{r['recompute_entries_per_s']:,} entries/s", ">= 200,000/s",
         int(r["recompute_entries_per_s"]) >= targets["recompute_entries_per_s"]),  # type: ignore[call-overload]
    ]  # fmt: skip
    print(f"log of {r['entries']:,} entries of {r['entry_size']} bytes, batches of {r['batch']}")
    print(f"{'measure':<52} {'median':>22} {'target':>14}  ok")
    for name, value, target, ok in rows:
        print(f"{name:<52} {value:>22} {target:>14}  {'yes' if ok else 'NO'}")
    print(f"(append overall incl. batch building: {r['append_overall_entries_per_s']:,} entries/s; "
          f"export: {r['export_s']} s)")  # fmt: skip


if __name__ == "__main__":
    main()
