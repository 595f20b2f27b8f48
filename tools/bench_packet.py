#!/usr/bin/env python3
"""Packet v1 benchmark (not a test): medians in one run, side by side with the targets of issue #2.

    python tools/bench_packet.py           # full run (writes a 1 GiB packet to a temporary directory)
    python tools/bench_packet.py --quick   # fewer repetitions, 256 MiB for the RSS run

Figures: seal and open MB/s (payload bytes per second) at 1 KiB, 64 KiB and 64 MiB; seal time to 1, 10 and
195 recipients; inspect+verify per second of a 1 KiB packet next to pynacl's raw Ed25519 verify of the same
signed bytes (the ratio is the figure); peak RSS (ru_maxrss) of a subprocess opening a 1 GiB packet.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nacl.signing

from valise import identity, keyfiles, packet
from valise.packet import format as fmt

NOW = int(time.time())


def median_time(fn: Callable[[], object], repeat: int, inner: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def seal_bytes(sender: identity.Identity, to: list[identity.PublicBundle], payload: bytes) -> bytes:
    out = io.BytesIO()
    packet.seal(
        io.BytesIO(payload),
        out,
        sender=sender,
        recipients=to,
        tlp="AMBER",
        now=NOW,
        random=os.urandom,
        content_type="application/octet-stream",
    )
    return out.getvalue()


class Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        return len(b)  # type: ignore[arg-type]


def rss_run(fra: identity.Identity, deu: identity.Identity, size: int) -> str:
    """Seal a `size`-byte packet to a file, open it in a fresh subprocess, report its peak RSS.

    Linux keeps ru_maxrss across fork+exec, so a child started from a big parent reports the parent's size;
    this runs before the other measurements (the parent is small then), and the child also reports VmHWM
    from /proc/self/status, which exec resets."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        keyfiles.save_identity(d / "deu", deu, None)
        keyfiles.write_public(d / "FRA.pub", fra.bundle.raw)
        src, pkt = d / "payload", d / "packet"
        with open(src, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
        t = time.perf_counter()
        with open(src, "rb") as f, open(pkt, "wb") as out:
            packet.seal(
                f,
                out,
                sender=fra,
                recipients=[deu.bundle],
                tlp="RED",
                now=NOW,
                random=os.urandom,
                content_type="application/octet-stream",
            )
        t_seal = time.perf_counter() - t
        src.unlink()
        code = (
            "import resource, sys, time; from pathlib import Path; from valise import keyfiles, packet\n"
            "d = Path(sys.argv[1]); me = keyfiles.load_identity(d / 'deu'); s = keyfiles.load_bundle(d / 'FRA.pub')\n"
            "t = time.perf_counter()\n"
            "with open(d / 'packet', 'rb') as f, open('/dev/null', 'wb') as o:\n"
            "    r = packet.open(f, o, me=me, sender=s, now=int(time.time()))\n"
            "hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')]\n"
            "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(rss, hwm[0], time.perf_counter() - t, r.payload_size)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, check=True).stdout
        rss_kib, hwm_kib, secs, got = out.split()
        assert int(got) == size
    return (
        f"\n{size >> 20} MiB packet: seal to file {size / t_seal / 1e6:.0f} MB/s; open in a subprocess "
        f"{size / float(secs) / 1e6:.0f} MB/s, peak RSS: ru_maxrss {int(rss_kib) / 1024:.1f} MiB, "
        f"VmHWM {int(hwm_kib) / 1024:.1f} MiB (target ≤ 64 MiB)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description="packet v1 benchmark")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a 256 MiB RSS run")
    args = ap.parse_args()
    rep = 3 if args.quick else 7

    fra = identity.generate("FRA", os.urandom, NOW)
    crowd = [identity.generate(f"M{i:03d}", os.urandom, NOW) for i in range(195)]
    deu = crowd[0]
    rss_line = rss_run(fra, deu, (256 if args.quick else 1024) << 20)
    mode = "quick" if args.quick else "full"
    print(f"packet v1 benchmark ({mode}), python {sys.version.split()[0]}, {os.cpu_count()} CPUs")

    print("\nthroughput (payload MB/s, median)      seal        open")
    for label, size in (("1 KiB", 1024), ("64 KiB", 65536), ("64 MiB", 64 << 20)):
        payload = os.urandom(size)
        inner = max(1, (4 << 20) // size) if size < (1 << 20) else 1
        data = seal_bytes(fra, [deu.bundle], payload)
        t_seal = median_time(lambda: seal_bytes(fra, [deu.bundle], payload), rep, inner)  # noqa: B023

        def do_open() -> None:
            packet.open(io.BytesIO(data), Null(), me=deu, sender=fra.bundle, now=NOW)  # noqa: B023

        t_open = median_time(do_open, rep, inner)
        target = "   (target open ≥ 500 MB/s)" if size == 64 << 20 else ""
        print(f"  {label:>7}  {size / t_seal / 1e6:>27.0f} {size / t_open / 1e6:>11.0f}{target}")

    print("\nseal of 1 KiB to N recipients (median)")
    payload = os.urandom(1024)
    for n in (1, 10, 195):
        to = [m.bundle for m in crowd[:n]]
        t = median_time(lambda: seal_bytes(fra, to, payload), rep * 3)  # noqa: B023
        target = "   (target ≤ 25 ms)" if n == 195 else ""
        print(f"  {n:>4} recipients  {t * 1e3:8.2f} ms{target}")

    data = seal_bytes(fra, [deu.bundle], payload)
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    signed = fmt.HEADER_DOMAIN + head.header.raw
    vk = nacl.signing.VerifyKey(fra.bundle.sign_key)
    n = 2000 if args.quick else 5000
    t_raw = median_time(lambda: vk.verify(signed, head.signature), rep, n)
    t_insp = median_time(lambda: packet.inspect(io.BytesIO(data), sender=fra.bundle), rep, n)
    print("\ninspect+verify of a 1 KiB packet (parse, signature, ciphertext length and hash)")
    print(f"  raw Ed25519 verify (pynacl) {1 / t_raw:10.0f} /s")
    print(f"  inspect+verify              {1 / t_insp:10.0f} /s   ratio {t_raw / t_insp:.0%} (target ≥ 70%)")

    print(rss_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
