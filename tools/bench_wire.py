"""How fast is the sans-IO wire state machine by itself (no TLS, no sockets)?

    python tools/bench_wire.py [--packets N] [--mib M]

- small: N submissions of a 1 KiB packet (begin with a 300-byte head, one chunk, end), each answered by a
  receipt, pumped through a ConnectionPair in memory: packets/s for both sides' encode + decode + grammar;
- bulk: M MiB uploaded in 256 KiB chunks with credit granted back as chunks are consumed: MiB/s, and the most
  bytes the receiving connection ever buffered (fed in 64 KiB reads).
"""

from __future__ import annotations

import argparse
import time

from valise.wire import Credit, Receipt, Role, SubmitBegin, SubmitChunk, SubmitEnd
from valise.wire.connection import READ_SIZE
from valise.wire.pair import ConnectionPair, drain


def small(n: int) -> float:
    pair = ConnectionPair()
    pair.handshake()
    head, body = b"h" * 300, b"c" * 1024
    start = time.perf_counter()
    for i in range(n):
        rid = i & 0xFFFF
        pair.send(Role.CLIENT, SubmitBegin(rid, head, len(body)), SubmitChunk(rid, body), SubmitEnd(rid))
        pair.send(Role.SERVER, Credit(len(body)), Receipt(rid, bytes(16), i, bytes(32), b"r" * 100))
    return n / (time.perf_counter() - start)


def bulk(mib: int) -> tuple[float, int]:
    pair = ConnectionPair()
    pair.handshake()
    chunk = pair.server.limits.chunk
    size = mib * 1024 * 1024
    data = b"x" * chunk
    peak = 0
    start = time.perf_counter()
    pair.send(Role.CLIENT, SubmitBegin(1, b"h", size))
    sent = 0
    while sent < size:
        n = min(chunk, size - sent, pair.client.send_window)
        wire = pair.client.send(SubmitChunk(1, data[:n]))
        sent += n
        consumed = 0
        for i in range(0, len(wire), READ_SIZE):  # what a daemon does with each read
            pair.server.receive_data(wire[i : i + READ_SIZE])
            peak = max(peak, pair.server.buffered)
            consumed += sum(len(e.data) for e in drain(pair.server) if isinstance(e, SubmitChunk))
        pair.send(Role.SERVER, Credit(consumed))
    pair.send(Role.CLIENT, SubmitEnd(1))
    return mib / (time.perf_counter() - start), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--mib", type=int, default=512)
    args = parser.parse_args()
    print(f"small: {small(args.packets):,.0f} packets/s (1 KiB, submit + receipt, both sides)")
    rate, peak = bulk(args.mib)
    print(f"bulk:  {rate:,.0f} MiB/s ({args.mib} MiB in 256 KiB chunks), peak buffered {peak:,} bytes")


if __name__ == "__main__":
    main()
