"""Settings of CPython's cyclic garbage collector for the long-running daemons.

The collector stops the whole process while it runs, and a daemon's p99 is made of such stops: at 1,000
packets/s the broker runs near its one core's capacity, so a 25 ms pause leaves a queue that takes a few hundred
milliseconds to drain (measured: tools/bench_broker.py, docs/benchmarks.md "Round 6"). Two changes, both
standard for servers (Python's documentation of `gc.freeze`; Instagram's write-up of the same):

- everything built at start-up (modules, the policy fold, TLS contexts) lives as long as the process. Frozen, a
  full collection no longer walks it: the broker's full collections went from ~26 ms to ~8 ms;
- a packet's objects live for the few milliseconds it is in flight. With the default first threshold (700
  allocations, a millisecond of traffic) they survive one or two young collections, and are walked again in the
  older generation. Collecting the young generation every 20,000 allocations instead lets most of them die
  first: fewer, equally short pauses, and no growth to speak of (reference counting frees everything that is
  not in a cycle at once; only cyclic garbage waits for the collector).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def settle_for_serving() -> None:
    """Call once a daemon has started and is about to serve: freeze what exists, collect the young rarely."""
    gc.collect()  # garbage from start-up is freed, not frozen for good
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
