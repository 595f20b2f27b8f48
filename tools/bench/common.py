"""Shared pieces of the benchmarks (tools/bench/ and tools/bench_broker.py): STIX bundles, server subprocesses
(the broker, the bare relay; CPU and RSS from /proc), the witness check members share, percentiles, the
machine's description."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import trio

from valise import tls
from valise.broker.home import BrokerHome
from valise.tlog import checkpoint, note
from valise.tlsstream import TLSSocketStream

PYTHON = sys.executable
TOOLS = Path(__file__).resolve().parent.parent
REPO = TOOLS.parent
KiB, MiB = 1 << 10, 1 << 20


def stix_bundle(size: int, tag: str = "") -> bytes:
    """A STIX 2.1 bundle of one indicator, padded in its description to `size` bytes of JSON (ids unique, so a
    TAXII server that deduplicates by id and version stores every one)."""
    oid = f"indicator--{uuid.uuid4()}"
    obj = {
        "type": "indicator",
        "spec_version": "2.1",
        "id": oid,
        "created": "2026-11-25T00:00:00.000Z",
        "modified": "2026-11-25T00:00:00.000Z",
        "name": f"bench {tag}",
        "description": "",
        "pattern": "[ipv4-addr:value = '203.0.113.7']",
        "pattern_type": "stix",
        "valid_from": "2026-11-25T00:00:00Z",
    }
    bundle = {"type": "bundle", "id": f"bundle--{uuid.uuid4()}", "objects": [obj]}
    base = len(json.dumps(bundle).encode())
    obj["description"] = "x" * max(0, size - base)
    return json.dumps(bundle).encode()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Proc:
    """A server subprocess; `port` is parsed from the first stdout line holding `pattern` (None: no wait)."""

    def __init__(self, argv: list[str], log_path: Path, pattern: str | None, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE if pattern else self.log, stderr=self.log, env={**os.environ, **(env or {})}
        )
        self.pid = self.proc.pid
        self.port = 0
        self._ticks = os.sysconf("SC_CLK_TCK")
        if pattern is not None:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().decode()
            if pattern not in line:
                self.stop()
                raise SystemExit(f"server did not start ({' '.join(argv[:5])}...): {line!r}; see {log_path}")
            self.port = int(line.split(pattern, 1)[1].strip().split()[0].rsplit(":", 1)[1].rstrip(","))

    def cpu(self) -> float:
        """User + system CPU seconds used so far by the process (its threads included)."""
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """User and system CPU seconds used so far (system: the kernel's share, where file-system work shows)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / self._ticks, int(fields[12]) / self._ticks

    def rss(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak) in MiB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
        return out

    def reset_peak(self) -> None:
        """Reset VmHWM to the current RSS (Linux clear_refs 5), so a peak belongs to one phase."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(mem / (1 << 30), 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


async def open_member_tls(keydir: Path, name: str, port: int, broker_cert: bytes) -> TLSSocketStream:
    """A member's TLS connection to the broker (or the baseline relay) on 127.0.0.1, the way `valise node` opens
    it: the member's certificate, the broker pinned, OpenSSL on the socket (valise.tlsstream)."""
    ctx = tls.client_context(keydir / f"{name}.tls.crt", keydir / f"{name}.tls.key", broker_cert)
    stream = TLSSocketStream.wrap(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_side=False)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


def start_broker(broker_dir: Path, logs: Path) -> Proc:
    """`valise broker serve` on a free port of 127.0.0.1, in its own process (so its CPU and memory are its own)."""
    argv = [PYTHON, "-m", "valise", "broker", "serve", "--dir", str(broker_dir), "--listen", "127.0.0.1:0"]
    return Proc(argv, logs / f"{broker_dir.name}.log", "listening on")


def start_relay(broker_dir: Path, keys: Path, logs: Path) -> Proc:
    """tools/relay_baseline.py with the broker's TLS identity, admitting the members whose keys are in `keys`."""
    home = BrokerHome.open(broker_dir)
    ident = home.identity_dir / home.config().broker_id
    argv = [PYTHON, str(TOOLS / "relay_baseline.py"), "--cert", str(ident.with_suffix(".tls.crt")),
            "--key", str(ident.with_suffix(".tls.key")), "--members", str(keys)]  # fmt: skip
    return Proc(argv, logs / f"relay-{broker_dir.name}.log", "listening on")


class WitnessCache:
    """The witness check every member task makes before cosigning (the log's signature, and consistency with the
    older checkpoint named in the request), done once per request for all of them: members in one process would
    otherwise repeat the same verification hundreds of times and measure the client, not the broker."""

    def __init__(self, origin: str, log_key: bytes) -> None:
        self.origin = origin
        self.verifier = note.Ed25519Verifier(origin, log_key)
        self.checkpoints: dict[tuple[bytes, int], checkpoint.Checkpoint] = {}
        self.roots: dict[int, bytes] = {}

    def check(self, signed: bytes, old: int, proof: tuple[bytes, ...]) -> checkpoint.Checkpoint:
        key = (signed, old)
        cp = self.checkpoints.get(key)
        if cp is None:
            cp, _ = checkpoint.open_checkpoint(signed, self.verifier, origin=self.origin)
            if old in self.roots and old > 0:
                checkpoint.check_newer(checkpoint.Checkpoint(self.origin, old, self.roots[old]), cp, proof)
            self.roots[cp.size] = cp.root
            self.checkpoints[key] = cp
        return cp
