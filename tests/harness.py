"""Real brokers and real wire clients for tests: broker directories on disk, TLS on 127.0.0.1, no mocks."""

from __future__ import annotations

import io
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from valise import identity, keyfiles, packet, tls
from valise.broker.daemon import BrokerDaemon, Settings
from valise.broker.home import BrokerHome
from valise.cli.main import main as cli
from valise.packet.format import PREFIX_SIZE, SIGNATURE_SIZE, parse_prefix
from valise.policy import records as prec
from valise.store.sqlite import SqliteLog
from valise.wire import events as ev
from valise.wire.connection import READ_SIZE, Connection, Signal
from valise.wire.limits import SUPPORTED_VERSIONS
from valise.wire.state import Role

from .conftest import seeded_random

ORIGIN = "test.valise/log"


@dataclass
class World:
    """A broker directory with members admitted, and each member's identity saved on disk."""

    root: Path
    home: BrokerHome
    members: dict[str, identity.Identity]
    dirs: dict[str, Path]
    seq: int = 0

    def operator(self, op: str, **fields: object) -> None:
        self.seq += 1
        entry = prec.dir_record(self.home.operator_key(), ORIGIN, self.seq, int(time.time()), op, **fields)
        self.append(entry)

    def rule(self, rule: str, **fields: object) -> None:
        self.seq += 1
        self.append(prec.rule_record(self.home.operator_key(), ORIGIN, self.seq, int(time.time()), rule, **fields))

    def append(self, entry: bytes) -> None:
        with SqliteLog.open(self.home.db_path) as store:
            store.append([entry])

    def consent(self, sender: str, recipient: str, tlp: str = "AMBER", categories: list[str] | None = None) -> None:
        """`sender` grants `recipient`, and `recipient` accepts `sender` (both signed by their own keys)."""
        now = int(time.time())
        s, r = self.members[sender], self.members[recipient]
        self.append(
            prec.grant(
                s.signing, origin=ORIGIN, author=sender, created=now, to=recipient, tlp=tlp, categories=categories
            )
        )
        self.append(
            prec.accept(
                r.signing, origin=ORIGIN, author=recipient, created=now, source=sender, tlp=tlp, categories=categories
            )
        )


def make_world(root: Path, names: tuple[str, ...] = ("FRA", "DEU", "ITA"), kind: str = "country") -> World:
    assert cli(["broker", "init", "--dir", str(root / "broker"), "--origin", ORIGIN]) == 0
    home = BrokerHome.open(root / "broker")
    world = World(root, home, {}, {})
    for name in names:
        ident = identity.generate(name, seeded_random(b"world" + name.encode()), int(time.time()))
        d = root / "keys" / name
        keyfiles.save_identity(d, ident, None)
        world.members[name] = ident
        world.dirs[name] = d
        world.operator(
            "member-add", id=name, kind=kind, name=f"{name} bureau", region="europe", bundle=ident.bundle.raw
        )
    return world


def seal(
    world: World,
    sender: str,
    to: list[str],
    payload: bytes,
    *,
    tlp: str = "AMBER",
    categories: tuple[str, ...] = ("malware",),
    packet_id: bytes | None = None,
) -> bytes:
    out = io.BytesIO()
    rnd = seeded_random(packet_id) if packet_id is not None else os.urandom
    packet.seal(
        io.BytesIO(payload),
        out,
        sender=world.members[sender],
        recipients=[world.members[r].bundle for r in to],
        tlp=tlp,
        categories=categories,
        content_type="application/octet-stream",
        random=rnd,
        now=int(time.time()),
    )
    return out.getvalue()


@asynccontextmanager
async def running_broker(world: World, **settings: object) -> AsyncIterator[BrokerDaemon]:
    cfg = Settings(listen=("127.0.0.1", 0), http=("127.0.0.1", 0), checkpoint_interval=0.2, policy_poll=0.1)
    for k, v in settings.items():
        setattr(cfg, k, v)
    daemon = BrokerDaemon(world.home, cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        yield daemon
        nursery.cancel_scope.cancel()


class WireClient:
    """A member's side of one connection, speaking the real wire protocol over real TLS."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], member: str) -> None:
        self.stream = stream
        self.member = member
        self.conn = Connection(Role.CLIENT)

    @classmethod
    @asynccontextmanager
    async def connect(cls, world: World, member: str, port: int, *, hello: bool = True) -> AsyncIterator[WireClient]:
        d = world.dirs[member]
        ctx = tls.client_context(
            d / f"{member}.tls.crt", d / f"{member}.tls.key", world.home.broker_identity().bundle.cert_der
        )
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx)
        client = cls(stream, member)
        try:
            await stream.do_handshake()
            if hello:
                await client.send(ev.Hello(SUPPORTED_VERSIONS, member, "node", 0, client.conn.limits))
                welcome = await client.next()
                assert isinstance(welcome, ev.Welcome), welcome
            yield client
        finally:
            await trio.aclose_forcefully(stream)

    async def send(self, msg: ev.Message) -> None:
        await self.stream.send_all(self.conn.send(msg))

    async def next(self, within: float = 10.0) -> ev.Event:
        with trio.fail_after(within):
            while True:
                event = self.conn.next_event()
                if not isinstance(event, Signal):
                    return event
                self.conn.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))

    async def next_of(self, kind: type[ev.Message], within: float = 10.0) -> ev.Message:
        """The next event of type `kind`, answering credits and skipping others."""
        while True:
            event = await self.next(within)
            if isinstance(event, kind):
                return event
            assert not isinstance(event, ev.ConnectionClosed | ev.ErrorMessage), event

    async def submit(self, data: bytes) -> ev.Message:
        # Split by the length prefix only, so that a test can submit a head the broker must refuse.
        head_size = PREFIX_SIZE + parse_prefix(data[:PREFIX_SIZE]) + SIGNATURE_SIZE
        rid = self.conn.new_rid()
        await self.send(ev.SubmitBegin(rid, data[:head_size], len(data) - head_size))
        pos = head_size
        answer: ev.Message | None = None
        while pos < len(data) and answer is None:
            while self.conn.send_window == 0:
                event = await self.next()
                if isinstance(event, ev.Receipt | ev.Deny | ev.ErrorMessage):
                    answer = event
                    break
            if answer is not None:
                break
            n = min(self.conn.send_window, 256 * 1024, len(data) - pos)
            await self.send(ev.SubmitChunk(rid, data[pos : pos + n]))
            pos += n
        if answer is None:
            await self.send(ev.SubmitEnd(rid))
        else:
            await self.send(ev.SubmitCancel(rid) if pos < len(data) else ev.SubmitEnd(rid))
        while answer is None:
            event = await self.next()
            if isinstance(event, ev.Receipt | ev.Deny | ev.ErrorMessage) and getattr(event, "rid", None) == rid:
                answer = event
        return answer

    async def receive_delivery(self) -> tuple[int, bytes]:
        """Receive one pushed packet (granting credit as we go); return (seq, whole packet bytes)."""
        begin = await self.next_of(ev.DeliverBegin)
        assert isinstance(begin, ev.DeliverBegin)
        data = bytearray(begin.head)
        while True:
            event = await self.next()
            if isinstance(event, ev.DeliverChunk):
                data += event.data
                await self.send(ev.Credit(len(event.data)))
            elif isinstance(event, ev.DeliverEnd):
                return begin.seq, bytes(data)
            else:
                raise AssertionError(f"unexpected {event} inside a delivery")
