"""Crash safety: a real process appending and signing is SIGKILLed at random moments, then the log is checked.

After every kill the reopened log must be a consistent prefix of what the child was writing (whole batches,
entries and hashes in step), every checkpoint the child ever published must be consistent with the reopened
tree, and appending must go on from there.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from valise.crypto import sign
from valise.logservice import LogService
from valise.store.sqlite import SqliteLog
from valise.tlog import merkle

ORIGIN = "crash.example/log"
SEED = bytes(range(32))

CHILD = r"""
import random, sys
from pathlib import Path
from valise.crypto import sign
from valise.logservice import LogService
from valise.store.sqlite import SqliteLog

def entry(i):
    return b"crash entry %d " % i + bytes([i % 256]) * (i % 97)

store = SqliteLog.open(Path(sys.argv[1]))
log = LogService(store, sys.argv[2], sign.SigningKey(bytes.fromhex(sys.argv[3])), max_batch=64, max_pending=1024)
rng = random.Random(int(sys.argv[4]))
out = open(sys.argv[5], "a")
print("ready", flush=True)
while True:
    n = store.size()
    for i in range(n, n + rng.randint(1, 200)):
        log.add(entry(i), 0.0)
    log.flush()
    cp = log.sign()
    # Published only after sign() returned, i.e. after the checkpoint was saved with the store.
    out.write("%d %s\n" % (cp.size, cp.root.hex()))
    out.flush()
"""


def entry(i: int) -> bytes:
    return b"crash entry %d " % i + bytes([i % 256]) * (i % 97)


def published(path: Path) -> list[tuple[int, bytes]]:
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    # A line cut short by the kill has no newline after it: it was never fully published.
    return [(int(s), bytes.fromhex(h)) for s, h in (line.split() for line in lines[:-1])]


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_consistent_log(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    db = tmp_path / "log.db"
    out = tmp_path / "published.txt"
    key = sign.SigningKey(SEED)
    sizes_seen = []
    for round_ in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), ORIGIN, SEED.hex(), str(rng.randrange(2**32)), str(out)],
            stdout=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        assert child.returncode == -signal.SIGKILL

        context = f"(seed {seed}, round {round_})"
        with SqliteLog.open(db) as store:  # opening checks that hashes and entries are in step
            size = store.size()
            sizes_seen.append(size)
            assert store.entries(0, size) == [entry(i) for i in range(size)], context
            root = merkle.tree_hash(size, store)
            assert root == merkle.root_from_leaf_hashes([merkle.hash_leaf(entry(i)) for i in range(size)]), context
            cps = published(out)
            saved = store.load_checkpoint()
            assert saved is not None, context
            for cp_size, cp_root in cps:
                assert cp_size <= saved[0] <= size, context
                proof = merkle.consistency_proof(cp_size, size, store)
                merkle.verify_consistency(cp_size, size, proof, cp_root, root)
            # The service accepts the reopened store and signs on from where it stands.
            log = LogService(store, ORIGIN, key)
            assert log.sign().size == size, context
    assert sizes_seen == sorted(sizes_seen)
    assert sizes_seen[-1] > 0
    with SqliteLog.open(db) as store:
        log = LogService(store, ORIGIN, key)
        got, cp = log.append_and_sign([b"after the crashes"], now=0.0)
        assert got == range(sizes_seen[-1], sizes_seen[-1] + 1)
        assert cp.size == sizes_seen[-1] + 1
