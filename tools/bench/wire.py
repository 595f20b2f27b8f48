"""Members as trio tasks in the bench process, over real TLS: valise wire-protocol members against the real
broker, and bare members against tools/relay_baseline.py (same TLS, same certificates, opaque frames).

A valise member submits pre-sealed packets (sealed before the clock starts, on every CPU), receives its
deliveries, signs an acknowledgement for each (the broker verifies it, logs it and forwards it to the sender,
who confirms with `seen`), and cosigns checkpoints as a witness. A bare member sends one DATA frame per
recipient (the relay knows no multi-recipient packets), the relay answers each with a RECEIPT and forwards it;
the recipient answers with an ACK that the relay forwards to the sender. The message pattern is the same; the
work that makes it trustworthy is not.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from common import TOOLS, WitnessCache, open_member_tls, percentile
from world import ORIGIN, World, name_of

from valise import identity, packet, records
from valise.errors import Error
from valise.tlog import cosignature
from valise.tlsstream import TLSSocketStream
from valise.wire import codes
from valise.wire import events as ev
from valise.wire.connection import READ_SIZE, Connection, Signal
from valise.wire.limits import SUPPORTED_VERSIONS
from valise.wire.state import Role

sys.path.insert(0, str(TOOLS))
import relay_baseline as rb

ROUND_TIMEOUT = 120.0


# --- packets, sealed before the clock starts ---------------------------------------------------------------


@dataclass
class Pkt:
    data: bytes
    head_size: int
    packet_id: bytes
    digest: bytes
    sender: int
    to: tuple[int, ...]
    t0: float = 0.0

    @property
    def head(self) -> bytes:
        return self.data[: self.head_size]


_MEMBERS: list[identity.Identity] = []
_PAYLOADS: dict[int, bytes] = {}


def _seal_one(job: tuple[int, tuple[int, ...], int]) -> tuple[bytes, int, bytes, bytes]:
    s, to, size = job
    from common import stix_bundle

    out = io.BytesIO()
    packet.seal(
        io.BytesIO(stix_bundle(size, name_of(s))),
        out,
        sender=_MEMBERS[s],
        recipients=[_MEMBERS[r].bundle for r in to],
        tlp="AMBER",
        categories=("malware",),
        content_type="application/stix+json;version=2.1",
        random=os.urandom,
        now=int(time.time()),
    )
    data = out.getvalue()
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return data, head.head_size, head.core.packet_id, head.digest


def seal_many(world: World, jobs: list[tuple[int, tuple[int, ...], int]]) -> list[Pkt]:
    """Seal STIX bundles for (sender, recipients, size) jobs on every CPU (fork: the workers inherit the keys)."""
    _MEMBERS[:] = world.members
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        sealed = pool.map(_seal_one, jobs, chunksize=max(1, min(256, len(jobs) // 8)))
    return [Pkt(d, hs, pid, dg, s, to) for (d, hs, pid, dg), (s, to, _) in zip(sealed, jobs, strict=True)]


def fan(n: int, i: int, m: int) -> tuple[int, ...]:
    """Member i's recipients: the next m members around the ring."""
    return tuple((i + k) % n for k in range(1, m + 1))


# --- one measured round ------------------------------------------------------------------------------------


@dataclass
class Round:
    packets: int
    deliveries: int
    receipts: int = 0
    delivered: int = 0
    acked: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    t_start: float = 0.0
    t_last: float = 0.0
    done: trio.Event = field(default_factory=trio.Event)

    def check(self) -> None:
        # Throughput counts until every copy is available to its recipient; acknowledgements travel meanwhile (each
        # is verified, logged and forwarded by the broker) but are not waited for.
        if self.receipts + len(self.errors) >= self.packets and self.delivered >= self.deliveries:
            self.done.set()


class Shared:
    """What the member tasks share: the round, the packets by head (valise) or id (bare), the witness cache."""

    def __init__(self, log_key: bytes | None) -> None:
        self.round = Round(0, 0)
        self.by_head: dict[bytes, Pkt] = {}
        self.by_id: dict[bytes, Pkt] = {}
        self.witness = WitnessCache(ORIGIN, log_key) if log_key else None


class Member:
    """What both kinds of member have: a TLS stream, an output queue and a writer lock, in-flight slots."""

    def __init__(self, shared: Shared, index: int, ident: identity.Identity, keydir: Path) -> None:
        self.shared = shared
        self.index = index
        self.name = ident.member_id
        self.ident = ident
        self.keydir = keydir
        self.out: list[bytes] = []
        self.lock = trio.Lock()
        self.slots = trio.Semaphore(1)
        self.wake = trio.Event()
        self.stream: TLSSocketStream

    async def open_tls(self, port: int, broker_cert: bytes) -> None:
        name = self.name
        self.stream = await open_member_tls(self.keydir, name, port, broker_cert)

    async def flush(self) -> None:
        async with self.lock:
            if self.out:
                data = b"".join(self.out)
                self.out.clear()
                await self.stream.send_all(data)

    def kick(self) -> None:
        """Have the writer task send what is queued. The reader never waits on a write: a bare relay has no flow
        control, and members whose readers block on writes can deadlock with it through full TCP buffers."""
        self.wake.set()

    async def writer(self) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            await self.flush()

    async def close(self) -> None:
        with trio.move_on_after(1):
            await trio.aclose_forcefully(self.stream)


class ValiseMember(Member):
    def __init__(self, shared: Shared, index: int, ident: identity.Identity, keydir: Path) -> None:
        super().__init__(shared, index, ident, keydir)
        self.conn = Connection(Role.CLIENT)
        self.cosigner = cosignature.Cosigner(self.name, ident.signing)
        self.inflight: dict[int, Pkt] = {}
        self.credit = trio.Event()
        self.delivery: list[Any] | None = None  # [seq, head, size, received]

    async def connect(self, port: int, broker_cert: bytes) -> None:
        await self.open_tls(port, broker_cert)
        self.queue(ev.Hello(SUPPORTED_VERSIONS, self.name, "node", 0, self.conn.limits))
        await self.flush()
        while True:
            event = self.conn.next_event()
            if isinstance(event, Signal):
                self.conn.receive_data(await self.stream.receive_some(READ_SIZE))
                continue
            if not isinstance(event, ev.Welcome):
                raise SystemExit(f"{self.name}: the broker answered hello with {event}")
            return

    def queue(self, msg: ev.Message) -> None:
        self.out.append(self.conn.send(msg))

    async def submit(self, p: Pkt, t0: float) -> None:
        """Submit a packet: begin, chunks within the broker's chunk limit and window, end."""
        assert self.conn.peer_limits is not None
        chunk = self.conn.peer_limits.chunk
        body = memoryview(p.data)[p.head_size :]
        rid = self.conn.new_rid()
        p.t0 = t0
        self.inflight[rid] = p
        self.queue(ev.SubmitBegin(rid, p.head, len(body)))
        sent = 0
        while sent < len(body):
            while self.conn.send_window == 0:
                self.credit = trio.Event()  # armed before the flush: the credit may come back while it writes
                await self.flush()
                await self.credit.wait()
            n = min(chunk, self.conn.send_window, len(body) - sent)
            self.queue(ev.SubmitChunk(rid, bytes(body[sent : sent + n])))
            sent += n
        self.queue(ev.SubmitEnd(rid))
        await self.flush()

    async def reader(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if isinstance(event, Signal):
                if self.out:
                    self.kick()
                conn.receive_data(await self.stream.receive_some(READ_SIZE))
                continue
            if isinstance(event, ev.ConnectionClosed | ev.Goodbye):
                return
            self.handle(event)

    def handle(self, event: ev.Message) -> None:
        r = self.shared.round
        if isinstance(event, ev.DeliverChunk):
            assert self.delivery is not None
            self.delivery[3] += len(event.data)
            window = self.conn.limits.window  # grant once half the window is used up, as the node does
            if self.conn.receive_window <= window // 2:
                self.queue(ev.Credit(window - self.conn.receive_window))
        elif isinstance(event, ev.DeliverBegin):
            self.delivery = [event.seq, event.head, event.size, 0]
        elif isinstance(event, ev.DeliverEnd):
            self.delivered()
        elif isinstance(event, ev.Receipt | ev.Deny | ev.ErrorMessage) and event.rid in self.inflight:
            self.inflight.pop(event.rid)
            self.slots.release()
            if isinstance(event, ev.Receipt):
                r.receipts += 1
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
        seq, head, size, got = self.delivery
        self.delivery = None
        r = self.shared.round
        now = trio.current_time()
        p = self.shared.by_head.get(head)
        if p is None or got != size or self.index not in p.to:
            r.errors.append(f"{self.name}: delivery seq {seq} is unknown or incomplete ({got} of {size} bytes)")
            return
        r.delivered += 1
        r.t_last = max(r.t_last, now)
        r.latencies.append(now - p.t0)
        ack = records.Ack.make(
            self.ident.signing, p.packet_id, p.digest, name_of(p.sender), self.name, int(time.time())
        )
        self.queue(ev.Ack(seq, p.packet_id, ack.raw))
        r.check()

    def cosign(self, msg: ev.CosignRequest) -> None:
        try:
            assert self.shared.witness is not None
            cp = self.shared.witness.check(msg.checkpoint, msg.old, msg.proof)
        except Error as exc:
            self.queue(ev.ErrorMessage(msg.rid, codes.CONFLICT, exc.what[:900]))
            return
        self.queue(ev.CosignResponse(msg.rid, self.cosigner.cosign(cp, int(time.time())).line().encode()))


class BareMember(Member):
    def __init__(self, shared: Shared, index: int, ident: identity.Identity, keydir: Path) -> None:
        super().__init__(shared, index, ident, keydir)
        self.pending: dict[bytes, int] = {}  # packet id → receipts still expected

    async def connect(self, port: int, broker_cert: bytes) -> None:
        await self.open_tls(port, broker_cert)

    async def submit(self, p: Pkt, t0: float) -> None:
        p.t0 = t0
        self.pending[p.packet_id] = len(p.to)
        body = p.packet_id + p.data[16:]
        for r in p.to:
            self.out.append(rb.frame(rb.DATA, r, body))
        self.kick()

    async def reader(self) -> None:
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
                self.kick()

    def handle(self, kind: int, peer: int, body: bytes) -> None:
        r = self.shared.round
        if kind == rb.RECEIPT:
            pid = body[:16]
            self.pending[pid] -= 1
            if self.pending[pid] == 0:
                del self.pending[pid]
                self.slots.release()
                r.receipts += 1
        elif kind == rb.DATA:
            p = self.shared.by_id.get(body[:16])
            now = trio.current_time()
            if p is None or len(body) != len(p.data) or self.index not in p.to:
                r.errors.append(f"{self.name}: unknown or incomplete frame from {peer}")
                return
            r.delivered += 1
            r.t_last = max(r.t_last, now)
            r.latencies.append(now - p.t0)
            self.out.append(rb.frame(rb.ACK, peer, body[:16]))
        elif kind == rb.ACK:
            r.acked += 1
        r.check()


# --- driving a round ---------------------------------------------------------------------------------------


@dataclass
class Result:
    packets: int
    deliveries: int
    seconds: float
    packets_per_s: float
    deliveries_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float
    errors: int


async def run_round(shared: Shared, server: Any, members: Sequence[Member], pkts: list[Pkt], depth: int) -> Result:
    """Closed loop: each member keeps `depth` packets in flight (a receipt frees a slot). Throughput counts until
    the last delivery (publish → available to every recipient); latency is per delivery."""
    shared.by_head.clear()
    shared.by_id.clear()
    for p in pkts:
        shared.by_head[p.head] = p
        shared.by_id[p.packet_id] = p
    r = shared.round = Round(len(pkts), sum(len(p.to) for p in pkts))
    share: dict[int, list[Pkt]] = {}
    for p in pkts:
        share.setdefault(p.sender, []).append(p)

    async def one(member: Member, mine: list[Pkt]) -> None:
        member.slots = trio.Semaphore(depth)
        for p in mine:
            await member.slots.acquire()
            await member.submit(p, trio.current_time())

    cpu0 = server.cpu()
    r.t_start = trio.current_time()
    with trio.move_on_after(ROUND_TIMEOUT) as scope:
        async with trio.open_nursery() as nursery:
            for m in members:
                nursery.start_soon(one, m, share.get(m.index, []))
            await r.done.wait()
    if scope.cancelled_caught:
        r.errors.append(f"timed out: {r.receipts} receipts, {r.delivered}/{r.deliveries} delivered, {r.acked} acks")
    cpu = server.cpu() - cpu0
    for e in r.errors[:3]:
        print(f"  ! {e}", file=sys.stderr)
    secs = max(r.t_last - r.t_start, 1e-9)
    return Result(
        packets=len(pkts),
        deliveries=r.deliveries,
        seconds=round(secs, 3),
        packets_per_s=len(pkts) / secs,
        deliveries_per_s=r.delivered / secs,
        p50_ms=percentile(r.latencies, 0.5) * 1e3,
        p99_ms=percentile(r.latencies, 0.99) * 1e3,
        server_cpu_s=cpu,
        errors=len(r.errors),
    )


def depth_for(n: int) -> int:
    """Packets in flight per member: enough to keep a small group busy, not a queue of thousands at 196."""
    return max(1, min(16, math.ceil(64 / n)))
