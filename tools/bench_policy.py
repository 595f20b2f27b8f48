"""Benchmark the policy engine: decisions per second and the time to rebuild the state from the log.

    .venv/bin/python tools/bench_policy.py [--members 196] [--statements 10000] [--seconds 2]

Builds a directory of `--members` members (4 regional groups, 1 operation), about `--statements` signed
grants and acceptances (each member grants to and accepts from random others, plus a few group grants),
2 operator rules; then measures:
- decisions per second for a packet to 1 recipient (allowed, and denied with its reason built),
- decisions per second for a packet to all other members (and recipient verdicts per second),
- `policy matrix` (every channel between every pair of members),
- the time to fold every record into a new PolicyState, with and without signature verification;
- `valise policy show` on a broker directory whose log holds `--traffic` traffic records after the policy ones,
  with the public-entry index a running broker keeps and without it (a full fold), medians of 3 side by side;
- the time to fold `--traffic` traffic records (signed packet headers, acknowledgements, purges, as a relay logs
  them), which every fold meets far more often than policy records: through `PolicyState.apply` (which skips an
  entry that cannot be a policy record without decoding it), against decoding each (what it cost before), as
  µs per entry, medians of 3 passes side by side with their ratio. The broker folds the whole log when it
  starts, and every operator command does before it appends.
Keys and statements come from a fixed seed, so runs are comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from valise import encoding, identity, packet
from valise import records as traffic
from valise.broker.home import BrokerHome
from valise.broker.mailbox import Mailboxes
from valise.broker.readers import readers_of
from valise.cli.main import main as cli
from valise.crypto import sign
from valise.crypto.seeded import seeded_random
from valise.genesis import Genesis
from valise.policy import PacketMeta, PolicyState, channels, decide, records
from valise.store.sqlite import SqliteLog

ORIGIN = "bench.valise.example/log"
NOW = 1_790_000_000
REGIONS = ("africa", "americas", "asia-south-pacific", "europe")
CATS = ("malware", "phishing", "fraud", "ransomware", "botnet", "cyber-crime", "terrorism", "trafficking")
TLPS = ("CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED")


def build_log(op: sign.SigningKey, n_members: int, n_statements: int) -> tuple[list[bytes], list[str]]:
    rng = random.Random(7)
    ids = [f"M{i:03d}" for i in range(n_members)]
    idents = {m: identity.generate(m, seeded_random(m.encode()), NOW) for m in ids}
    log: list[bytes] = []
    seq = 0

    def operator(rtype: str, tag: str, /, **fields: object) -> None:
        nonlocal seq
        seq += 1
        make = records.dir_record if rtype == "dir" else records.rule_record
        log.append(make(op, ORIGIN, seq, NOW, tag, **fields))

    for i, m in enumerate(ids):
        kind = "partner" if i % 10 == 9 else "country"
        region = REGIONS[i % 4]
        operator("dir", "member-add", id=m, kind=kind, name=f"Member {i}", region=region, bundle=idents[m].bundle.raw)
    for r in REGIONS:
        operator("dir", "group-create", name=r, kind="region", start=None, end=None)
    operator("dir", "group-create", name="OP-1", kind="operation", start=NOW - 3600, end=NOW + 86_400)
    for i, m in enumerate(ids):
        operator("dir", "group-add", name=REGIONS[i % 4], id=m)
        if i % 7 == 0:
            operator("dir", "group-add", name="OP-1", id=m)
    operator("rule", "ban-category", category="political")
    operator("rule", "max-size", size=64 * 1024 * 1024)

    # Member 0 (the benchmark's sender) grants to and is accepted by everyone, so the 195-recipient packet is
    # allowed all the way through; the rest is random traffic of grants and acceptances.
    made = 0
    zero = idents[ids[0]].signing
    for other in ids[1:]:
        log.append(records.grant(zero, origin=ORIGIN, author=ids[0], created=NOW, to=other, tlp="AMBER"))
        key = idents[other].signing
        log.append(records.accept(key, origin=ORIGIN, author=other, created=NOW, source=ids[0], tlp="RED"))
        made += 2
    while made < n_statements:
        a, b = rng.sample(ids, 2)
        cats = sorted(rng.sample(CATS, rng.randint(1, 4))) if rng.random() < 0.7 else None
        tlp = rng.choice(TLPS)
        created = NOW - rng.randint(0, 10**6)
        key = idents[a].signing
        if rng.random() < 0.02:
            to = "group:" + rng.choice(REGIONS)
            log.append(records.grant(key, origin=ORIGIN, author=a, created=created, to=to, tlp=tlp, categories=cats))
        elif rng.random() < 0.5:
            log.append(records.grant(key, origin=ORIGIN, author=a, created=created, to=b, tlp=tlp, categories=cats))
        else:
            stmt = records.accept(key, origin=ORIGIN, author=a, created=created, source=b, tlp=tlp, categories=cats)
            log.append(stmt)
        made += 1
    return log, ids


def traffic_entries(ids: list[str], n: int) -> list[bytes]:
    """`n` traffic records in the proportions a relay logs them (a packet to 2 recipients, 2 acknowledgements,
    now and then a purge), made from 50 real sealed packets repeated: a fold does not care about repeats."""
    members = {m: identity.generate(m, seeded_random(m.encode()), NOW) for m in ids}
    kinds: list[bytes] = []
    for i in range(50):
        out = io.BytesIO()
        sender, *to = (members[m] for m in ids[i % 2 :][:3])
        packet.seal(io.BytesIO(bytes(1024)), out, sender=sender, recipients=[t.bundle for t in to], tlp="AMBER",
                    categories=["malware"], now=NOW, random=seeded_random(bytes([i])))  # fmt: skip
        head = packet.parse_head(out.getvalue())
        assert isinstance(head, packet.Head)
        kinds.append(traffic.packet_entry(head.header.raw, head.signature, NOW))
        for t in to:
            ack = traffic.Ack.make(t.signing, head.core.packet_id, head.digest, sender.member_id, t.member_id, NOW)
            kinds.append(traffic.ack_entry(ack))
        if i % 10 == 0:
            kinds.append(traffic.purge_entry(head.digest, to[0].member_id, NOW))
    return [kinds[i % len(kinds)] for i in range(n)]


def fold_traffic(op_key: bytes, entries: list[bytes]) -> None:
    def skip() -> None:
        state = PolicyState(ORIGIN, op_key)
        state.apply_all(entries)

    def decode() -> None:
        for e in entries:
            encoding.unpack(e, what="log entry", max_size=records.MAX_ENTRY_SIZE)

    n = len(entries)
    medians = {}
    for name, fn in (("skip", skip), ("decode", decode)):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        medians[name] = statistics.median(times) * 1e6 / n
    print(
        f"fold {n:,} traffic records: {medians['skip']:.2f} µs/entry through PolicyState.apply, "
        f"{medians['decode']:.2f} µs/entry decoding each (ratio {medians['decode'] / medians['skip']:.1f}x)"
    )


def operator_fold(home: BrokerHome, traffic_log: list[bytes]) -> None:
    """`valise policy show` on the broker directory with `traffic_log` appended after the policy records, with
    the public-entry index a running broker keeps in its mailbox database, then without it (a full fold)."""
    with SqliteLog.open(home.db_path) as store:
        start = store.size()
        for i in range(0, len(traffic_log), 50_000):
            store.append(traffic_log[i : i + 50_000])
        every = store.entries(0, store.size())
    mail = Mailboxes.open(home.mailbox_path)
    with mail.batch():  # what the broker records as it logs each entry
        mail.record_readers(0, [readers_of(e, lambda _: None) for e in every], every[-1])
    mail.close()
    medians = {}
    for name in ("index", "full"):
        if name == "full":
            home.mailbox_path.rename(home.mailbox_path.with_suffix(".away"))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                assert cli(["policy", "show", "--dir", str(home.root), "--json"]) == 0
            times.append(time.perf_counter() - t0)
        medians[name] = statistics.median(times)
    home.mailbox_path.with_suffix(".away").rename(home.mailbox_path)
    with SqliteLog.open(home.db_path) as store:
        size = store.size()
    print(
        f"valise policy show on {size:,} entries ({size - start:,} traffic): {medians['index'] * 1000:.0f} ms with "
        f"the broker's public-entry index, {medians['full'] * 1000:.0f} ms folding every entry "
        f"(ratio {medians['full'] / medians['index']:.1f}x)"
    )


def rate(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Calls per second of `fn`, timed over about `seconds`."""
    n, batch = 0, 1
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(batch):
            fn()
        n += batch
        batch = min(batch * 2, 10_000)
    return n / elapsed, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=196)
    ap.add_argument("--statements", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--traffic", type=int, default=200_000, help="traffic records to fold (default 200,000)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    home = BrokerHome.create(Path(tmp.name) / "broker", ORIGIN, "broker", seeded_random(b"broker"), NOW)
    op = home.operator_key()
    op_key = op.public
    t0 = time.perf_counter()
    log, ids = build_log(op, args.members, args.statements)
    print(f"built {len(log)} records ({sum(map(len, log)) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")

    for verify in (True, False):
        t0 = time.perf_counter()
        state = PolicyState(ORIGIN, op_key, verify_signatures=verify)
        state.apply_all(log)
        dt = time.perf_counter() - t0
        label = "with" if verify else "without"
        print(f"rebuild state {label} signature checks: {dt * 1000:.0f} ms ({len(log) / dt:,.0f} records/s)")
    fold_traffic(op_key, traffic_entries(ids[:4], args.traffic))
    live = sum(state.live.values())
    print(f"state: {len(state.members)} members, {len(state.groups)} groups, {live} live statements")

    sender = ids[0]
    one = PacketMeta(sender, (ids[1],), "AMBER", ("malware",), size=10_000, expires=NOW + 3600)
    assert decide(state, one, NOW).allowed
    denied = PacketMeta(ids[1], (ids[2],), "RED", ("terrorism",), size=10_000)
    denial = decide(state, denied, NOW)
    assert not denial.allowed
    everyone = PacketMeta(sender, tuple(ids[1:]), "AMBER", ("malware", "phishing"), size=10_000)
    d = decide(state, everyone, NOW)
    assert d.allowed, d.denied[:3]

    per_s, _ = rate(lambda: decide(state, one, NOW), args.seconds)
    print(f"decide, 1 recipient, allowed:   {per_s:,.0f} decisions/s ({1e6 / per_s:.1f} µs each)")
    per_s, _ = rate(lambda: decide(state, denied, NOW), args.seconds)
    print(f"decide, 1 recipient, denied:    {per_s:,.0f} decisions/s ({1e6 / per_s:.1f} µs each, with the reason)")
    print(f"  e.g. {denial.verdicts[0].reason}")
    per_s, _ = rate(lambda: decide(state, everyone, NOW), args.seconds)
    n = len(everyone.to)
    print(f"decide, {n} recipients, allowed: {per_s:,.0f} packets/s ({per_s * n:,.0f} recipient verdicts/s)")

    t0 = time.perf_counter()
    chans = channels(state, NOW)
    print(f"matrix: {len(chans)} channels among {len(ids)} members in {(time.perf_counter() - t0) * 1000:.0f} ms")

    # The commands as an operator runs them, on a real broker directory: read the SQLite log, fold it (with
    # signature checks), then answer.
    store = SqliteLog.open(home.db_path)
    store.append([Genesis(ORIGIN, op_key, home.broker_identity().bundle).entry(), *log])
    store.close()
    for argv in (
        ["policy", "matrix", "--json"],
        ["policy", "matrix", "--json", "--verify"],
        [
            "policy",
            "explain",
            "--from",
            ids[0],
            "--to",
            ",".join(ids[1:]),
            "--tlp",
            "AMBER",
            "--category",
            "malware",
            "--at",
            str(NOW),
        ],
    ):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli([*argv[:2], "--dir", str(home.root), *argv[2:]])
        print(
            f"valise {' '.join(argv[:2])}{' --verify' if '--verify' in argv else ''} "
            f"(whole command, {len(log) + 1} log entries): "
            f"{(time.perf_counter() - t0) * 1000:.0f} ms, exit {code}"
        )
    operator_fold(home, traffic_entries(ids[:4], args.traffic))
    tmp.cleanup()


if __name__ == "__main__":
    main()
