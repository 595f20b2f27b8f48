"""valise against its peers, in one run on this machine: a TAXII 2.1 hub (medallion), a bare TLS relay, and the
Ed25519 crypto ceiling. Issue #7; docs/benchmarks.md explains every figure.

    .venv/bin/pip install -e '.[bench]'                       # medallion, taxii2-client, matplotlib, py-spy
    .venv/bin/python tools/bench/run.py                        # full run
    .venv/bin/python tools/bench/run.py --quick                # CI smoke size: under 2 minutes
    .venv/bin/python tools/bench/run.py --json OUT.json        # also write every figure as JSON
    .venv/bin/python tools/bench/run.py --plots DIR            # PNGs (default docs/benchmarks/)

The same work for every system: N members, member i publishes STIX 2.1 bundles of ~1 KiB (and a ~1 MB case)
to the next M members around a ring, and the recipients fetch them. Systems:
- valise-nodes: the real broker and one real node daemon per member (processes), publish = the node's `send`
  control op (what `valise send` does), receive = polling the `inbox` op (nodes.py);
- valise-wire: the real broker, members as wire-protocol tasks in this process (pre-sealed packets, real TLS,
  signed acknowledgements, witness cosignatures) — the broker's own throughput at scale (wire.py);
- bare relay: tools/relay_baseline.py, the same TLS transport with no crypto, policy or log (wire.py);
- medallion: OASIS's TAXII 2.1 reference server, memory backend, driven by taxii2-client (taxii.py);
- the crypto ceiling: pynacl Ed25519 verifications per second on every core, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
from common import REPO, machine, start_broker, start_relay, stix_bundle
from world import World, make_world

from valise.broker.home import BrokerHome

BIG = 1_000_000  # bytes of STIX JSON: the ~1 MB case (its packet fits the bare relay's 1 MiB frame)
SMALL = 1024


@dataclass
class Plan:
    quick: bool
    rounds: int
    headline_n: int
    headline_m: int
    headline_packets: int
    nodes_packets: int
    medallion_packets: int
    big_packets: int
    members: tuple[int, ...]
    curve_packets: int
    recipients_n: int
    recipients: tuple[int, ...]
    recipients_packets: int
    medallion_max_fan: int
    log_sizes: tuple[int, ...]


def plan_for(quick: bool) -> Plan:
    if quick:
        return Plan(True, 1, 8, 3, 400, 48, 80, 2, (2, 16, 64), 300, 64, (1, 10, 63), 16, 10, (1000, 10_000))
    return Plan(
        False, 3, 8, 3, 4000, 200, 300, 10, (2, 16, 64, 196), 3000, 196, (1, 10, 195), 120, 10,
        (1000, 10_000, 100_000, 1_000_000),
    )  # fmt: skip


_T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


# --- the crypto ceiling -------------------------------------------------------------------------------------


def _verify_for(seconds: float) -> int:
    from nacl.signing import SigningKey

    key = SigningKey(bytes(range(32)))
    signed = key.sign(os.urandom(600))  # a packet header's size
    vk = key.verify_key
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(200):
            vk.verify(signed)
        n += 200
    return n


def crypto_ceiling(seconds: float) -> dict[str, Any]:
    one = _verify_for(seconds) / seconds
    cpus = os.cpu_count() or 1
    with multiprocessing.get_context("fork").Pool(cpus) as pool:
        total = sum(pool.map(_verify_for, [seconds] * cpus)) / seconds
    return {"verify_per_s_1core": round(one), "verify_per_s_all_cores": round(total), "cores": cpus}


# --- summaries ----------------------------------------------------------------------------------------------


def summarise(rounds: list[dict[str, Any]], rss_peak: float | None) -> dict[str, Any]:
    def med(key: str) -> float:
        return float(statistics.median(x[key] for x in rounds))

    packets = sum(x["packets"] for x in rounds)
    out = {
        "packets_per_round": rounds[0]["packets"],
        "deliveries_per_round": rounds[0]["deliveries"],
        "packets_per_s": round(med("packets_per_s"), 1),
        "deliveries_per_s": round(med("deliveries_per_s"), 1),
        "p50_ms": round(med("p50_ms"), 2),
        "p99_ms": round(med("p99_ms"), 2),
        "cpu_s_per_1000_packets": round(sum(x["server_cpu_s"] for x in rounds) / packets * 1000, 3),
        "rss_peak_mib": None if rss_peak is None else round(rss_peak, 1),
        "errors": sum(x["errors"] for x in rounds),
        "rounds": len(rounds),
    }
    if "nodes_cpu_s" in rounds[0]:
        out["nodes_cpu_s_per_1000_packets"] = round(sum(x["nodes_cpu_s"] for x in rounds) / packets * 1000, 3)
    return out


@dataclass
class Work:
    label: str
    fans: dict[int, tuple[int, ...]]
    size: int
    packets: int  # per round (spread over the senders)
    depth: int


def spread(fans: dict[int, tuple[int, ...]], packets: int) -> list[int]:
    """Senders of `packets` packets, round robin over the members that send."""
    senders = sorted(fans)
    return [senders[k % len(senders)] for k in range(packets)]


def ring_fans(n: int, m: int) -> dict[int, tuple[int, ...]]:
    from wire import fan

    return {i: fan(n, i, m) for i in range(n)}


# --- servers ------------------------------------------------------------------------------------------------


def copy_broker(world: World, work: Path, name: str) -> Path:
    d = work / name
    shutil.copytree(world.template, d)
    return d


# --- valise-wire and the bare relay, side by side ------------------------------------------------------------


async def wire_config(world: World, work: Path, n: int, works: list[Work], rounds: int) -> dict[str, Any]:
    """One fresh broker and one relay for n connected members; every workload, valise and relay alternating."""
    import wire

    jobs: list[tuple[int, tuple[int, ...], int]] = []
    for w in works:
        jobs += [(s, w.fans[s], w.size) for s in spread(w.fans, w.packets)] * (rounds + 1)  # +1: warm-up
    t = time.perf_counter()
    sealed = wire.seal_many(world, jobs)
    say(f"  {n} members: sealed {len(sealed):,} packets in {time.perf_counter() - t:.1f} s")
    broker_dir = copy_broker(world, work, f"broker-wire-{n}")
    home = BrokerHome.open(broker_dir)
    cert = home.broker_identity().bundle.cert_der
    broker = start_broker(broker_dir, work)
    relay = start_relay(broker_dir, world.keys, work)
    shared = wire.Shared(home.log_key().public)
    out: dict[str, Any] = {}
    try:
        vm = [wire.ValiseMember(shared, i, world.members[i], world.keys / world.members[i].member_id) for i in range(n)]
        bm = [wire.BareMember(shared, i, world.members[i], world.keys / world.members[i].member_id) for i in range(n)]
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as conns:
                for m in (*vm, *bm):
                    conns.start_soon(m.connect, broker.port if isinstance(m, wire.ValiseMember) else relay.port, cert)
            for m in (*vm, *bm):
                nursery.start_soon(m.reader)
                nursery.start_soon(m.writer)
            await trio.sleep(1.2)  # the first checkpoint and its cosignatures
            out["rss_connected_mib"] = {"valise": broker.rss()["VmRSS"], "relay": relay.rss()["VmRSS"]}
            k = 0
            for w in works:
                per = len(spread(w.fans, w.packets))
                batches = [sealed[k + i * per : k + (i + 1) * per] for i in range(rounds + 1)]
                k += per * (rounds + 1)
                v_res, b_res = [], []
                await wire.run_round(shared, broker, vm, batches[0], w.depth)  # warm-up
                await wire.run_round(shared, relay, bm, baseline(batches[0]), w.depth)
                broker.reset_peak()
                relay.reset_peak()
                for i, pkts in enumerate(batches[1:]):
                    for side in ("v", "b") if i % 2 == 0 else ("b", "v"):
                        if side == "v":
                            v_res.append((await wire.run_round(shared, broker, vm, pkts, w.depth)).__dict__)
                        else:
                            b_res.append((await wire.run_round(shared, relay, bm, baseline(pkts), w.depth)).__dict__)
                out[w.label] = {
                    "valise-wire": summarise(v_res, broker.rss()["VmHWM"]),
                    "bare relay": summarise(b_res, relay.rss()["VmHWM"]),
                }
                v, b = out[w.label]["valise-wire"], out[w.label]["bare relay"]
                say(
                    f"  {w.label}: valise-wire {v['packets_per_s']:,.0f} pkt/s p99 {v['p99_ms']:.1f} ms; "
                    f"relay {b['packets_per_s']:,.0f} pkt/s p99 {b['p99_ms']:.1f} ms"
                    + (f"  [{v['errors']} errors]" if v["errors"] else "")
                )
            nursery.cancel_scope.cancel()
        for m in (*vm, *bm):
            await m.close()
    finally:
        broker.stop()
        relay.stop()
        shutil.rmtree(broker_dir, ignore_errors=True)
    return out


def baseline(pkts: list[Any]) -> list[Any]:
    """The same sizes and addressing, as opaque bodies whose first 16 bytes are a fresh id."""
    import wire

    out = []
    for p in pkts:
        pid = os.urandom(16)
        out.append(wire.Pkt(pid + bytes(len(p.data) - 16), 0, pid, b"", p.sender, p.to))
    return out


# --- valise end to end with node daemons -------------------------------------------------------------------


async def nodes_config(world: World, work: Path, n: int, works: list[Work], rounds: int) -> dict[str, Any]:
    import nodes

    broker_dir = copy_broker(world, work, "broker-nodes")
    broker = start_broker(broker_dir, work)
    started = []
    out: dict[str, Any] = {}
    try:
        started = nodes.start_nodes(world, work, n, broker.port)
        t = time.perf_counter()
        await nodes.wait_connected(started)
        say(f"  {n} node daemons connected and following the log in {time.perf_counter() - t:.1f} s")
        for w in works:
            res = []
            for r in range(rounds + 1):
                bundles: dict[int, list[bytes]] = {s: [] for s in w.fans}
                for s in spread(w.fans, w.packets):
                    bundles[s].append(stix_bundle(w.size, f"{s}"))
                if r == 1:
                    broker.reset_peak()
                got = await nodes.node_round(started, broker, w.fans, bundles, w.depth)
                if r > 0:  # the first is a warm-up
                    res.append(got)
            out[w.label] = {"valise-nodes": summarise(res, broker.rss()["VmHWM"])}
            out[w.label]["node_rss_mib"] = round(max(p.rss()["VmHWM"] for _, p in started), 1)
            v = out[w.label]["valise-nodes"]
            say(
                f"  {w.label}: valise-nodes {v['packets_per_s']:,.1f} pkt/s p50 {v['p50_ms']:.0f} p99 "
                f"{v['p99_ms']:.0f} ms"
                + (f"  [{v['errors']} errors: {res[-1]['error_sample']}]" if v["errors"] else "")
            )
    finally:
        for _, p in started:
            p.stop()
        broker.stop()
    return out


# --- medallion ---------------------------------------------------------------------------------------------


def medallion_config(work: Path, n: int, works: list[Work], rounds: int) -> dict[str, Any]:
    import taxii

    out: dict[str, Any] = {}
    for w in works:
        server = taxii.start_medallion(work, n)
        try:
            res = []
            for r in range(rounds + 1):
                bundles: dict[int, list[bytes]] = {s: [] for s in w.fans}
                for s in spread(w.fans, w.packets):
                    bundles[s].append(stix_bundle(w.size, f"{s}"))
                if r == 1:
                    server.reset_peak()
                got = taxii.run_round(server, n, w.fans, bundles, depth=w.depth)
                if r > 0:
                    res.append(got)
            out[w.label] = {"medallion": summarise(res, server.rss()["VmHWM"])}
            m = out[w.label]["medallion"]
            say(
                f"  {w.label}: medallion {m['packets_per_s']:,.1f} pkt/s p50 {m['p50_ms']:.0f} p99 {m['p99_ms']:.0f} ms"
                + (f"  [{m['errors']} errors: {res[-1]['error_sample']}]" if m["errors"] else "")
            )
        finally:
            server.stop()
    return out


# --- the whole run -----------------------------------------------------------------------------------------


def merge(into: dict[str, Any], more: dict[str, Any]) -> None:
    for k, v in more.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            into[k].update(v)
        else:
            into[k] = v


async def run(plan: Plan, work: Path) -> dict[str, Any]:
    import logcurve
    import wire

    t0 = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "plan": plan.__dict__, "started": time.strftime("%Y-%m-%d %H:%M")}
    say("crypto ceiling: pynacl Ed25519 verify")
    res["ceiling"] = crypto_ceiling(0.5 if plan.quick else 2.0)
    say(f"  {res['ceiling']}")
    nmax = max(max(plan.members), plan.recipients_n, plan.headline_n)
    t = time.perf_counter()
    world = make_world(work, nmax)
    say(f"world of {nmax} members in {time.perf_counter() - t:.1f} s")

    hn, hm = plan.headline_n, plan.headline_m
    head_fans, big_fans = ring_fans(hn, hm), {0: (1,)}
    depth = wire.depth_for(hn)
    say(f"headline: {hn} members, each to {hm} recipients; and the ~1 MB case (1 member to 1)")
    table: dict[str, Any] = {}
    merge(
        table,
        await wire_config(
            world, work, hn,
            [Work("small", head_fans, SMALL, plan.headline_packets, depth),
             Work("big", big_fans, BIG, plan.big_packets, 1)],
            plan.rounds,
        ),
    )  # fmt: skip
    merge(
        table,
        await nodes_config(
            world, work, hn,
            [Work("small", head_fans, SMALL, plan.nodes_packets, 2), Work("big", big_fans, BIG, plan.big_packets, 1)],
            plan.rounds,
        ),
    )  # fmt: skip
    merge(
        table,
        medallion_config(
            work, hn,
            [Work("small", head_fans, SMALL, plan.medallion_packets, depth),
             Work("big", big_fans, BIG, plan.big_packets, 1)],
            plan.rounds,
        ),
    )  # fmt: skip
    res["headline"] = table

    say("scale: members (each to 1 recipient)")
    members: dict[str, Any] = {}
    for n in plan.members:
        d = wire.depth_for(n)
        got = await wire_config(world, work, n, [Work("ring", ring_fans(n, 1), SMALL, plan.curve_packets, d)], 1)
        got["ring"].update(
            medallion_config(work, n, [Work("ring", ring_fans(n, 1), SMALL, plan.medallion_packets, d)], 1)["ring"]
        )
        members[str(n)] = got["ring"]
    res["members_curve"] = members

    say(f"scale: recipients per packet ({plan.recipients_n} members)")
    n = plan.recipients_n
    recips: dict[str, Any] = {}
    works = [
        Work(
            f"m{m}",
            ring_fans(n, m),
            SMALL,
            plan.curve_packets if m == 1 else plan.recipients_packets,
            wire.depth_for(n),
        )
        for m in plan.recipients
    ]
    got = await wire_config(world, work, n, works, 1)
    for m, w in zip(plan.recipients, works, strict=True):
        recips[str(m)] = got[w.label]
        if m <= plan.medallion_max_fan:
            mw = Work(w.label, w.fans, SMALL, min(w.packets, plan.medallion_packets), w.depth)
            recips[str(m)].update(medallion_config(work, n, [mw], 1)[w.label])
    res["recipients_curve"] = recips

    say("log: append and verification vs size")
    res["log_curve"] = logcurve.run(work, list(plan.log_sizes))
    for row in res["log_curve"]:
        say(f"  {row}")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# --- report ------------------------------------------------------------------------------------------------


SYSTEMS = ("valise-nodes", "valise-wire", "bare relay", "medallion")


def ratios(r: dict[str, Any]) -> dict[str, Any]:
    small = r["headline"]["small"]
    ceiling = r["ceiling"]["verify_per_s_all_cores"]
    # The broker verifies the header and every recipient's acknowledgement: 1 + M verifications per packet, so no
    # broker can relay more than verify/s ÷ (1 + M) packets/s on these cores, whatever else it does or skips.
    per_packet = ceiling / (1 + r["plan"]["headline_m"])
    out = {}
    for v in ("valise-nodes", "valise-wire"):
        x = small[v]["packets_per_s"]
        out[v] = {
            "vs medallion": round(x / small["medallion"]["packets_per_s"], 2),
            "vs bare relay": round(x / small["bare relay"]["packets_per_s"], 3),
            "vs crypto ceiling (packets/s over verify/s)": round(x / ceiling, 4),
            "vs per-packet crypto ceiling (packets/s over verify/s / (1 + M))": round(x / per_packet, 4),
        }
    return out


def report(r: dict[str, Any]) -> str:
    lines = []
    m = r["machine"]
    lines.append(f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, Python {m['python']}")
    c = r["ceiling"]
    lines.append(
        f"crypto ceiling: Ed25519 verify {c['verify_per_s_1core']:,}/s on 1 core, "
        f"{c['verify_per_s_all_cores']:,}/s on {c['cores']}"
    )
    p = r["plan"]
    for label, title in (
        ("small", f"{p['headline_n']} members, each to {p['headline_m']}, ~1 KiB STIX bundles"),
        ("big", "1 member to 1, ~1 MB STIX bundles"),
    ):
        lines.append("")
        lines.append(title)
        lines.append(
            f"  {'system':<13} {'pkts/round':>10} {'pkts/s':>9} {'deliv/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
            f" {'CPU s/1k pkts':>13} {'peak RSS':>9}"
        )
        for s in SYSTEMS:
            x = r["headline"][label].get(s)
            if not x:
                continue
            lines.append(
                f"  {s:<13} {x['packets_per_round']:>10,} {x['packets_per_s']:>9,.1f} {x['deliveries_per_s']:>9,.1f}"
                f" {x['p50_ms']:>8.1f} {x['p99_ms']:>8.1f} {x['cpu_s_per_1000_packets']:>13.2f}"
                f" {x['rss_peak_mib']:>7.0f} M" + (f"  ({x['errors']} errors)" if x["errors"] else "")
            )
    lines.append("")
    lines.append("ratios (1 KiB headline, packets/s):")
    for v, rr in ratios(r).items():
        lines.append(f"  {v}: " + ", ".join(f"{k} {x:,}" for k, x in rr.items()))
    for key, title in (("members_curve", "members (each to 1)"), ("recipients_curve", "recipients per packet")):
        lines.append("")
        lines.append(f"scale, {title}:  packets/s | p99 ms")
        for k, row in r[key].items():
            cells = [f"{s} {row[s]['packets_per_s']:,.0f} | {row[s]['p99_ms']:.0f}" for s in SYSTEMS if s in row]
            lines.append(f"  {k:>4}: " + ";  ".join(cells))
    lines.append("")
    lines.append("log: size, append entries/s, tree verify s (entries/s), full audit s (entries/s)")
    for row in r["log_curve"]:
        lines.append(
            f"  {row['size']:>9,}  {row['append_entries_per_s']:>9,}  {row['verify_s']:.3f} s "
            f"({row['verify_entries_per_s']:,}/s)  {row.get('audit_s', float('nan')):.3f} s "
            f"({row.get('audit_entries_per_s', 0):,}/s)"
        )
    lines.append(f"\ntotal {r['seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller rounds, curves up to 64 members, log to 10^4")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="write every figure to OUT as JSON")
    ap.add_argument("--plots", type=Path, default=REPO / "docs" / "benchmarks", help="where to write the PNGs")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    ap.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="write the tables as Markdown")
    ap.add_argument("--from-json", type=Path, default=None, metavar="IN", help="report (and plot) a saved run")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
    else:
        plan = plan_for(args.quick)
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="valise-bench-") as tmp:
            results = trio.run(run, plan, Path(tmp))
    results["ratios"] = ratios(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_plots:
        import plots

        for path in plots.write_all(results, args.plots):
            say(f"wrote {path}")
    if args.markdown is not None:
        import markdown

        args.markdown.write_text(markdown.render(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
