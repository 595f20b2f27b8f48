"""The TAXII 2.1 peer: OASIS's reference server `medallion` (Flask, memory backend) on 127.0.0.1 in its own
process, driven by the real `taxii2-client`.

Sharing model (what a TAXII hub does): each member publishes into its own collection (its feed); a member that
is a recipient of another's packets polls that member's collection. Publish = `Collection.add_objects` of the
bundle's objects (an envelope; the memory backend completes it synchronously); receive = `get_objects` with
`added_after` = the start of the previous poll minus an overlap, paged with `as_pages`, deduplicated by object
id (the overlap covers a POST that was still being stored while the previous poll ran). The hub reads and
stores everything in clear; there is no signature, encryption, consent or log.

Members are threads in the bench process (taxii2-client is synchronous). Throughput counts until the last
object is seen by its last recipient; latency is publish (before the POST) → a poll returned the object.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import PYTHON, Proc, percentile
from world import name_of

API = "bench"
USER, PASSWORD = "bench", "bench-password"
OVERLAP_S = 0.5
POLL_IDLE_S = 0.01
PAGE = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def collection_id(i: int) -> str:
    return str(uuid.UUID(int=i + 1))


def start_medallion(work: Path, n: int) -> Proc:
    data = {
        "/discovery": {"title": "bench", "default": f"/{API}/", "api_roots": [f"/{API}/"]},
        API: {
            "information": {"title": "bench", "versions": ["application/taxii+json;version=2.1"],
                            "max_content_length": 64 * 1024 * 1024},
            "status": [],
            "collections": [
                {"id": collection_id(i), "title": name_of(i), "can_read": True, "can_write": True,
                 "media_types": ["application/stix+json;version=2.1"], "objects": [], "manifest": []}
                for i in range(n)
            ],
        },
    }  # fmt: skip
    (work / "medallion-data.json").write_text(json.dumps(data))
    config = {
        "backend": {
            "module": "medallion.backends.memory_backend",
            "module_class": "MemoryBackend",
            "filename": str(work / "medallion-data.json"),
        },
        "users": {USER: PASSWORD},
        "taxii": {"max_page_size": PAGE},
    }
    (work / "medallion.json").write_text(json.dumps(config))
    port = _free_port()
    code = "from medallion.scripts.run import main; main()"
    argv = [PYTHON, "-c", code, "--host", "127.0.0.1", "--port", str(port), str(work / "medallion.json")]
    proc = Proc(argv, work / "medallion.log", None)
    proc.port = port
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/taxii2/")
            with urllib.request.urlopen(req, timeout=1):
                break
        except urllib.error.HTTPError:
            break  # it answers (401 without credentials): it is up
        except OSError:
            time.sleep(0.1)
    else:
        proc.stop()
        raise SystemExit(f"medallion did not start; see {work / 'medallion.log'}")
    return proc


def _stamp(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class TaxiiRound:
    expected: dict[int, set[str]]  # recipient → object ids it must see
    t0: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    t_last: float = 0.0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def run_round(
    server: Proc,
    n: int,
    fans: dict[int, tuple[int, ...]],
    bundles: dict[int, list[bytes]],
    depth: int = 1,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Each member i publishes bundles[i] to its collection from `depth` threads; every member in fans[i] polls
    collection i until it has seen all of them."""
    from taxii2client.v21 import Collection, as_pages

    base = f"http://127.0.0.1:{server.port}/{API}/collections/"
    follows: dict[int, list[int]] = {j: [] for j in range(n)}
    expected: dict[int, set[str]] = {j: set() for j in range(n)}
    parsed = {i: [json.loads(b) for b in bs] for i, bs in bundles.items()}
    for i, to in fans.items():
        for j in to:
            follows[j].append(i)
            expected[j].update(o["objects"][0]["id"] for o in parsed.get(i, []))
    r = TaxiiRound({j: s for j, s in expected.items() if s})
    total = sum(len(s) for s in r.expected.values())
    packets = sum(len(v) for v in parsed.values())

    def collection(i: int) -> Any:
        c = Collection(base + collection_id(i) + "/", user=USER, password=PASSWORD)
        c.refresh()
        return c

    def publisher(i: int, queue: list[Any]) -> None:
        try:
            c = collection(i)
            while True:
                try:
                    b = queue.pop()
                except IndexError:
                    return
                r.t0[b["objects"][0]["id"]] = time.time()
                c.add_objects({"objects": b["objects"]})
        except Exception as exc:
            r.errors.append(f"publisher {i}: {exc!r}"[:300])

    def recipient(j: int) -> None:
        try:
            cs = {i: collection(i) for i in follows[j]}
            since = dict.fromkeys(follows[j], start - OVERLAP_S)
            want = r.expected.get(j, set())
            seen: set[str] = set()
            while not r.stop.is_set() and not want <= seen:
                for i, c in cs.items():
                    poll_start = time.time()
                    for env in as_pages(c.get_objects, per_request=PAGE, added_after=_stamp(since[i])):
                        now = time.time()
                        for o in env.get("objects", []):
                            oid = o["id"]
                            if oid in want and oid not in seen:
                                seen.add(oid)
                                with r.lock:
                                    r.latencies.append(now - r.t0.get(oid, now))
                                    r.t_last = max(r.t_last, now)
                    since[i] = poll_start - OVERLAP_S
                time.sleep(POLL_IDLE_S)
        except Exception as exc:
            r.errors.append(f"recipient {j}: {exc!r}"[:300])

    cpu0 = server.cpu()
    start = time.time()
    readers = [threading.Thread(target=recipient, args=(j,), daemon=True) for j in r.expected]
    queues = {i: list(bs) for i, bs in parsed.items()}
    writers = [
        threading.Thread(target=publisher, args=(i, queues[i]), daemon=True) for i in parsed for _ in range(depth)
    ]
    for t in (*readers, *writers):
        t.start()
    deadline = time.monotonic() + timeout
    for t in (*writers, *readers):
        t.join(max(0.0, deadline - time.monotonic()))
    r.stop.set()
    if len(r.latencies) < total:
        r.errors.append(f"medallion: {len(r.latencies)} of {total} deliveries seen before the timeout")
    cpu = server.cpu() - cpu0
    secs = max(r.t_last - start, 1e-9)
    return {
        "packets": packets,
        "deliveries": total,
        "seconds": round(secs, 3),
        "packets_per_s": packets / secs,
        "deliveries_per_s": len(r.latencies) / secs,
        "p50_ms": percentile(r.latencies, 0.5) * 1e3,
        "p99_ms": percentile(r.latencies, 0.99) * 1e3,
        "server_cpu_s": cpu,
        "errors": len(r.errors),
        "error_sample": r.errors[:3],
    }
