"""`valise demo` end to end: real daemons in real processes, through the real CLI (the README's main command)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from valise.cli.main import main


def test_demo_runs_verifies_and_leaves_inspectable_state(tmp_path: Path, capsys: object) -> None:
    root = tmp_path / "d"
    proc = subprocess.run(
        [sys.executable, "-m", "valise", "demo", "--dir", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    assert (summary["sent"], summary["relayed"]) == (6, 3)
    reasons = json.dumps(summary["denied"])
    assert "has not accepted category 'phishing'" in reasons  # ACME accepted only malware
    assert "has not accepted anything from DEU" in reasons  # the pair that does not consent
    assert "banned by operator rule" in reasons  # 'political'
    assert summary["delivered"] == {"DEU": 2, "ACME": 1, "NGA": 1}
    assert summary["acknowledged"] >= 3
    assert summary["audit"]["ok"] is True
    # The checkpoint carries the log's signature and the member nodes' cosignatures.
    assert summary["checkpoint"].count("\n— ") >= 3
    # --dir keeps a broker directory that the operator commands accept, and the nodes' directories.
    assert main(["broker", "info", "--dir", str(root / "broker"), "--json"]) == 0
    for member in ("FRA", "DEU", "NGA", "ACME"):
        assert (root / member / "config.json").is_file()
