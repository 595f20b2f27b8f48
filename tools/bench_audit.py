"""Benchmark the auditor: tree checks, full verification with every signature, and the monitor's increment.

    .venv/bin/python tools/bench_audit.py [--entries 100000] [--jobs N] [--batch 1000] [--dir D]

The log is generated without the daemon, through LogService on a real SQLite store, with realistic entries:
genesis, 20 members admitted by the operator key, grants and acceptances signed by the members, then traffic
in the broker's proportions: packets (real packet v1 headers, 1-3 recipients, X25519 stanza sizes, signed by
the sender), one signed acknowledgement per recipient, and an occasional retraction and purge. It is exported
as tlog-tiles, then audited from the directory:

1. tree checks only (checkpoint, every entry hashed against the level-0 tiles and the signed root);
2. everything, every signature checked, with one process, then with --jobs worker processes;
3. the monitor: the state of run 2 saved, `--batch` new entries appended and signed (one checkpoint), exported,
   and the audit resumed from the state; reported as time per new checkpoint, plus state save and load times.

Target (issue #6): >= 100,000 entries/s for tree checks, >= 20,000 entries/s with every signature checked.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from valise import identity, records
from valise.audit import quorum
from valise.audit import state as audit_state
from valise.audit.source import DirSource
from valise.audit.verify import audit
from valise.crypto import padding, sign, stream
from valise.genesis import Genesis
from valise.labels import Labels
from valise.logservice import LogService
from valise.packet.format import (
    HEADER_DOMAIN,
    X25519_STANZA,
    X25519_STANZA_BODY,
    Core,
    Header,
    Stanza,
)
from valise.policy import records as prec
from valise.store.export import export_tiles
from valise.store.sqlite import SqliteLog
from valise.tlog import note

ORIGIN = "bench.valise/log"
CT_LEN = stream.ciphertext_size(padding.padded_size(20_000))  # a typical STIX bundle
NOW = 1_790_000_000


def _rng_bytes(rng: random.Random) -> object:
    return lambda n: rng.randbytes(n)


class Generator:
    def __init__(self, store: SqliteLog, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.log_key = sign.SigningKey(hashlib.sha256(b"bench log").digest())
        self.operator = sign.SigningKey(hashlib.sha256(b"bench operator").digest())
        self.service = LogService(store, ORIGIN, self.log_key, max_batch=4096, max_pending=1 << 20)
        rnd = _rng_bytes(self.rng)
        broker = identity.generate("broker", rnd, NOW)  # type: ignore[arg-type]
        self.members = {f"M{i:02d}": identity.generate(f"M{i:02d}", rnd, NOW) for i in range(20)}  # type: ignore[arg-type]
        self.seq = 0
        self.pending: list[bytes] = [Genesis(ORIGIN, self.operator.public, broker.bundle).entry()]
        for mid, ident in self.members.items():
            self.seq += 1
            self.pending.append(
                prec.dir_record(self.operator, ORIGIN, self.seq, NOW, "member-add", id=mid, kind="country",
                                name=mid, region="europe", bundle=ident.bundle.raw)
            )  # fmt: skip
        ids = list(self.members)
        for a in ids:
            for b in ids:
                if a != b:
                    self.pending.append(prec.grant(self.members[a].signing, origin=ORIGIN, author=a, created=NOW,
                                                   to=b, tlp="AMBER", categories=None))  # fmt: skip
                    self.pending.append(prec.accept(self.members[b].signing, origin=ORIGIN, author=b, created=NOW,
                                                    source=a, tlp="AMBER", categories=None))  # fmt: skip
        self.at = NOW
        self.count = 0

    def packet(self) -> list[bytes]:
        """One packet entry and the entries that follow it (acknowledgements, sometimes a retraction or purge)."""
        rng = self.rng
        ids = list(self.members)
        sender = rng.choice(ids)
        to = tuple(sorted(rng.sample([m for m in ids if m != sender], rng.randint(1, 3))))
        self.count += 1
        if self.count % 64 == 0:
            self.at += 1
        labels = Labels.make("AMBER", ["malware"])
        roll = rng.random()
        # A purged packet expires a second after it is logged, so its purge comes in the log's time order (an
        # audit holds log times to the record before them: a purge dated a day ahead would be a finding).
        expires = self.at + 1 if roll < 0.02 else self.at + 86400
        core = Core.make(rng.randbytes(16), self.at, expires, sender, to, labels)
        stanzas = tuple(Stanza(X25519_STANZA, r, rng.randbytes(X25519_STANZA_BODY)) for r in to)
        header = Header.encode(core, CT_LEN, rng.randbytes(32), rng.randbytes(32), stanzas)
        sig = self.members[sender].signing.sign(HEADER_DOMAIN, header)
        out = [records.packet_entry(header, sig, self.at)]
        digest = hashlib.sha256(header).digest()
        for r in to:
            if roll < 0.02:
                out.append(records.purge_entry(digest, r, expires))
            else:
                ack = records.Ack.make(self.members[r].signing, core.packet_id, digest, sender, r, self.at)
                out.append(records.ack_entry(ack))
        if roll > 0.99:
            out.append(records.retract_entry(
                records.Retraction.make(self.members[sender].signing, core.packet_id, digest, sender, "error", self.at)
            ))  # fmt: skip
        return out

    def fill(self, total: int) -> None:
        while self.service.store.size() + len(self.pending) < total:
            self.pending.extend(self.packet())
        entries, self.pending = self.pending[: total - self.service.store.size()], []
        for i in range(0, len(entries), 4096):
            self.service.append_and_sign(entries[i : i + 4096], 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=1000, help="entries per new checkpoint for the monitor figure")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-audit-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; work dir {work}")

    t = time.perf_counter()
    store = SqliteLog.open(work / "log.db")
    gen = Generator(store)
    gen.fill(args.entries)
    signed = gen.service.sign()
    print(f"generated {args.entries} entries in {time.perf_counter() - t:.1f} s")
    out = work / "tiles"
    t = time.perf_counter()
    export_tiles(out, signed.note, gen.service.tile, origin=ORIGIN)
    print(f"exported in {time.perf_counter() - t:.1f} s")

    policy = quorum.QuorumPolicy.simple(note.Ed25519Signer(ORIGIN, gen.log_key).verifier(), [], 0)
    source = DirSource(out)
    n = args.entries

    t = time.perf_counter()
    report = audit(source, policy, now=NOW, tree_only=True)
    dt = time.perf_counter() - t
    assert report.tree_verified
    print(f"tree checks:                 {n / dt:>10,.0f} entries/s  ({dt:.2f} s)")

    t = time.perf_counter()
    report = audit(source, policy, now=NOW)
    dt = time.perf_counter() - t
    assert report.clean, report.findings[:5]
    print(f"full, every signature, 1 process: {n / dt:>7,.0f} entries/s  ({dt:.2f} s)")
    s = report.summary
    print(f"  summary: {s['packets']} packets, {s['acks']} acks, {s['retractions']} retractions, {s['purges']} purges")

    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            t = time.perf_counter()
            report = audit(source, policy, now=NOW, executor=ex)
            dt = time.perf_counter() - t
        assert report.clean
        print(f"full, every signature, {args.jobs} processes: {n / dt:>5,.0f} entries/s  ({dt:.2f} s)")

    assert report.state is not None
    state_path = work / "audit.state"
    t = time.perf_counter()
    audit_state.save(state_path, report.state)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    held = audit_state.load(state_path, policy.log)
    load_s = time.perf_counter() - t
    size_mb = state_path.stat().st_size / 1e6
    print(f"state file: {size_mb:.1f} MB, save {save_s:.2f} s, load {load_s:.2f} s")

    rounds = 5
    times = []
    for _ in range(rounds):
        gen.fill(gen.service.store.size() + args.batch)
        signed = gen.service.sign()
        export_tiles(out, signed.note, gen.service.tile, origin=ORIGIN)
        t = time.perf_counter()
        report = audit(source, policy, now=NOW, state=held)
        times.append(time.perf_counter() - t)
        assert report.clean
        assert report.state is not None
        held = report.state
    per = sorted(times)[rounds // 2]
    print(f"monitor: {per * 1000:.0f} ms per new checkpoint of {args.batch} entries (median of {rounds}, 1 process,")
    print(f"         consistency proof from tiles + new entries; state save adds {save_s:.2f} s at this log size)")


if __name__ == "__main__":
    main()
