"""valise end to end: the real broker and real node daemons (`valise node run`, one process per member), driven
the way `valise send` and `valise inbox` drive them — over each node's control socket, with
valise.cli.node.call from this process (the same request `valise send` makes, without a process start per
packet).

Publish = the `send` op with the STIX bundle as its data frames (the node seals it, queues it durably in its
outbox, submits it to the broker and answers when the receipt is back); each member keeps `depth` sends open.
Receive = polling the recipients' `inbox` op every POLL_S until every packet of the round is there (the node
has verified it, stored it durably and acknowledged it). Latency = send issued → first poll that lists it.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import trio
from common import PYTHON, Proc, percentile
from world import World, _cli, name_of

from valise.cli.node import call

POLL_S = 0.02
SEND_WAIT = 60
CONNECT_S = 60.0
ROUND_S = 120.0


def start_nodes(world: World, work: Path, n: int, broker_port: int) -> list[tuple[Path, Proc]]:
    nodes = []
    for i in range(n):
        d = work / f"node-{name_of(i)}"
        _cli(
            "node", "init", "--dir", str(d), "--identity", str(world.keys / name_of(i)),
            "--broker", f"127.0.0.1:{broker_port}", "--broker-pub", str(world.broker_pub), "--log-key", world.vkey,
        )  # fmt: skip
        argv = [PYTHON, "-m", "valise", "node", "run", "--dir", str(d)]
        nodes.append((d, Proc(argv, work / f"node-{name_of(i)}.log", None)))
    return nodes


async def wait_connected(nodes: list[tuple[Path, Proc]]) -> None:
    with trio.fail_after(CONNECT_S):
        for d, proc in nodes:
            while True:
                if proc.proc.poll() is not None:
                    raise SystemExit(f"the node daemon in {d} exited (see its log next to it)")
                with contextlib.suppress(Exception):
                    st = await call(d, {"op": "status"})
                    if st.get("connected") and st.get("log", {}).get("members", 0) > 0:
                        break
                await trio.sleep(0.1)


async def node_round(
    nodes: list[tuple[Path, Proc]], broker: Proc, fans: dict[int, tuple[int, ...]], bundles: dict[int, list[bytes]],
    depth: int,
) -> dict[str, Any]:  # fmt: skip
    sent: dict[str, float] = {}  # packet id → publish time
    seen: dict[tuple[str, int], float] = {}  # (packet id, recipient) → first listed
    errors: list[str] = []
    expected = sum(len(fans[i]) * len(bs) for i, bs in bundles.items())
    packets = sum(len(bs) for bs in bundles.values())
    before: dict[int, set[str]] = {}
    for j, (d, _) in enumerate(nodes):
        before[j] = {it["id"] for it in (await call(d, {"op": "inbox"}))["items"]}
    done = trio.Event()

    async def publisher(i: int, queue: list[bytes]) -> None:
        d = nodes[i][0]
        names = [name_of(r) for r in fans[i]]
        while queue:
            data = queue.pop()
            req = {"op": "send", "to": names, "tlp": "AMBER", "categories": ["malware"], "operation": None,
                   "content_type": None, "expires": None, "wait": SEND_WAIT, "size": len(data)}  # fmt: skip
            t0 = trio.current_time()
            reply = await call(d, req, io.BytesIO(data))
            if reply.get("state") != "receipted":
                errors.append(f"{name_of(i)}: {reply.get('error') or reply.get('state')}")
            sent[reply.get("id", f"?{len(sent)}")] = t0

    async def poller(j: int) -> None:
        d = nodes[j][0]
        while not done.is_set():
            items = (await call(d, {"op": "inbox"}))["items"]
            now = trio.current_time()
            for it in items:
                if it["id"] not in before[j]:
                    seen.setdefault((it["id"], j), now)
            if len(seen) >= expected:
                done.set()
            await trio.sleep(POLL_S)

    cpu0 = broker.cpu()
    ncpu0 = sum(p.cpu() for _, p in nodes)
    t_start = trio.current_time()
    with trio.move_on_after(ROUND_S):
        async with trio.open_nursery() as nursery:
            for j in {r for to in fans.values() for r in to}:
                nursery.start_soon(poller, j)
            async with trio.open_nursery() as pubs:
                for i, bs in bundles.items():
                    queue = list(bs)
                    for _ in range(depth):
                        pubs.start_soon(publisher, i, queue)
            await done.wait()
            nursery.cancel_scope.cancel()
    if len(seen) < expected:
        errors.append(f"timed out: {len(seen)} of {expected} deliveries listed")
    lat = [t - sent[pid] for (pid, _), t in seen.items() if pid in sent]
    t_last = max(seen.values(), default=t_start)
    secs = max(t_last - t_start, 1e-9)
    return {
        "packets": packets,
        "deliveries": expected,
        "seconds": round(secs, 3),
        "packets_per_s": packets / secs,
        "deliveries_per_s": len(seen) / secs,
        "p50_ms": percentile(lat, 0.5) * 1e3,
        "p99_ms": percentile(lat, 0.99) * 1e3,
        "server_cpu_s": broker.cpu() - cpu0,
        "nodes_cpu_s": sum(p.cpu() for _, p in nodes) - ncpu0,
        "errors": len(errors),
        "error_sample": errors[:3],
        "wall": time.time(),
    }
