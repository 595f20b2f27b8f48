"""The PNGs of docs/benchmarks/ (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

COLORS = {"valise-nodes": "#1f77b4", "valise-wire": "#2ca02c", "bare relay": "#7f7f7f", "medallion": "#d62728"}
MARKERS = {"valise-nodes": "s", "valise-wire": "o", "bare relay": "^", "medallion": "D"}


def _plain_log(ax: Any) -> None:
    """Log y axis labelled 1, 10, 100, 1,000 rather than powers of ten; no minor labels."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _curve(ax: Any, rows: dict[str, Any], metric: str, label: str) -> None:
    for system in COLORS:
        xs = [int(k) for k, row in rows.items() if system in row and row[system].get(metric) == row[system].get(metric)]
        ys = [rows[str(x)][system][metric] for x in xs]
        if xs:
            ax.plot(xs, ys, marker=MARKERS[system], color=COLORS[system], label=system)
    ax.set_xscale("log")
    _plain_log(ax)
    ax.set_xlabel(label)
    ax.grid(True, which="both", alpha=0.3)


def _xticks(ax: Any, rows: dict[str, Any]) -> None:
    ticks = sorted(int(k) for k in rows)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()


def scale(r: dict[str, Any], key: str, xlabel: str, title: str, out: Path) -> Path:
    rows = r[key]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    _curve(a, rows, "packets_per_s", xlabel)
    a.set_ylabel("packets/s (published, available to every recipient)")
    a.set_title("throughput")
    _curve(b, rows, "p99_ms", xlabel)
    b.set_ylabel("p99 latency, publish → available (ms)")
    b.set_title("p99 latency")
    for ax in (a, b):
        _xticks(ax, rows)
    a.legend(loc="best", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def headline(r: dict[str, Any], out: Path) -> Path:
    small = r["headline"]["small"]
    systems = [s for s in COLORS if s in small]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    metrics = [
        ("packets_per_s", "packets/s (log scale)", True),
        ("p99_ms", "p99 latency, ms (log scale)", True),
        ("cpu_s_per_1000_packets", "server CPU s per 1,000 packets", False),
    ]
    for ax, (metric, label, log) in zip(axes, metrics, strict=True):
        vals = [small[s][metric] for s in systems]
        bars = ax.bar(systems, vals, color=[COLORS[s] for s in systems])
        ax.set_title(label)
        if log:
            _plain_log(ax)
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:,.1f}" if v < 100 else f"{v:,.0f}", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=9)  # fmt: skip
        ax.tick_params(axis="x", labelrotation=20)
    ceiling = r["ceiling"]["verify_per_s_all_cores"]
    axes[0].axhline(ceiling, color="black", linestyle="--", linewidth=1)
    axes[0].annotate(f"Ed25519 verify ceiling {ceiling:,}/s", (0, ceiling), va="bottom", fontsize=8)
    # 1 + M verifications per packet (header, and each recipient's acknowledgement): the most any broker could relay.
    per_packet = ceiling // (1 + r["plan"]["headline_m"])
    axes[0].axhline(per_packet, color="black", linestyle=":", linewidth=1)
    axes[0].annotate(f"per-packet ceiling {per_packet:,}/s", (0, per_packet), va="bottom", fontsize=8)
    p = r["plan"]
    fig.suptitle(f"{p['headline_n']} members, each publishing ~1 KiB STIX bundles to {p['headline_m']} recipients")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def log_curve(r: dict[str, Any], out: Path) -> Path:
    rows = r["log_curve"]
    xs = [row["size"] for row in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(xs, [row["append_entries_per_s"] for row in rows], marker="o", color=COLORS["valise-wire"])
    a.set_ylabel("durable appends, entries/s")
    a.set_title("log append vs log size")
    b.plot(xs, [row["verify_s"] for row in rows], marker="o", color=COLORS["valise-nodes"], label="tree from tiles")
    if all("audit_s" in row for row in rows):
        audits = [row["audit_s"] for row in rows]
        b.plot(xs, audits, marker="s", color="#9467bd", label="full audit (every signature, policy replay)")
    b.legend()
    b.set_ylabel("seconds")
    b.set_title("verification of the whole log vs log size")
    a.set_ylim(bottom=0)  # a rate that barely moves: a linear axis from 0 shows that honestly
    a.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    _plain_log(b)
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("log size (entries)")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_all(r: dict[str, Any], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    n = r["plan"]["recipients_n"]
    return [
        headline(r, directory / "headline.png"),
        scale(
            r, "members_curve", "members (each packet to 1 recipient)", "scale with members", directory / "members.png"
        ),
        scale(
            r,
            "recipients_curve",
            f"recipients per packet ({n} members)",
            "scale with recipients per packet",
            directory / "recipients.png",
        ),
        log_curve(r, directory / "log.png"),
    ]
