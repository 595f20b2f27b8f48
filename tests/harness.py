"""Real brokers and real wire clients for tests: broker directories on disk, TLS on 127.0.0.1, no mocks."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from valise import encoding, identity, keyfiles, packet, records, tls
from valise.broker.daemon import BrokerDaemon, Settings
from valise.broker.home import BrokerHome
from valise.cli.main import main as cli
from valise.crypto import sign
from valise.node.daemon import NodeDaemon
from valise.node.home import NodeHome
from valise.packet.format import PREFIX_SIZE, SIGNATURE_SIZE, parse_prefix
from valise.policy import records as prec
from valise.store.sqlite import SqliteLog
from valise.tlog import note
from valise.wire import codec, codes, frames
from valise.wire import events as ev
from valise.wire.connection import READ_SIZE, Connection, Signal
from valise.wire.limits import SUPPORTED_VERSIONS, Limits
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


def make_world(
    root: Path, names: tuple[str, ...] = ("FRA", "DEU", "ITA"), kind: str = "country", init: tuple[str, ...] = ()
) -> World:
    """`init`: more arguments for `valise broker init`."""
    assert cli(["broker", "init", "--dir", str(root / "broker"), "--origin", ORIGIN, *init]) == 0
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
    expires: int | None = None,
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
        expires=expires,
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


def _not_closed(event: ev.Event) -> None:
    # A closed connection yields ConnectionClosed again at once on every read, without a checkpoint: a loop that
    # waits for an answer must stop there, or it spins where no timeout can cancel it (a broker that died).
    if isinstance(event, ev.ConnectionClosed):
        raise AssertionError("the broker closed the connection")


class WireClient:
    """A member's side of one connection, speaking the real wire protocol over real TLS."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], member: str) -> None:
        self.stream = stream
        self.member = member
        self.conn = Connection(Role.CLIENT)
        # Answer the broker's cosign requests with a refusal inside next() (a member that is not a witness);
        # off by default so that a test can see the requests.
        self.refuse_cosign = False
        self._pings = 0

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        world: World,
        member: str,
        port: int,
        *,
        hello: bool = True,
        limits: Limits | None = None,
        role: str = "node",
        seen: int = 0,
    ) -> AsyncIterator[WireClient]:
        d = world.dirs[member]
        ctx = tls.client_context(d / f"{member}.tls.crt", d / f"{member}.tls.key", world.home.broker_bundle().cert_der)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx)
        client = cls(stream, member)
        if limits is not None:
            client.conn = Connection(Role.CLIENT, limits)
        try:
            await stream.do_handshake()
            if hello:
                await client.send(ev.Hello(SUPPORTED_VERSIONS, member, role, seen, client.conn.limits))
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
                if isinstance(event, ev.CosignRequest) and self.refuse_cosign:
                    await self.send(ev.ErrorMessage(event.rid, codes.REFUSED, f"{self.member} is not a witness"))
                    continue
                if not isinstance(event, Signal):
                    return event
                self.conn.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))

    async def sync(self) -> None:
        """A ping/pong round trip: everything the broker did before answering is done.

        (It once closed a race: the broker recorded a pushed item only after its last frame, so an `ack` sent the
        instant `deliver-end` arrived could be dropped. The broker now records it before the first frame, and
        test_broker_races acknowledges at once; Traffic still syncs, which costs a round trip and nothing else.)"""
        self._pings += 1
        n = self._pings
        await self.send(ev.Ping(n))
        pong = await self.next_of(ev.Pong)
        assert isinstance(pong, ev.Pong)
        assert pong.n == n

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
                _not_closed(event)
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
            _not_closed(event)
            if isinstance(event, ev.Receipt | ev.Deny | ev.ErrorMessage) and getattr(event, "rid", None) == rid:
                answer = event
        return answer

    async def submit_frames(self, data: bytes) -> int:
        """Send a packet's submit-begin, one chunk and submit-end without waiting for the answer; its rid."""
        head = packet.parse_head(data)
        assert isinstance(head, packet.Head)
        rid = self.conn.new_rid()
        await self.send(ev.SubmitBegin(rid, data[: head.head_size], len(data) - head.head_size))
        await self.send(ev.SubmitChunk(rid, data[head.head_size :]))
        await self.send(ev.SubmitEnd(rid))
        return rid

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
            elif not isinstance(event, ev.CosignRequest):  # requests may interleave with a push; ours go unanswered
                raise AssertionError(f"unexpected {event} inside a delivery")


def long_reason_retraction(key: sign.SigningKey, packet_id: bytes, digest: bytes, sender: str) -> bytes:
    """A retraction signed correctly, with a reason over REASON_MAX: what `make` would never produce."""
    body = encoding.pack(
        {"v": 1, "packet_id": packet_id, "digest": digest, "sender": sender, "reason": "x" * 600, "at": 1}
    )
    return encoding.pack({"body": body, "sig": key.sign(records.RETRACT_DOMAIN, body)})


# --- fault and abuse helpers (tests/test_broker_faults.py) ----------------------------------------------------------


def raw_frame(msg: ev.Message) -> bytes:
    """The frame for `msg` without the sender's state machine: how a test sends what a correct client never would."""
    return frames.frame(codec.encode(msg))


async def read_until_closed(stream: trio.abc.ReceiveStream, within: float = 10.0) -> bytes:
    """Everything the peer sends until it closes (EOF or reset); fails if it is still open after `within`."""
    got = bytearray()
    with trio.fail_after(within):
        while True:
            try:
                chunk = await stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return bytes(got)
            if not chunk:
                return bytes(got)
            got += chunk


def split_frames(data: bytes) -> list[ev.Message]:
    """Decode a byte stream of whole frames (no state machine: it may start with a server's fatal error)."""
    out = []
    pos = 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        assert pos + 4 + n <= len(data), "the stream ends inside a frame"
        out.append(codec.decode(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


async def expect_fatal(client: WireClient, code: str) -> ev.ErrorMessage:
    """The broker's last frame is a fatal `error` (no rid) with `code`, and then it closes the connection.

    Reads the stream directly (the client's state machine has not seen what the test sent behind its back)."""
    received = split_frames(await read_until_closed(client.stream))
    assert received, "the broker closed without an error frame"
    last = received[-1]
    assert isinstance(last, ev.ErrorMessage), received
    assert (last.rid, last.code) == (None, code), last
    return last


class Traffic:
    """A legitimate exchange running in the background: `sender` submits, `recipient` receives and acks, the
    sender gets the acknowledgement forwarded. Each full round increments `rounds`."""

    def __init__(self, world: World, sender: WireClient, recipient: WireClient) -> None:
        self.world = world
        self.sender = sender
        self.recipient = recipient
        self.rounds = 0
        self.stopping = False
        self._changed = trio.Event()

    async def run(self) -> None:
        while not self.stopping:
            data = seal(self.world, self.sender.member, [self.recipient.member], b"legit %d" % self.rounds)
            answer = await self.sender.submit(data)
            assert isinstance(answer, ev.Receipt), answer
            seq, got = await self.recipient.receive_delivery()
            assert got == data
            head = packet.parse_head(got)
            assert isinstance(head, packet.Head)
            await self.recipient.sync()
            me = self.world.members[self.recipient.member]
            ack = records.Ack.make(
                me.signing,
                head.core.packet_id,
                head.digest,
                self.sender.member,
                self.recipient.member,
                int(time.time()),
            )
            await self.recipient.send(ev.Ack(seq, head.core.packet_id, ack.raw))
            forwarded = await self.sender.next_of(ev.AckForward)
            assert isinstance(forwarded, ev.AckForward)
            assert forwarded.id == head.core.packet_id
            await self.sender.send(ev.Seen(forwarded.seq))
            self.rounds += 1
            self._changed.set()
            self._changed = trio.Event()

    async def progress(self, n: int = 2, within: float = 20.0) -> None:
        """Wait until `n` more rounds have completed (the legitimate members are still served)."""
        target = self.rounds + n
        with trio.fail_after(within):
            while self.rounds < target:
                await self._changed.wait()


async def close_gracefully(client: WireClient) -> None:
    """End a session with TLS close_notify, the way a node that shuts down cleanly does."""
    with trio.move_on_after(2):
        await client.stream.aclose()


@asynccontextmanager
async def legit_traffic(world: World, port: int, sender: str = "FRA", recipient: str = "DEU") -> AsyncIterator[Traffic]:
    """Run a Traffic loop for the duration of the block; on exit, require one more round, stop at a round's
    end and close both sessions cleanly (so that only what the test does is under test)."""
    async with WireClient.connect(world, sender, port) as s, WireClient.connect(world, recipient, port) as r:
        s.refuse_cosign = r.refuse_cosign = True
        traffic = Traffic(world, s, r)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.run)
            await traffic.progress(1)
            yield traffic
            await traffic.progress(1)
            traffic.stopping = True
        await close_gracefully(s)
        await close_gracefully(r)


class BrokerProcess:
    """`valise broker serve` as a real child process (so that a test can SIGKILL it)."""

    def __init__(
        self,
        directory: Path,
        log_file: Path,
        checkpoint_interval: float = 0.2,
        *,
        nofile: tuple[int, int] | None = None,
    ) -> None:
        """`nofile`: the child's (soft, hard) RLIMIT_NOFILE, as a service manager would set it."""
        self.log_file = log_file
        self._log = log_file.open("ab")
        cmd = [sys.executable, "-m", "valise.cli.main", "broker", "serve", "--dir", str(directory)]
        cmd += ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--checkpoint-interval", str(checkpoint_interval)]
        if nofile is not None:
            # Set in a small launcher that then becomes the broker (exec): preexec_fn is unsafe with threads.
            launcher = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); os.execv(sys.executable, [sys.executable, *sys.argv[3:]])"  # noqa: E501
            cmd = [sys.executable, "-c", launcher, str(nofile[0]), str(nofile[1]), *cmd[1:]]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log)
        self.port = 0
        self.http_port = 0

    async def started(self) -> BrokerProcess:
        assert self.proc.stdout is not None
        line = await trio.to_thread.run_sync(self.proc.stdout.readline)
        found = re.search(rb"listening on 127\.0\.0\.1:(\d+), tiles on http://127\.0\.0\.1:(\d+)/", line)
        if found is None:
            self.kill()
            raise AssertionError(f"broker did not start: {line!r}; log: {self.log_file.read_text()[-2000:]}")
        self.port, self.http_port = int(found[1]), int(found[2])
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@asynccontextmanager
async def broker_process(
    directory: Path, log_file: Path, *, nofile: tuple[int, int] | None = None
) -> AsyncIterator[BrokerProcess]:
    proc = BrokerProcess(directory, log_file, nofile=nofile)
    try:
        yield await proc.started()
    finally:
        proc.kill()


async def http_get(port: int, path: str, request: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET over a fresh connection (Connection: close): status, headers, body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        req = request or f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        await stream.send_all(req)
        raw = await read_until_closed(stream)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    assert int(headers["content-length"]) == len(body), headers
    return status, headers, body


def log_vkey(world: World) -> str:
    """The broker's log key as a note verifier key (what a node pins)."""
    return note.Ed25519Signer(ORIGIN, world.home.log_key()).verifier().vkey()


@asynccontextmanager
async def running_node(
    world: World, port: int, where: Path, *, policy: str | None = None, poll_interval: float = 0.2
) -> AsyncIterator[NodeDaemon]:
    """FRA's node daemon in a new directory `where`, connected over mutual TLS to the broker on `port`, serving
    its control socket."""
    home = NodeHome.create(
        where, world.dirs["FRA"], f"127.0.0.1:{port}", world.home.broker_bundle_path, log_vkey(world), policy
    )
    async with serving_node(world, home, poll_interval=poll_interval) as daemon:
        yield daemon


@asynccontextmanager
async def serving_node(world: World, home: NodeHome, *, poll_interval: float = 0.2) -> AsyncIterator[NodeDaemon]:
    """FRA's node daemon on an existing directory, until the block ends; it has connected when the block starts."""
    daemon = NodeDaemon(home, world.members["FRA"], poll_interval=poll_interval)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            with trio.fail_after(10):
                await daemon.connected_event.wait()
            yield daemon
            nursery.cancel_scope.cancel()
    finally:
        daemon.store.close()
