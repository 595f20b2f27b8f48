"""`valise demo` end to end: real daemons in real processes, through the real CLI (the README's main command)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
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
    assert (summary["sent"], summary["relayed"]) == (7, 4)  # one of them after NGA's move (below)
    reasons = json.dumps(summary["denied"])
    assert "has not accepted category 'phishing'" in reasons  # ACME accepted only malware
    assert "has not accepted anything from DEU" in reasons  # the pair that does not consent
    assert "banned by operator rule" in reasons  # 'political'
    assert summary["delivered"] == {"DEU": 2, "ACME": 1, "NGA": 2}
    # NGA moved to new keys: it read what was sealed to its old one, and got a packet sealed to the new one.
    rotation = summary["rotation"]
    assert (rotation["member"], rotation["read_before"]) == ("NGA", True)
    assert rotation["rekey_index"] < summary["log_size"]
    assert summary["acknowledged"] >= 3
    assert summary["audit"]["ok"] is True
    # The checkpoint carries the log's signature and the member nodes' cosignatures.
    assert summary["checkpoint"].count("\n— ") >= 3
    # --dir keeps a broker directory that the operator commands accept, and the nodes' directories.
    assert main(["broker", "info", "--dir", str(root / "broker"), "--json"]) == 0
    for member in ("FRA", "DEU", "NGA", "ACME"):
        assert (root / member / "config.json").is_file()

    # ... and the commands it prints run it again where it stopped: the broker on its port, a node reconnecting.
    restart = [shlex.split(c.removesuffix(" &").removeprefix("valise ")) for c in summary["restart"]]
    assert len(restart) == 5
    logs = [tmp_path / "broker.log", tmp_path / "node.log"]
    procs = []
    for argv, log in zip(restart[:2], logs, strict=True):
        with log.open("wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "valise", *argv], stdout=out, stderr=out))
    try:
        status: dict[str, object] = {}
        deadline = time.monotonic() + 60  # a safety net against a hang, not a timed assertion
        while not status.get("connected") and time.monotonic() < deadline:
            time.sleep(0.2)
            proc = subprocess.run(
                [sys.executable, "-m", "valise", "status", "--node", str(root / "FRA"), "--json"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            status = json.loads(proc.stdout) if proc.returncode in (0, 3) and proc.stdout else {}
        assert status.get("connected") is True, [log.read_text()[-1000:] for log in logs]
        assert status["log"]["size"] == summary["log_size"]  # type: ignore[index]
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)
