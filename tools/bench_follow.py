"""Benchmark what a node spends following its broker's log: checking and folding the entries of one checkpoint.

    .venv/bin/python tools/bench_follow.py [--packets 5000] [--runs 5]

Builds a real log (LogService over MemoryLog, real signatures) holding `--packets` packets from DEU to FRA and
FRA's acknowledgement of each. Two nodes follow it from the genesis record as a broker serves it: FRA's, to which
every entry is its own traffic (served in full: verifying its leaf hash, deciding what the fold needs, folding,
one inbox lookup per packet, in a real node store whose inbox holds every packet, as after deliveries), and NLD's,
to which none is (served as complete-subtree hashes). Reports the medians of `--runs` follows of each, side by
side, in ms and in µs per log entry, and their ratio.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

from valise import identity, packet, records
from valise.broker.readers import EVERYONE, readers_of
from valise.crypto import sign
from valise.crypto.seeded import seeded_random
from valise.genesis import Genesis
from valise.logservice import LogService
from valise.node.follower import Follower
from valise.node.store import NodeStore
from valise.policy import records as policy_records
from valise.store.memory import MemoryLog
from valise.tlog import merkle

ORIGIN = "bench.valise.example/log"
NOW = 1_790_000_000
PAGE = 256


def _packet(sender: identity.Identity, to: identity.Identity, seed: bytes) -> packet.Head:
    out = io.BytesIO()
    packet.seal(io.BytesIO(b"indicator"), out, sender=sender, recipients=[to.bundle], tlp="AMBER", now=NOW,
                random=seeded_random(seed))  # fmt: skip
    head = packet.parse_head(out.getvalue())
    assert isinstance(head, packet.Head)
    return head


class World:
    def __init__(self, n: int) -> None:
        rnd = seeded_random(b"bench-follow")
        self.operator = sign.SigningKey(rnd(32))
        self.service = LogService(MemoryLog(), ORIGIN, sign.SigningKey(rnd(32)))
        broker = identity.generate("broker", seeded_random(b"broker"), NOW)
        self.members = {m: identity.generate(m, seeded_random(m.encode()), NOW) for m in ("FRA", "DEU", "NLD")}
        entries = [Genesis(ORIGIN, self.operator.public, broker.bundle).entry()]
        for seq, m in enumerate(self.members.values(), 1):
            b = m.bundle
            add = {"id": b.member_id, "kind": "country", "name": b.member_id, "region": "EU", "bundle": b.raw}
            entries.append(policy_records.dir_record(self.operator, ORIGIN, seq, NOW, "member-add", **add))
        fra, deu = self.members["FRA"], self.members["DEU"]
        self.inbox: list[packet.Head] = []
        for i in range(n):
            head = _packet(deu, fra, b"mine %d" % i)
            self.inbox.append(head)
            ack = records.Ack.make(fra.signing, head.core.packet_id, head.digest, "DEU", "FRA", NOW)
            entries += [records.packet_entry(head.header.raw, head.signature, NOW), records.ack_entry(ack)]
        _, cp = self.service.append_and_sign(entries, 0.0)
        self.note = cp.note

    def pages(self, member: str) -> list[tuple[int, list[bytes], list[int], list[int]]]:
        """The `entries` answers a broker gives `member` from 0 to the end (its traffic in full, others' hashed)."""
        store = self.service.store
        out = []
        start, size = 0, store.size()
        while start < size:
            end = min(size, start + 4 * PAGE)
            readable = [start + i for i, e in enumerate(store.entries(start, end)) if _readable(e, member)]
            plan = merkle.covering(start, end, readable, PAGE)
            hashes = store.read_hashes([merkle.stored_hash_index(lv, at >> lv) for at, lv in plan if lv is not None])
            items: list[bytes] = []
            hashed: list[int] = []
            levels: list[int] = []
            for at, level in plan:
                if level is None:
                    items.append(store.entries(at, at + 1)[0])
                else:
                    hashed.append(len(items))
                    levels.append(level)
                    items.append(hashes.pop(0))
            out.append((start, items, hashed, levels))
            start += len(items) - len(hashed) + sum(1 << lv for lv in levels)
        return out


def _readable(entry: bytes, member: str) -> bool:
    """The broker's rule (broker/readers.py): who may read an entry in full."""
    readers = readers_of(entry, lambda _digest: None)
    return EVERYONE in readers or member in readers


Pages = list[tuple[int, list[bytes], list[int], list[int]]]


def follow(world: World, pages: Pages, member: str, store: NodeStore | None = None) -> float:
    """Seconds for `member`'s follower to verify and fold the whole log (with `store` as its node's store)."""
    f = Follower(world.service.verifier.vkey(), member, "broker")
    if store is not None:
        f.in_inbox = store.inbox_has
        f.retraction_wanted = store.retraction_wanted
    start = time.perf_counter()
    update = f.begin(world.note)
    assert update is not None
    for page in pages:
        update.add(*page)
    f.commit(update)
    return time.perf_counter() - start


def follow_as_recipient(world: World, pages: Pages, root: Path) -> float:
    store = NodeStore.open(root)
    try:
        for head in world.inbox:
            store.inbox_add(head.digest, head.core.packet_id, "DEU", NOW, {}, b"kept encrypted")
        return follow(world, pages, "FRA", store)
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"building a log: {args.packets} packets DEU->FRA and FRA's acknowledgements ...")
    world = World(args.packets)
    fra_pages, nld_pages = world.pages("FRA"), world.pages("NLD")
    fra, nld = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            fra.append(follow_as_recipient(world, fra_pages, Path(tmp) / f"node-{run}"))
            nld.append(follow(world, nld_pages, "NLD"))
            print(f"  run {run + 1}/{args.runs}", end="\r", flush=True)
    print()
    size = world.service.store.size()
    fra_ms, nld_ms = statistics.median(fra) * 1e3, statistics.median(nld) * 1e3
    print(f"log of {size} entries, medians of {args.runs} follows:")
    print(f"  FRA (all its own traffic, in full): {fra_ms:8.1f} ms  {fra_ms / size * 1e3:6.2f} µs/entry")
    print(f"  NLD (none of it, as hashes):        {nld_ms:8.1f} ms  {nld_ms / size * 1e3:6.2f} µs/entry")
    print(f"  ratio FRA / NLD: {fra_ms / nld_ms:.1f}")


if __name__ == "__main__":
    main()
