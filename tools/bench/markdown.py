"""The tables of docs/benchmarks.md, from a run's JSON (`run.py --markdown OUT`)."""

from __future__ import annotations

from typing import Any

SYSTEMS = ("valise-nodes", "valise-wire", "bare relay", "medallion")


def _num(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def headline(r: dict[str, Any], label: str) -> str:
    rows = [
        "| system | packets per round | packets/s | deliveries/s | p50 ms | p99 ms | server CPU s / 1,000 packets "
        "| server peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in SYSTEMS:
        x = r["headline"][label].get(s)
        if not x:
            continue
        rows.append(
            f"| {s} | {x['packets_per_round']:,} | {_num(x['packets_per_s'])} | {_num(x['deliveries_per_s'])} "
            f"| {_num(x['p50_ms'])} | {_num(x['p99_ms'])} | {_num(x['cpu_s_per_1000_packets'], 2)} "
            f"| {_num(x['rss_peak_mib'], 0)} |" + (f" ({x['errors']} errors)" if x["errors"] else "")
        )
    return "\n".join(rows)


def ratios(r: dict[str, Any]) -> str:
    rows = [
        "| | vs medallion | vs bare relay | vs crypto ceiling | vs per-packet crypto ceiling |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, x in r["ratios"].items():
        c = x["vs crypto ceiling (packets/s over verify/s)"]
        pp = x.get("vs per-packet crypto ceiling (packets/s over verify/s / (1 + M))")
        rows.append(
            f"| {v} (packets/s) | {x['vs medallion']:.2f}× | {x['vs bare relay']:.1%} | {c:.2%} "
            f"| {'—' if pp is None else f'{pp:.1%}'} |"
        )
    return "\n".join(rows)


def curve(r: dict[str, Any], key: str, what: str) -> str:
    present = [s for s in SYSTEMS if any(s in row for row in r[key].values())]
    head = f"| {what} | " + " | ".join(f"{s} packets/s | {s} p99 ms" for s in present) + " |"
    rows = [head, "|---:|" + "---:|" * (2 * len(present))]
    for k, row in r[key].items():
        cells = []
        for s in present:
            x = row.get(s)
            flag = f" ({x['errors']} errors)" if x and x["errors"] else ""
            cells += [_num(x["packets_per_s"]) + flag, _num(x["p99_ms"], 0)] if x else ["—", "—"]
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def log_table(r: dict[str, Any]) -> str:
    rows = [
        "| log size | durable append, entries/s | export tiles, s | recompute root from tiles, s | entries/s "
        "| full audit (`valise audit verify`), s | entries/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["log_curve"]:
        audit = (
            f"{x['audit_s']:.3f} | {x['audit_entries_per_s']:,}" if "audit_s" in x else "— | —"
        )  # older runs had no audit
        rows.append(
            f"| {x['size']:,} | {x['append_entries_per_s']:,} | {x['export_s']:.3f} | {x['verify_s']:.3f} "
            f"| {x['verify_entries_per_s']:,} | {audit} |"
        )
    return "\n".join(rows)


def render(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["ceiling"]
    parts = [
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}; "
        f"run started {r['started']}, took {r['seconds']} s.",
        f"Crypto ceiling: Ed25519 verify (pynacl) {c['verify_per_s_1core']:,}/s on one core, "
        f"{c['verify_per_s_all_cores']:,}/s on {c['cores']}.",
        "### ~1 KiB bundles\n\n" + headline(r, "small"),
        "### ~1 MB bundles\n\n" + headline(r, "big"),
        "### Ratios\n\n" + ratios(r),
        "### Members\n\n" + curve(r, "members_curve", "members"),
        "### Recipients per packet\n\n" + curve(r, "recipients_curve", "recipients"),
        "### Log\n\n" + log_table(r),
    ]
    return "\n\n".join(parts) + "\n"
