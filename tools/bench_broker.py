"""Benchmark of the broker daemon (issue #5), side by side with a bare TLS relay, medians of rounds in one run.

    .venv/bin/python tools/bench_broker.py                    # full run (a 1 GiB packet at the end)
    .venv/bin/python tools/bench_broker.py --quick            # fewer, shorter rounds; a 64 MiB packet
    .venv/bin/python tools/bench_broker.py --json OUT.json    # also write every figure as JSON
    .venv/bin/python tools/bench_broker.py --profile DIR      # py-spy the broker during the valise rounds

Setup: one broker directory with 196 members admitted by signed operator records, and signed grant/accept
statements for every pair that sends (node i sends to node i+1 of its group, in a ring). Each configuration
gets a fresh copy of it, a fresh broker (`valise broker serve` in a subprocess, so the broker's CPU and memory
are its own) and a fresh baseline relay (tools/relay_baseline.py in another subprocess: the same TLS 1.3 with
the same pinned certificates, relaying length-prefixed frames with no crypto, policy or log).

The client is one process of trio tasks: one TLS connection and one member identity per node. A node submits
sealed 1 KiB packets (sealed beforehand, so the client's sealing is not measured), receives its deliveries,
signs an acknowledgement for each (so the broker verifies and logs it and forwards it to the sender, who
confirms it with `seen`), and answers the broker's cosigning requests as a witness (checking the log signature
and the consistency proof, then cosigning).

Figures, for 2, 50 and 196 nodes, valise and baseline in alternate rounds (medians over rounds):
- packets/s durable: receipts received per second (closed loop: each node keeps `depth` submissions in flight);
  also delivered/s (until the last delivery of the round) and the broker's CPU per packet;
- p50/p99 latency: submit → the recipient has the whole delivery;
- broker RSS: VmRSS with the nodes connected and idle, VmHWM (peak) during the configuration's rounds;
and, with 196 nodes connected, p50/p99 at a fixed offered load of 1,000 packets/s (open loop: latency counts from
the time a packet was due, so a slow broker cannot hide its queue), and one large packet relayed between two
nodes with the broker's RSS growth (sampled VmRSS and VmHWM, after resetting the peak).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from valise import gctune, identity, keyfiles, packet, records
from valise.broker.home import BrokerHome
from valise.cli.main import main as cli
from valise.errors import Error
from valise.packet.format import PREFIX_SIZE, SIGNATURE_SIZE, parse_prefix
from valise.policy import records as prec
from valise.store.sqlite import SqliteLog
from valise.tlog import checkpoint, cosignature, merkle, note
from valise.tlsstream import TLSSocketStream
from valise.wire import codes
from valise.wire import events as ev
from valise.wire.connection import READ_SIZE, Connection, Signal
from valise.wire.limits import SUPPORTED_VERSIONS
from valise.wire.state import Role

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
import relay_baseline as rb  # a sibling tool: the baseline's frame format
from common import Proc, WitnessCache, open_member_tls, percentile, start_broker, start_relay  # shared with tools/bench

ORIGIN = "bench.valise/log"
PAYLOAD = 1024
ROUND_TIMEOUT = 300.0
TARGETS = {"packets_per_s": 5000, "p99_ms_at_1000": 50.0, "rss_196_mib": 300.0, "big_rss_growth_mib": 100.0}
DEFAULT_GC_THRESHOLD = gc.get_threshold()
# Brokers before 253937d answered get-entries with one item per entry and at most 256 entries a request; the
# follow mode still speaks to them, for comparisons run against an older checkout's src.
SUBTREES = "levels" in ev.Entries.__dataclass_fields__
MiB = 1 << 20


def name_of(i: int) -> str:
    return f"N{i:03d}"


# --- the world: a broker directory with members and consent ---------------------------------------------------


@dataclass
class World:
    root: Path
    template: Path  # the broker directory every configuration copies
    keys: Path
    members: list[identity.Identity]


def ring(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


def make_world(root: Path, n: int, groups: Sequence[int]) -> World:
    template = root / "template"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(["broker", "init", "--dir", str(template), "--origin", ORIGIN]) == 0
    home = BrokerHome.open(template)
    op = home.operator_key()
    now = int(time.time())
    members = []
    entries = []
    for i in range(n):
        ident = identity.generate(name_of(i), os.urandom, now)
        keyfiles.save_identity(root / "keys" / name_of(i), ident, None)
        members.append(ident)
        fields = {"id": name_of(i), "kind": "country", "name": f"{name_of(i)} bureau", "region": "europe"}
        entries.append(prec.dir_record(op, ORIGIN, i + 1, now, "member-add", **fields, bundle=ident.bundle.raw))
    pairs = sorted({p for g in groups for p in ring(g)})
    for s, r in pairs:
        a, b = members[s], members[r]
        entries.append(
            prec.grant(a.signing, origin=ORIGIN, author=a.member_id, created=now, to=b.member_id, tlp="AMBER")
        )
        entries.append(
            prec.accept(b.signing, origin=ORIGIN, author=b.member_id, created=now, source=a.member_id, tlp="AMBER")
        )
    with SqliteLog.open(home.db_path) as store:
        store.append(entries)
    return World(root, template, root / "keys", members)


# --- sealing (before the clock starts; in worker processes) -----------------------------------------------------


@dataclass
class Pkt:
    data: bytes
    head_size: int
    packet_id: bytes
    digest: bytes
    sender: int
    to: int
    t0: float = 0.0

    @property
    def head(self) -> bytes:
        return self.data[: self.head_size]


_SEAL_MEMBERS: list[identity.Identity] = []


def _seal_one(job: tuple[int, int]) -> tuple[bytes, int, bytes, bytes]:
    s, r = job
    out = io.BytesIO()
    packet.seal(
        io.BytesIO(os.urandom(PAYLOAD)),
        out,
        sender=_SEAL_MEMBERS[s],
        recipients=[_SEAL_MEMBERS[r].bundle],
        tlp="AMBER",
        categories=("malware",),
        content_type="application/octet-stream",
        random=os.urandom,
        now=int(time.time()),
    )
    data = out.getvalue()
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return data, head.head_size, head.core.packet_id, head.digest


def seal_many(world: World, jobs: list[tuple[int, int]]) -> list[Pkt]:
    """Seal 1 KiB packets for (sender, recipient) jobs on every CPU (fork: the workers inherit the keys)."""
    _SEAL_MEMBERS[:] = world.members
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        sealed = pool.map(_seal_one, jobs, chunksize=256)
    return [Pkt(d, hs, pid, dg, s, r) for (d, hs, pid, dg), (s, r) in zip(sealed, jobs, strict=True)]


# --- server processes ----------------------------------------------------------------------------------------


# --- measurement state ---------------------------------------------------------------------------------------


@dataclass
class Round:
    expected: int
    receipts: int = 0
    delivered: int = 0
    acked: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    t_start: float = 0.0
    t_last_receipt: float = 0.0
    t_last_delivery: float = 0.0
    done: trio.Event = field(default_factory=trio.Event)

    def check(self) -> None:
        settled = self.receipts + len(self.errors) >= self.expected
        if settled and self.delivered >= self.receipts and self.acked >= self.receipts:
            self.done.set()


class Bench:
    """What the node tasks share: the round being measured and the packets in flight by head (or id)."""

    def __init__(self, log_key: bytes, witnesses: int, follow: float | None = None) -> None:
        self.witnesses = witnesses  # nodes with a lower index cosign checkpoints; the others decline
        self.follow = follow  # seconds between a node's rounds of following the log (None: they do not)
        self.followed = [0, 0, 0]  # entries followed, items received, requests
        self.following = False  # only during valise rounds: the baseline's share of the client stays its own
        self.round = Round(0)
        self.by_head: dict[bytes, Pkt] = {}
        self.by_id: dict[bytes, Pkt] = {}
        self.witness = WitnessCache(ORIGIN, log_key)


# --- a valise node: the real wire protocol over real TLS -----------------------------------------------------


class ValiseNode:
    def __init__(self, bench: Bench, index: int, ident: identity.Identity, keydir: Path) -> None:
        self.bench = bench
        self.index = index
        self.name = ident.member_id
        self.ident = ident
        self.keydir = keydir
        self.cosigner = cosignature.Cosigner(self.name, ident.signing)
        self.conn = Connection(Role.CLIENT)
        self.out: list[bytes] = []
        self.closing = False
        self.lock = trio.Lock()
        self.inflight: dict[int, Pkt] = {}
        self.slots = trio.Semaphore(1)
        self.credit = trio.Event()
        self.delivery: list[Any] | None = None  # [seq, head, size, received, hasher]
        self.verify_big = False
        self.stream: TLSSocketStream
        self.asks: dict[int, list[Any]] = {}  # rid -> [event, answer]: requests of our own (following the log)
        self.tree = merkle.CompactRange()

    async def connect(self, port: int, broker_cert: bytes) -> None:
        name = self.name
        self.stream = await open_member_tls(self.keydir, name, port, broker_cert)
        self.queue(ev.Hello(SUPPORTED_VERSIONS, name, "node", 0, self.conn.limits))
        await self.flush()
        while True:
            event = self.conn.next_event()
            if isinstance(event, Signal):
                self.conn.receive_data(await self.stream.receive_some(READ_SIZE))
                continue
            if not isinstance(event, ev.Welcome):
                raise SystemExit(f"{name}: the broker answered hello with {event}")
            return

    def queue(self, msg: ev.Message) -> None:
        # Bytes are queued in the order the state machine produced them; any flush writes all of them in order.
        self.out.append(self.conn.send(msg))

    async def flush(self) -> None:
        async with self.lock:
            if self.out:
                data = b"".join(self.out)
                self.out.clear()
                await self.stream.send_all(data)

    async def close(self) -> None:
        self.closing = True
        with trio.move_on_after(1):
            await trio.aclose_forcefully(self.stream)

    async def ask(self, make: Callable[[int], ev.Message]) -> ev.Message:
        rid = self.conn.new_rid()
        slot: list[Any] = [trio.Event(), None]
        self.asks[rid] = slot
        self.queue(make(rid))
        await self.flush()
        await slot[0].wait()
        answer: ev.Message = slot[1]
        return answer

    async def follower(self, interval: float, offset: float) -> None:
        """Follow the log as a node daemon does (at a steady pace here): the latest checkpoint, then every entry
        since the last one, as the broker serves them to this member; the root must match."""
        await trio.sleep(offset)
        while True:
            if not self.bench.following:
                await trio.sleep(interval)
                continue
            answer = await self.ask(ev.GetCheckpoint)
            assert isinstance(answer, ev.Checkpoint), answer
            cp = checkpoint.parse_body(note.parse_note(answer.checkpoint).text)
            start = self.tree.size
            while self.tree.size < cp.size:
                end = cp.size if SUBTREES else min(cp.size, self.tree.size + 256)
                got = await self.ask(lambda rid, a=self.tree.size, b=end: ev.GetEntries(rid, a, b))
                assert isinstance(got, ev.Entries), got
                spans = dict(zip(got.hashed, getattr(got, "levels", [0] * len(got.hashed)), strict=True))
                for i, item in enumerate(got.entries):
                    level = spans.get(i)
                    if level is None:
                        self.tree.append(merkle.hash_leaf(item))
                    elif level == 0:
                        self.tree.append(item)  # one entry's leaf hash
                    else:
                        self.tree.append_subtree(item, level)
                self.bench.followed[1] += len(got.entries)
                self.bench.followed[2] += 1
            self.bench.followed[0] += cp.size - start
            if self.tree.root() != cp.root:
                raise SystemExit(f"{self.name}: the entries served do not give the checkpoint's root")
            await trio.sleep(interval)

    async def submit(self, p: Pkt, t0: float) -> None:
        """Submit a whole small packet (begin, one chunk, end in one write); the receipt comes to the reader."""
        body = len(p.data) - p.head_size
        while body > self.conn.send_window:
            self.credit = trio.Event()
            await self.credit.wait()
        rid = self.conn.new_rid()
        p.t0 = t0
        self.inflight[rid] = p
        self.queue(ev.SubmitBegin(rid, p.head, body))
        if body:
            self.queue(ev.SubmitChunk(rid, p.data[p.head_size :]))
        self.queue(ev.SubmitEnd(rid))
        await self.flush()

    async def submit_file(self, path: Path, p: Pkt) -> None:
        """Stream a large packet from a file, within the broker's window and chunk limit."""
        assert self.conn.peer_limits is not None
        chunk = self.conn.peer_limits.chunk
        with path.open("rb") as f:
            head = f.read(p.head_size)
            remaining = os.fstat(f.fileno()).st_size - p.head_size
            rid = self.conn.new_rid()
            p.t0 = trio.current_time()
            self.inflight[rid] = p
            self.queue(ev.SubmitBegin(rid, head, remaining))
            await self.flush()
            while remaining:
                while self.conn.send_window == 0:
                    self.credit = trio.Event()
                    await self.credit.wait()
                data = f.read(min(chunk, self.conn.send_window, remaining))
                self.queue(ev.SubmitChunk(rid, data))
                await self.flush()
                remaining -= len(data)
            self.queue(ev.SubmitEnd(rid))
            await self.flush()

    async def reader(self) -> None:
        try:
            await self._read()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self.closing:
                self.bench.round.errors.append(f"{self.name}: connection lost: {exc!r}")

    async def _read(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if isinstance(event, Signal):
                if self.out:
                    await self.flush()
                conn.receive_data(await self.stream.receive_some(READ_SIZE))
                continue
            if isinstance(event, ev.ConnectionClosed | ev.Goodbye):
                return
            self.handle(event)

    def handle(self, event: ev.Message) -> None:
        r = self.bench.round
        if isinstance(event, ev.DeliverChunk):
            assert self.delivery is not None
            self.delivery[3] += len(event.data)
            if self.delivery[4] is not None:
                self.delivery[4].update(event.data)
            window = self.conn.limits.window  # grant once half the window is used up, as the node does
            if self.conn.receive_window <= window // 2:
                self.queue(ev.Credit(window - self.conn.receive_window))
        elif isinstance(event, ev.DeliverBegin):
            hasher = None
            if self.verify_big:
                head = packet.parse_head(event.head)
                assert isinstance(head, packet.Head)
                hasher = packet.CiphertextHasher(head.header)
            self.delivery = [event.seq, event.head, event.size, 0, hasher]
        elif isinstance(event, ev.DeliverEnd):
            self.delivered()
        elif isinstance(event, ev.Checkpoint | ev.Entries | ev.ErrorMessage) and event.rid in self.asks:
            slot = self.asks.pop(event.rid)
            slot[1] = event
            slot[0].set()
        elif isinstance(event, ev.Receipt | ev.Deny | ev.ErrorMessage) and event.rid in self.inflight:
            self.inflight.pop(event.rid)
            self.slots.release()
            if isinstance(event, ev.Receipt):
                r.receipts += 1
                r.t_last_receipt = trio.current_time()
            else:
                r.errors.append(f"{self.name}: {event}")
            r.check()
        elif isinstance(event, ev.AckForward):
            self.queue(ev.Seen(event.seq))
            r.acked += 1
            r.check()
        elif isinstance(event, ev.Credit):
            self.credit.set()
        elif isinstance(event, ev.CosignRequest):
            self.cosign(event)
        elif isinstance(event, ev.Ping):
            self.queue(ev.Pong(event.n))
        elif isinstance(event, ev.ErrorMessage):
            raise SystemExit(f"{self.name}: the broker closed the connection: {event.code}: {event.message}")

    def delivered(self) -> None:
        assert self.delivery is not None
        seq, head, size, got, hasher = self.delivery
        self.delivery = None
        r = self.bench.round
        now = trio.current_time()
        p = self.bench.by_head.get(head)
        if p is None or got != size or p.to != self.index:
            r.errors.append(f"{self.name}: delivery seq {seq} is unknown or incomplete ({got} of {size} bytes)")
            return
        if hasher is not None:
            hasher.finish()  # raises if the ciphertext is not the signed one
        r.delivered += 1
        r.t_last_delivery = now
        r.latencies.append(now - p.t0)
        sender = name_of(p.sender)
        ack = records.Ack.make(self.ident.signing, p.packet_id, p.digest, sender, self.name, int(time.time()))
        self.queue(ev.Ack(seq, p.packet_id, ack.raw))
        r.check()

    def cosign(self, msg: ev.CosignRequest) -> None:
        if self.index >= self.bench.witnesses:
            self.queue(ev.ErrorMessage(msg.rid, codes.REFUSED, f"{self.name} is not a witness in this benchmark"))
            return
        try:
            cp = self.bench.witness.check(msg.checkpoint, msg.old, msg.proof)
        except Error as exc:
            self.queue(ev.ErrorMessage(msg.rid, codes.CONFLICT, exc.what[:900]))
            return
        line = self.cosigner.cosign(cp, int(time.time())).line().encode()
        self.queue(ev.CosignResponse(msg.rid, line))


# --- a baseline node: the same TLS, opaque frames ------------------------------------------------------------


class BaselineNode:
    def __init__(self, bench: Bench, index: int, ident: identity.Identity, keydir: Path) -> None:
        self.bench = bench
        self.index = index
        self.name = ident.member_id
        self.keydir = keydir
        self.out: list[bytes] = []
        self.closing = False
        self.lock = trio.Lock()
        self.slots = trio.Semaphore(1)
        self.stream: TLSSocketStream

    async def connect(self, port: int, broker_cert: bytes) -> None:
        name = self.name
        self.stream = await open_member_tls(self.keydir, name, port, broker_cert)

    async def flush(self) -> None:
        async with self.lock:
            if self.out:
                data = b"".join(self.out)
                self.out.clear()
                await self.stream.send_all(data)

    async def close(self) -> None:
        self.closing = True
        with trio.move_on_after(1):
            await trio.aclose_forcefully(self.stream)

    async def submit(self, p: Pkt, t0: float) -> None:
        p.t0 = t0
        self.out.append(rb.frame(rb.DATA, p.to, p.data))
        await self.flush()

    async def reader(self) -> None:
        try:
            await self._read()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self.closing:
                self.bench.round.errors.append(f"{self.name}: connection lost: {exc!r}")

    async def _read(self) -> None:
        buf = bytearray()
        size = rb.HEADER.size
        while True:
            data = await self.stream.receive_some(READ_SIZE)
            if not data:
                return
            buf += data
            while len(buf) >= size:
                length, kind, peer = rb.HEADER.unpack_from(buf)
                end = 4 + length
                if len(buf) < end:
                    break
                body = bytes(buf[size:end])
                del buf[:end]
                self.handle(kind, peer, body)
            if self.out:
                await self.flush()

    def handle(self, kind: int, peer: int, body: bytes) -> None:
        r = self.bench.round
        if kind == rb.RECEIPT:
            self.slots.release()
            r.receipts += 1
            r.t_last_receipt = trio.current_time()
        elif kind == rb.DATA:
            p = self.bench.by_id.get(body[:16])
            now = trio.current_time()
            if p is None or len(body) != len(p.data) or p.to != self.index:
                why = "unknown id" if p is None else f"{len(body)} of {len(p.data)} bytes, for {p.to}"
                r.errors.append(f"{self.name}: bad frame from {peer}: {why}")
                return
            r.delivered += 1
            r.t_last_delivery = now
            r.latencies.append(now - p.t0)
            self.out.append(rb.frame(rb.ACK, peer, body[:16]))
        elif kind == rb.ACK:
            r.acked += 1
        r.check()


def baseline_packets(pkts: list[Pkt]) -> list[Pkt]:
    """The same sizes and addressing as `pkts`, as opaque bodies whose first 16 bytes are a unique id."""
    out = []
    for p in pkts:
        pid = os.urandom(16)
        out.append(Pkt(pid + bytes(len(p.data) - 16), 0, pid, b"", p.sender, p.to))
    return out


# --- rounds --------------------------------------------------------------------------------------------------


Node = ValiseNode | BaselineNode


@dataclass
class RoundResult:
    packets: int
    seconds: float
    packets_per_s: float
    delivered_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    server_sys_s: float  # of which in the kernel (file system work shows here)
    client_cpu_s: float
    errors: int


def register(bench: Bench, pkts: list[Pkt]) -> None:
    bench.by_head.clear()
    bench.by_id.clear()
    for p in pkts:
        if p.head_size:
            bench.by_head[p.head] = p
        else:
            bench.by_id[p.packet_id] = p


async def run_round(
    bench: Bench, server: Proc, pkts: list[Pkt], drive: Callable[[trio.Nursery], None], label: str
) -> RoundResult:
    register(bench, pkts)
    bench.following = label in ("v", "ov")
    r = bench.round = Round(len(pkts))
    cpu0, client0 = server.cpu_split(), sum(os.times()[:2])
    r.t_start = trio.current_time()
    with trio.move_on_after(ROUND_TIMEOUT) as scope:
        async with trio.open_nursery() as nursery:
            drive(nursery)
            await r.done.wait()
    bench.following = False
    if scope.cancelled_caught:
        r.errors.append(
            f"{label}: timed out: {r.receipts} receipts, {r.delivered} delivered, {r.acked} acks of {r.expected}"
        )
    (user, system), client = server.cpu_split(), sum(os.times()[:2]) - client0
    user, system = user - cpu0[0], system - cpu0[1]
    secs = max(r.t_last_receipt - r.t_start, 1e-9)
    for e in r.errors[:3]:
        print(f"  ! {e}", file=sys.stderr)
    return RoundResult(
        packets=len(pkts),
        seconds=round(secs, 3),
        packets_per_s=r.receipts / secs,
        delivered_per_s=r.delivered / max(r.t_last_delivery - r.t_start, 1e-9),
        p50_ms=percentile(r.latencies, 0.5) * 1e3,
        p99_ms=percentile(r.latencies, 0.99) * 1e3,
        max_ms=max(r.latencies, default=math.nan) * 1e3,
        server_cpu_s=user + system,
        server_sys_s=system,
        client_cpu_s=client,
        errors=len(r.errors),
    )


def closed_loop(nodes: Sequence[Node], pkts: list[Pkt], depth: int) -> Callable[[trio.Nursery], None]:
    """Each node submits its packets keeping `depth` in flight (a receipt frees a slot)."""
    share: dict[int, list[Pkt]] = {}
    for p in pkts:
        share.setdefault(p.sender, []).append(p)

    async def one(node: Node, mine: list[Pkt]) -> None:
        node.slots = trio.Semaphore(depth)
        for p in mine:
            await node.slots.acquire()
            await node.submit(p, trio.current_time())

    def drive(nursery: trio.Nursery) -> None:
        for node in nodes:
            nursery.start_soon(one, node, share.get(node.index, []))

    return drive


def open_loop(nodes: Sequence[Node], pkts: list[Pkt], rate: float) -> Callable[[trio.Nursery], None]:
    """Packet k is due at start + k/rate, whatever happened to the others; its latency counts from then."""

    async def one(node: Node, p: Pkt, due: float) -> None:
        await node.slots.acquire()  # the broker's limit of requests in flight per connection; a receipt frees it
        await node.submit(p, due)

    async def scheduler(nursery: trio.Nursery) -> None:
        for node in nodes:
            node.slots = trio.Semaphore(15 if isinstance(node, ValiseNode) and node.bench.follow else 16)
        start = trio.current_time() + 0.01
        for k, p in enumerate(pkts):
            due = start + k / rate
            await trio.sleep_until(due)
            nursery.start_soon(one, nodes[p.sender], p, due)

    def drive(nursery: trio.Nursery) -> None:
        nursery.start_soon(scheduler, nursery)

    return drive


def summarise(rounds: list[RoundResult]) -> dict[str, Any]:
    def med(key: str) -> float:
        return float(statistics.median(getattr(x, key) for x in rounds))

    pkts = sum(x.packets for x in rounds)
    return {
        "packets_per_s": round(med("packets_per_s")),
        "delivered_per_s": round(med("delivered_per_s")),
        "p50_ms": round(med("p50_ms"), 2),
        "p99_ms": round(med("p99_ms"), 2),
        "server_cpu_us_per_packet": round(sum(x.server_cpu_s for x in rounds) / pkts * 1e6, 1),
        "server_sys_us_per_packet": round(sum(x.server_sys_s for x in rounds) / pkts * 1e6, 1),
        "client_cpu_us_per_packet": round(sum(x.client_cpu_s for x in rounds) / pkts * 1e6, 1),
        "errors": sum(x.errors for x in rounds),
        "rounds": [x.__dict__ for x in rounds],
    }


# --- one configuration: n nodes, valise and baseline side by side ------------------------------------------


@dataclass
class Plan:
    groups: tuple[int, ...]
    rounds: int
    packets: int  # per closed-loop round
    open_rate: float
    open_seconds: float
    open_rounds: int
    big: int
    witnesses: int
    follow: float | None = None  # seconds between a node's rounds of following the log


async def configuration(world: World, n: int, plan: Plan, work: Path, profile: Path | None) -> dict[str, Any]:
    broker_dir = work / f"broker-{n}"
    shutil.copytree(world.template, broker_dir)
    home = BrokerHome.open(broker_dir)
    broker_cert = home.broker_identity().bundle.cert_der
    # The broker takes 16 requests in flight per member; a node that follows the log keeps one for that.
    depth = max(1, min(15 if plan.follow else 16, math.ceil(64 / n)))
    closed = [(s, r) for _ in range(math.ceil(plan.packets / n)) for s, r in ring(n)][: plan.packets]
    warm = closed[: max(n, plan.packets // 5)]
    jobs = warm + closed * plan.rounds
    opened: list[tuple[int, int]] = []
    if n == max(plan.groups):
        per = int(plan.open_rate * plan.open_seconds)
        opened = [ring(n)[k % n] for k in range(per)]
        jobs += opened * plan.open_rounds
    t = time.perf_counter()
    sealed = seal_many(world, jobs)
    print(f"  sealed {len(sealed):,} packets in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    cut = len(warm)
    warm_p, sealed = sealed[:cut], sealed[cut:]
    rounds_p = [sealed[i * len(closed) : (i + 1) * len(closed)] for i in range(plan.rounds)]
    sealed = sealed[plan.rounds * len(closed) :]
    open_p = [sealed[i * len(opened) : (i + 1) * len(opened)] for i in range(plan.open_rounds)] if opened else []

    broker = start_broker(broker_dir, work)
    relay = start_relay(broker_dir, world.keys, work)
    bench = Bench(home.log_key().public, plan.witnesses, plan.follow)
    out: dict[str, Any] = {"nodes": n, "depth": depth, "packets_per_round": plan.packets}
    spy: subprocess.Popen[bytes] | None = None
    try:
        vnodes = [ValiseNode(bench, i, world.members[i], world.keys / name_of(i)) for i in range(n)]
        bnodes = [BaselineNode(bench, i, world.members[i], world.keys / name_of(i)) for i in range(n)]
        async with trio.open_nursery() as nursery:
            t = time.perf_counter()
            async with trio.open_nursery() as conns:
                for v in vnodes:
                    conns.start_soon(v.connect, broker.port, broker_cert)
            connect_s = time.perf_counter() - t
            async with trio.open_nursery() as conns:
                for b in bnodes:
                    conns.start_soon(b.connect, relay.port, broker_cert)
            everyone: list[Node] = [*vnodes, *bnodes]
            for node in everyone:
                nursery.start_soon(node.reader)
            followers = trio.CancelScope()
            if plan.follow:

                async def follow_all() -> None:
                    with followers:
                        async with trio.open_nursery() as each:
                            for v in vnodes:
                                each.start_soon(v.follower, plan.follow, plan.follow * v.index / n)

                nursery.start_soon(follow_all)
            await trio.sleep(1.5)  # let the first checkpoint round with its cosignatures pass
            out["connect_s"] = round(connect_s, 2)
            out["broker_rss_connected_mib"] = round(broker.rss()["VmRSS"], 1)
            out["relay_rss_connected_mib"] = round(relay.rss()["VmRSS"], 1)
            broker.reset_peak()
            relay.reset_peak()
            await run_round(bench, broker, warm_p, closed_loop(vnodes, warm_p, depth), "warm-up")
            warm_b = baseline_packets(warm_p)
            await run_round(bench, relay, warm_b, closed_loop(bnodes, warm_b, depth), "warm-up")
            # The client's own collector pauses (~25 ms for a full collection over the sealed packets) would count
            # in the latencies of both sides; it gets the daemons' settings (valise.gctune), undone at the end.
            gctune.settle_for_serving()
            if profile is not None:
                spy = start_profiler(broker.pid, profile / f"broker-{n}-nodes.txt")
            v_rounds, b_rounds = [], []
            for i, pkts in enumerate(rounds_p):
                base = baseline_packets(pkts)
                order = ["v", "b"] if i % 2 == 0 else ["b", "v"]
                for which in order:
                    if which == "v":
                        v_rounds.append(await run_round(bench, broker, pkts, closed_loop(vnodes, pkts, depth), "v"))
                    else:
                        b_rounds.append(await run_round(bench, relay, base, closed_loop(bnodes, base, depth), "b"))
                print(
                    f"  {n} nodes round {i + 1}: valise {v_rounds[-1].packets_per_s:,.0f}/s "
                    f"p99 {v_rounds[-1].p99_ms:.1f} ms; baseline {b_rounds[-1].packets_per_s:,.0f}/s "
                    f"p99 {b_rounds[-1].p99_ms:.1f} ms",
                    file=sys.stderr,
                )
            if spy is not None:
                stop_profiler(spy)
                spy = None
            out["valise"] = summarise(v_rounds)
            out["baseline"] = summarise(b_rounds)
            out["broker_rss_peak_mib"] = round(broker.rss()["VmHWM"], 1)
            out["relay_rss_peak_mib"] = round(relay.rss()["VmHWM"], 1)
            out["ratio_packets_per_s"] = round(out["valise"]["packets_per_s"] / out["baseline"]["packets_per_s"], 3)
            if open_p:
                broker.reset_peak()
                if profile is not None:
                    spy = start_profiler(broker.pid, profile / f"broker-{n}-nodes-open-loop.txt")
                vo, bo = [], []
                for i, pkts in enumerate(open_p):
                    base = baseline_packets(pkts)
                    vo.append(await run_round(bench, broker, pkts, open_loop(vnodes, pkts, plan.open_rate), "ov"))
                    bo.append(await run_round(bench, relay, base, open_loop(bnodes, base, plan.open_rate), "ob"))
                    print(
                        f"  open loop {plan.open_rate:,.0f}/s round {i + 1}: valise p50 {vo[-1].p50_ms:.1f} "
                        f"p99 {vo[-1].p99_ms:.1f} ms; baseline p50 {bo[-1].p50_ms:.1f} p99 {bo[-1].p99_ms:.1f} ms",
                        file=sys.stderr,
                    )
                if spy is not None:
                    stop_profiler(spy)
                    spy = None
                out["open_loop"] = {
                    "rate": plan.open_rate,
                    "seconds": plan.open_seconds,
                    "valise": summarise(vo),
                    "baseline": summarise(bo),
                    "broker_rss_peak_mib": round(broker.rss()["VmHWM"], 1),
                }
            followers.cancel()
            if plan.follow:
                entries, items, requests = bench.followed
                out["followed"] = {"every_s": plan.follow, "entries": entries, "items": items, "requests": requests}
            for node in everyone:
                await node.close()
            nursery.cancel_scope.cancel()
    except BaseException:
        for server in (broker, relay):
            server.stop()
            tail = server.log_path.read_text(errors="replace")[-3000:]
            print(f"--- {server.log_path.name} (last lines) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        gc.unfreeze()  # this configuration's packets and nodes may go now
        gc.set_threshold(*DEFAULT_GC_THRESHOLD)
        if spy is not None:
            stop_profiler(spy)
        broker.stop()
        relay.stop()
        shutil.rmtree(broker_dir / "spool", ignore_errors=True)
    return out


# --- one large packet ------------------------------------------------------------------------------------------


class Zeros(io.RawIOBase):
    """`size` zero bytes, without holding them (the packet's ciphertext is random whatever the plaintext)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


async def big_packet(world: World, plan: Plan, work: Path) -> dict[str, Any]:
    size = plan.big
    broker_dir = work / "broker-big"
    shutil.copytree(world.template, broker_dir)
    home = BrokerHome.open(broker_dir)
    path = work / "big.pkt"
    t = time.perf_counter()
    with path.open("w+b") as out:
        packet.seal(
            io.BufferedReader(Zeros(size), MiB),
            out,
            sender=world.members[0],
            recipients=[world.members[1].bundle],
            tlp="AMBER",
            categories=("malware",),
            content_type="application/octet-stream",
            random=os.urandom,
            now=int(time.time()),
            payload_size=size,
        )
    seal_s = time.perf_counter() - t
    with path.open("rb") as f:
        prefix = f.read(PREFIX_SIZE)
        head_bytes = prefix + f.read(parse_prefix(prefix) + SIGNATURE_SIZE)
    head = packet.parse_head(head_bytes)
    assert isinstance(head, packet.Head)
    p = Pkt(head_bytes, head.head_size, head.core.packet_id, head.digest, 0, 1)
    total = path.stat().st_size
    broker = start_broker(broker_dir, work)
    bench = Bench(home.log_key().public, plan.witnesses)
    try:
        a = ValiseNode(bench, 0, world.members[0], world.keys / name_of(0))
        b = ValiseNode(bench, 1, world.members[1], world.keys / name_of(1))
        b.verify_big = True
        cert = home.broker_identity().bundle.cert_der
        await a.connect(broker.port, cert)
        await b.connect(broker.port, cert)
        peak = 0.0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, broker.rss()["VmRSS"])
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.reader)
            nursery.start_soon(b.reader)
            await trio.sleep(1.5)
            before = broker.rss()["VmRSS"]
            broker.reset_peak()
            nursery.start_soon(sample)
            register(bench, [p])
            r = bench.round = Round(1)
            r.t_start = trio.current_time()
            await a.submit_file(path, p)
            with trio.move_on_after(ROUND_TIMEOUT):
                await r.done.wait()
            after = broker.rss()
            for node in (a, b):
                await node.close()
            nursery.cancel_scope.cancel()
    finally:
        broker.stop()
        path.unlink(missing_ok=True)
        shutil.rmtree(broker_dir / "spool", ignore_errors=True)
    ok = r.receipts == 1 and r.delivered == 1 and r.acked == 1 and not r.errors
    relay_s = r.t_last_delivery - r.t_start
    return {
        "payload_bytes": size,
        "packet_bytes": total,
        "relayed": ok,
        "errors": r.errors,
        "seal_s": round(seal_s, 2),
        "receipt_s": round(r.t_last_receipt - r.t_start, 2),
        "relay_s": round(relay_s, 2),
        "relay_mb_per_s": round(total / relay_s / 1e6, 1) if ok else None,
        "broker_rss_before_mib": round(before, 1),
        "broker_rss_peak_mib": round(max(peak, after["VmHWM"]), 1),
        "broker_rss_growth_mib": round(max(peak, after["VmHWM"]) - before, 1),
    }


# --- profiling -----------------------------------------------------------------------------------------------


PROFILE_IDLE = True  # --profile-cpu turns it off


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("  (py-spy not found: no profile)", file=sys.stderr)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    # --idle: wall-clock samples, so time the event loop spends blocked (fsync) or waiting (epoll) shows too.
    argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--output", str(out)]
    if PROFILE_IDLE:
        argv.append("--idle")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()


# --- main ----------------------------------------------------------------------------------------------------


async def run(plan: Plan, work: Path, profile: Path | None) -> dict[str, Any]:
    t = time.perf_counter()
    world = make_world(work, max(plan.groups), plan.groups)
    print(f"world of {max(plan.groups)} members in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "payload_bytes": PAYLOAD,
        "plan": plan.__dict__,
        "configurations": [],
        "targets": TARGETS,
    }
    for n in plan.groups:
        print(f"{n} nodes", file=sys.stderr)
        results["configurations"].append(await configuration(world, n, plan, work, profile))
    print(f"one packet of {plan.big >> 20} MiB", file=sys.stderr)
    results["big_packet"] = await big_packet(world, plan, work)
    return results


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    rows = []
    for c in r["configurations"]:
        v = c["valise"]["packets_per_s"]
        rows.append((f"packets/s durable, {c['nodes']} nodes", f">= {TARGETS['packets_per_s']:,}", f"{v:,}", v >= 5000))
    big_c = max(r["configurations"], key=lambda c: c["nodes"])
    if "open_loop" in big_c:
        p99 = big_c["open_loop"]["valise"]["p99_ms"]
        rows.append(
            (
                f"p99 at {big_c['open_loop']['rate']:,.0f} packets/s, {big_c['nodes']} nodes",
                f"< {TARGETS['p99_ms_at_1000']:.0f} ms",
                f"{p99:.1f} ms",
                p99 < TARGETS["p99_ms_at_1000"],
            )
        )
    peak = max(big_c["broker_rss_peak_mib"], big_c.get("open_loop", {}).get("broker_rss_peak_mib", 0))
    rows.append(
        (
            f"broker RSS, {big_c['nodes']} nodes connected (peak under load)",
            f"< {TARGETS['rss_196_mib']:.0f} MiB",
            f"{peak:.0f} MiB",
            peak < TARGETS["rss_196_mib"],
        )
    )
    big = r["big_packet"]
    growth = big["broker_rss_growth_mib"]
    rows.append(
        (
            f"{big['payload_bytes'] >> 20} MiB packet relayed: broker RSS growth"
            + ("" if big["payload_bytes"] >= 1 << 30 else " (--quick: not 1 GiB)"),
            f"< {TARGETS['big_rss_growth_mib']:.0f} MiB",
            f"{growth:.1f} MiB" + ("" if big["relayed"] else " (NOT RELAYED)"),
            big["relayed"] and growth < TARGETS["big_rss_growth_mib"],
        )
    )
    return rows


def print_report(r: dict[str, Any]) -> None:
    plan = r["plan"]
    print(
        f"broker benchmark: {r['payload_bytes']} B payloads, {r['machine']['cpus']} CPUs, python "
        f"{r['machine']['python']}; medians of {plan['rounds']} rounds of {plan['packets']:,} packets"
    )
    print()
    hdr = (
        f"{'nodes':>5} {'':8} {'pkts/s':>8} {'deliv/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'srv µs/pkt':>10} {'(sys)':>6} {'cli µs/pkt':>10} {'RSS conn':>9} {'RSS peak':>9}"
    )
    print(hdr)
    for c in r["configurations"]:
        for side, rss0, rss1 in (
            ("valise", c["broker_rss_connected_mib"], c["broker_rss_peak_mib"]),
            ("baseline", c["relay_rss_connected_mib"], c["relay_rss_peak_mib"]),
        ):
            s = c[side]
            print(
                f"{c['nodes'] if side == 'valise' else '':>5} {side:8} {s['packets_per_s']:>8,} "
                f"{s['delivered_per_s']:>8,} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} "
                f"{s['server_cpu_us_per_packet']:>10.0f} {s['server_sys_us_per_packet']:>6.0f} "
                f"{s['client_cpu_us_per_packet']:>10.0f} "
                f"{rss0:>7.0f} M {rss1:>7.0f} M"
            )
        print(
            f"{'':>5} {'ratio':8} {c['ratio_packets_per_s']:>8.1%}   (valise/baseline; in flight: "
            f"{c['depth']} per node; {c['valise']['errors']} errors)"
        )
    for c in r["configurations"]:
        f = c.get("followed")
        if f:
            print(
                f"{c['nodes']} nodes followed the log every {f['every_s']:g} s: {f['entries']:,} entries came as "
                f"{f['items']:,} items in {f['requests']:,} requests"
            )
    for c in r["configurations"]:
        o = c.get("open_loop")
        if o:
            print()
            print(f"open loop at {o['rate']:,.0f} packets/s, {c['nodes']} nodes, {o['seconds']} s rounds:")
            for side in ("valise", "baseline"):
                s = o[side]
                print(
                    f"  {side:8} p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  "
                    f"(achieved {s['packets_per_s']:,}/s; broker CPU {s['server_cpu_us_per_packet']:.0f} µs/pkt)"
                )
    b = r["big_packet"]
    print()
    print(
        f"one {b['payload_bytes'] >> 20} MiB packet ({b['packet_bytes']:,} bytes): relayed={b['relayed']}; "
        f"receipt after {b['receipt_s']} s, delivered after {b['relay_s']} s ({b['relay_mb_per_s']} MB/s); "
        f"broker RSS {b['broker_rss_before_mib']} → peak {b['broker_rss_peak_mib']} MiB"
    )
    print()
    print(f"{'target':<62} {'wanted':>10} {'measured':>14}  met?")
    for name, want, got, ok in verdicts(r):
        print(f"{name:<62} {want:>10} {got:>14}  {'yes' if ok else 'NO'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer and shorter rounds; a 64 MiB packet, not 1 GiB")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="write every figure to OUT as JSON")
    ap.add_argument("--nodes", default="2,50,196", help="node counts (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=None, help="closed-loop rounds per side (default 5; quick 3)")
    ap.add_argument("--packets", type=int, default=None, help="packets per round (default 4000; quick 1500)")
    ap.add_argument("--big", type=int, default=None, metavar="MIB", help="large packet size (default 1024; quick 64)")
    ap.add_argument(
        "--witnesses",
        type=int,
        default=None,
        help="how many nodes cosign checkpoints as witnesses (default: every node, as real nodes do)",
    )
    ap.add_argument(
        "--open-rate", type=float, default=1000.0, metavar="PER_S", help="open-loop offered load (default %(default)s)"
    )
    ap.add_argument(
        "--follow",
        type=float,
        default=None,
        metavar="SECONDS",
        help="every node also follows the log, as node daemons do, every SECONDS (default: they do not)",
    )
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR", help="py-spy the broker into DIR")
    ap.add_argument("--profile-cpu", action="store_true", help="profile CPU only (no samples of a blocked broker)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    global PROFILE_IDLE
    PROFILE_IDLE = not args.profile_cpu
    groups = tuple(sorted(int(x) for x in args.nodes.split(",")))
    if min(groups) < 2:
        ap.error("every configuration needs at least 2 nodes")
    plan = Plan(
        groups=groups,
        rounds=args.rounds or (3 if args.quick else 5),
        packets=args.packets or (1500 if args.quick else 4000),
        open_rate=args.open_rate,
        open_seconds=2.0 if args.quick else 5.0,
        open_rounds=3,
        big=(args.big or (64 if args.quick else 1024)) * MiB,
        witnesses=max(groups) if args.witnesses is None else args.witnesses,
        follow=args.follow,
    )
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-broker-") as tmp:
        results = trio.run(run, plan, Path(tmp), args.profile)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
