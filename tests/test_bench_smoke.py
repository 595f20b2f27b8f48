"""Smoke test of the peer benchmark (tools/bench/run.py --quick): it runs end to end and reports every figure.

No speed is asserted. It needs the `bench` extra (medallion, taxii2-client, matplotlib), which the README's test
command and `.ci/run` install; without it the test is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("medallion")
pytest.importorskip("taxii2client")
pytest.importorskip("matplotlib")

RUN = Path(__file__).resolve().parent.parent / "tools" / "bench" / "run.py"


@pytest.mark.slow
def test_quick_bench_reports_every_system(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # No --dir: the default temporary directory keeps the node control sockets' paths under sun_path's limit.
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--json", str(out), "--plots", str(tmp_path / "png")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    small = r["headline"]["small"]
    for system in ("valise-nodes", "valise-wire", "bare relay", "medallion"):
        assert small[system]["errors"] == 0, (system, small[system])
        assert small[system]["packets_per_s"] > 0
    assert r["ceiling"]["verify_per_s_all_cores"] > 0
    assert [row["size"] for row in r["log_curve"]] == [1000, 10_000]
    assert all(row["audit_entries_per_s"] > 0 for row in r["log_curve"])  # the real auditor ran, and found it clean
    assert {p.name for p in (tmp_path / "png").iterdir()} == {
        "headline.png",
        "members.png",
        "recipients.png",
        "log.png",
    }
