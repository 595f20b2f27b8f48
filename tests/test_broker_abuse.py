"""Bad input against a running broker (real TLS on 127.0.0.1): each bad client gets a clear error or a closed
connection, while a legitimate FRA → DEU exchange keeps going (specs/wire.md, "Security considerations").

Every attack runs inside `legit_traffic`, which requires the exchange to make progress before, during (the
explicit `progress` calls, made while the bad connection is still open) and after the attack.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from valise import identity, keyfiles, packet, records, tls
from valise.broker import daemon as broker_daemon
from valise.wire import codes
from valise.wire import events as ev
from valise.wire.limits import DEFAULT_LIMITS, HANDSHAKE_FRAME, SUPPORTED_VERSIONS

from .conftest import seeded_random
from .harness import (
    ORIGIN,
    WireClient,
    World,
    broker_process,
    close_gracefully,
    expect_fatal,
    http_get,
    legit_traffic,
    make_world,
    raw_frame,
    read_until_closed,
    running_broker,
    seal,
)

# The attacker uses ITA's certificate where a valid one is needed: FRA and DEU carry the legitimate traffic,
# and the broker keeps one session per member.
ATTACKER = "ITA"


def _world(tmp_path: Path) -> World:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    return world


def _noise(n: int, seed: bytes) -> bytes:
    return seeded_random(b"noise" + seed)(n)


# --- bytes that are not the protocol ------------------------------------------------------------------------------


async def test_random_bytes_after_tls_are_refused_before_buffering(tmp_path: Path) -> None:
    world = _world(tmp_path)
    async with running_broker(world) as broker, legit_traffic(world, broker.port) as traffic:
        noise = _noise(8192, b"after-tls")
        # The seed gives a length prefix far over the 4 KiB first-frame limit: refused from those 4 bytes alone.
        assert int.from_bytes(noise[:4], "big") > HANDSHAKE_FRAME
        async with WireClient.connect(world, ATTACKER, broker.port, hello=False) as bad:
            await bad.stream.send_all(noise)
            await traffic.progress()
            await expect_fatal(bad, codes.FRAME_TOO_LARGE)


async def test_random_payload_in_a_well_formed_frame_is_bad_encoding(tmp_path: Path) -> None:
    world = _world(tmp_path)
    async with running_broker(world) as broker, legit_traffic(world, broker.port) as traffic:
        body = b"\xde" + _noise(299, b"payload")  # map16 with a random count: not canonical msgpack
        async with WireClient.connect(world, ATTACKER, broker.port, hello=False) as bad:
            await bad.stream.send_all(len(body).to_bytes(4, "big") + body)
            await traffic.progress()
            await expect_fatal(bad, codes.BAD_ENCODING)


async def test_random_bytes_instead_of_tls_close_the_connection(tmp_path: Path) -> None:
    world = _world(tmp_path)
    async with running_broker(world) as broker, legit_traffic(world, broker.port) as traffic:
        for i in range(3):
            tcp = await trio.open_tcp_stream("127.0.0.1", broker.port)
            async with tcp:
                await tcp.send_all(_noise(4096, b"tls%d" % i))
                # Closed by the TLS refusal, well before the handshake timeout would do it.
                got = await read_until_closed(tcp, within=broker_daemon.HANDSHAKE_TIMEOUT / 2)
                assert len(got) < 64  # at most a TLS alert
            await traffic.progress(1)
        assert broker.connections == 2  # only the legitimate pair is left


async def test_connections_reset_before_tls_do_not_stop_the_broker(tmp_path: Path) -> None:
    """A client that connects and resets at once (with or without sending a byte first) ends only its own
    connection: wrapping a socket whose peer is gone fails, and it once stopped the whole broker."""
    world = _world(tmp_path)
    async with running_broker(world) as broker, legit_traffic(world, broker.port) as traffic:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", broker.port))
            if i % 2:
                s.sendall(b"\x16")  # the first byte of a TLS record: the broker may see data, then the reset
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # SO_LINGER 0: a reset, often before the broker's handler has run
            await trio.sleep(0.02)
        await traffic.progress(2)
        with trio.fail_after(5):
            while broker.connections != 2:  # noqa: ASYNC110 - waits for the broker to drop the reset ones
                await trio.sleep(0.05)


# --- frames over the limit, frames out of order ---------------------------------------------------------------------


async def test_frame_over_the_limit_is_refused_from_its_length_prefix(tmp_path: Path) -> None:
    world = _world(tmp_path)
    async with running_broker(world) as broker, legit_traffic(world, broker.port) as traffic:
        # First frame: over the 4 KiB handshake limit. Only the 4 bytes are sent: the broker must not wait for
        # the body it announces (if it did, expect_fatal would time out).
        async with WireClient.connect(world, ATTACKER, broker.port, hello=False) as bad:
            await bad.stream.send_all((HANDSHAKE_FRAME + 1).to_bytes(4, "big"))
            await traffic.progress()
            await expect_fatal(bad, codes.FRAME_TOO_LARGE)
        # After the handshake: over the announced frame limit.
        async with WireClient.connect(world, ATTACKER, broker.port) as bad:
            await bad.stream.send_all((DEFAULT_LIMITS.frame + 1).to_bytes(4, "big"))
            await traffic.progress()
            await expect_fatal(bad, codes.FRAME_TOO_LARGE)
        # A zero length prefix.
        async with WireClient.connect(world, ATTACKER, broker.port) as bad:
            await bad.stream.send_all(bytes(4))
            await expect_fatal(bad, codes.BAD_FRAME)


BIG_CHUNK = b"x" * (DEFAULT_LIMITS.chunk + 1)
OUT_OF_ORDER: list[tuple[str, list[ev.Message], str]] = [
    ("chunk without begin", [ev.SubmitChunk(7, b"x" * 100)], codes.UNEXPECTED_FRAME),
    ("end without begin", [ev.SubmitEnd(7)], codes.UNEXPECTED_FRAME),
    ("second hello", [ev.Hello(SUPPORTED_VERSIONS, ATTACKER, "node", 0, DEFAULT_LIMITS)], codes.UNEXPECTED_FRAME),
    ("pong without ping", [ev.Pong(3)], codes.UNEXPECTED_FRAME),
    ("seen for nothing pushed", [ev.Seen(41)], codes.UNEXPECTED_FRAME),
    ("ack for nothing pushed", [ev.Ack(41, bytes(16), b"sig")], codes.UNEXPECTED_FRAME),
    ("cosign answer never asked", [ev.CosignResponse(5, b"- x y\n")], codes.UNEXPECTED_FRAME),
    ("server message from a client", [ev.Receipt(1, bytes(16), 1, bytes(32), b"r")], codes.UNEXPECTED_FRAME),
    ("credit over the maximum", [ev.Credit(2**31 - 1)], codes.FLOW_CONTROL),
    ("begin twice with one rid", [ev.SubmitBegin(1, b"h", 10), ev.SubmitBegin(1, b"h", 10)], codes.DUPLICATE_REQUEST),
    (
        "chunk over the chunk limit",
        [ev.SubmitBegin(1, b"h", len(BIG_CHUNK)), ev.SubmitChunk(1, BIG_CHUNK)],
        codes.LIMIT_EXCEEDED,
    ),
    (
        "end before the declared size",
        [ev.SubmitBegin(1, b"h", 10), ev.SubmitChunk(1, b"x"), ev.SubmitEnd(1)],
        codes.LENGTH_MISMATCH,
    ),
]


@pytest.mark.parametrize(("case", "msgs", "code"), OUT_OF_ORDER, ids=[c[0] for c in OUT_OF_ORDER])
async def test_frames_out_of_order_are_fatal_with_their_code(
    tmp_path: Path, case: str, msgs: list[ev.Message], code: str
) -> None:
    world = _world(tmp_path)
    async with (
        running_broker(world) as broker,
        legit_traffic(world, broker.port) as traffic,
        WireClient.connect(world, ATTACKER, broker.port) as bad,
    ):
        await bad.stream.send_all(b"".join(raw_frame(m) for m in msgs))
        await traffic.progress(1)
        err = await expect_fatal(bad, code)
        assert err.message, case


async def test_a_frame_before_hello_is_expected_hello(tmp_path: Path) -> None:
    world = _world(tmp_path)
    async with (
        running_broker(world) as broker,
        legit_traffic(world, broker.port) as traffic,
        WireClient.connect(world, ATTACKER, broker.port, hello=False) as bad,
    ):
        await bad.stream.send_all(raw_frame(ev.SubmitChunk(1, b"x")))
        await traffic.progress(1)
        await expect_fatal(bad, codes.EXPECTED_HELLO)


# --- TLS: unknown certificates, handshakes that never finish ------------------------------------------------------


def _stranger(tmp_path: Path, name: str = "XXX") -> Path:
    """A well-formed identity the directory has never heard of."""
    d = tmp_path / "strangers" / name
    keyfiles.save_identity(
        d, identity.generate(name, seeded_random(b"stranger" + name.encode()), int(time.time())), None
    )
    return d


async def _tls_attempt(ctx: ssl.SSLContext, port: int, member: str) -> ev.Event | Exception:
    """Handshake, say hello, read the answer; the exception if TLS refused us (as a value, to assert on)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx)
    client = WireClient(stream, member)
    try:
        with trio.fail_after(5):
            await stream.do_handshake()
            # TLS 1.3: the server checks the client certificate after the client has finished, so the refusal
            # may only surface on the first read.
            await client.send(ev.Hello(SUPPORTED_VERSIONS, member, "node", 0, client.conn.limits))
            return await client.next()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        return exc
    finally:
        await trio.aclose_forcefully(stream)


async def test_unknown_certificate_is_refused_in_the_handshake(tmp_path: Path) -> None:
    world = _world(tmp_path)
    stranger = _stranger(tmp_path)
    broker_cert = world.home.broker_identity().bundle.cert_der
    async with running_broker(world) as broker, legit_traffic(world, broker.port) as traffic:
        ctx = tls.client_context(stranger / "XXX.tls.crt", stranger / "XXX.tls.key", broker_cert)
        # Claiming a stranger's name and claiming a member's name: the certificate decides, not the hello.
        for claimed in ("XXX", ATTACKER):
            outcome = await _tls_attempt(ctx, broker.port, claimed)
            # Closed, never welcomed, and told why: the broker lets the client read its TLS alert before closing
            # (a close with the client's bytes unread would reset the connection and discard the alert).
            assert isinstance(outcome, trio.BrokenResourceError), outcome
            assert isinstance(outcome.__cause__, ssl.SSLError), outcome.__cause__
            assert "alert unknown ca" in str(outcome.__cause__)
            await traffic.progress(1)
        # No client certificate at all.
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.check_hostname = False
        bare.verify_mode = ssl.CERT_NONE
        bare.set_alpn_protocols([tls.ALPN])
        outcome = await _tls_attempt(bare, broker.port, ATTACKER)
        assert isinstance(outcome, trio.BrokenResourceError), outcome
        assert "alert certificate required" in str(outcome.__cause__), outcome.__cause__
        await traffic.progress(1)


async def test_handshakes_that_never_finish_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Configuration, not a mock: the daemon reads its handshake deadline from this module-level setting.
    monkeypatch.setattr(broker_daemon, "HANDSHAKE_TIMEOUT", 1.0)
    world = _world(tmp_path)
    async with running_broker(world) as broker, legit_traffic(world, broker.port) as traffic:
        silent = await trio.open_tcp_stream("127.0.0.1", broker.port)
        partial = await trio.open_tcp_stream("127.0.0.1", broker.port)
        await partial.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
        async with WireClient.connect(world, ATTACKER, broker.port, hello=False) as mute:  # TLS done, no hello
            await traffic.progress()  # served while the three hang
            async with silent, partial:
                for stream in (silent, partial, mute.stream):
                    await read_until_closed(stream, within=broker_daemon.HANDSHAKE_TIMEOUT + 5)
        await traffic.progress(1)
        assert broker.connections == 2


async def test_a_session_without_hello_is_told_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_daemon, "HANDSHAKE_TIMEOUT", 1.0)
    world = _world(tmp_path)
    async with (
        running_broker(world) as broker,
        WireClient.connect(world, ATTACKER, broker.port, hello=False) as mute,
    ):
        await expect_fatal(mute, codes.TIMEOUT)


# --- many idle connections ------------------------------------------------------------------------------------------

IDLE = 500


async def _wait_for(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Poll the daemon's own counters (it offers no event for them); fails after `within` seconds."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.01)


async def test_500_idle_connections_do_not_stop_the_members(tmp_path: Path) -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Both ends of every connection live in this process, plus SQLite, the listeners and pytest's own.
    needed = 2 * IDLE + 200
    if soft != resource.RLIM_INFINITY and soft < needed:
        pytest.skip(f"RLIMIT_NOFILE soft limit {soft} is below the {needed} descriptors this test needs")
    world = _world(tmp_path)
    async with running_broker(world) as broker, legit_traffic(world, broker.port) as traffic:
        idle: list[trio.SocketStream] = []
        try:
            for _ in range(IDLE):
                idle.append(await trio.open_tcp_stream("127.0.0.1", broker.port))
            await _wait_for(lambda: broker.connections == IDLE + 2)
            await traffic.progress(3)
            # Still all there: the members were served alongside them, not instead of them.
            assert broker.connections == IDLE + 2
            # A member can still connect while they hang (a fresh connection replaces ITA's nothing).
            async with WireClient.connect(world, ATTACKER, broker.port) as ita:
                rid = ita.conn.new_rid()
                await ita.send(ev.GetCheckpoint(rid))
                assert isinstance(await ita.next_of(ev.Checkpoint), ev.Checkpoint)
                await close_gracefully(ita)
        finally:
            for s in idle:
                await trio.aclose_forcefully(s)
        # Every handler ended: nothing leaks towards the connection cap.
        await _wait_for(lambda: broker.connections == 2)
        await traffic.progress(1)


async def test_idle_connections_cannot_lock_members_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_daemon, "MAX_UNAUTHENTICATED", 64)  # the 1024 default, scaled down (configuration)
    world = _world(tmp_path)
    async with running_broker(world) as broker:
        idle = [await trio.open_tcp_stream("127.0.0.1", broker.port) for _ in range(64)]
        try:
            await _wait_for(lambda: broker.connections == 64)
            member = world.dirs[ATTACKER]
            ctx = tls.client_context(
                member / f"{ATTACKER}.tls.crt",
                member / f"{ATTACKER}.tls.key",
                world.home.broker_identity().bundle.cert_der,
            )
            outcome = await _tls_attempt(ctx, broker.port, ATTACKER)
            assert isinstance(outcome, ev.Welcome), outcome
        finally:
            for s in idle:
                await trio.aclose_forcefully(s)


async def test_a_member_that_never_answers_cosign_requests_still_gets_its_packets(tmp_path: Path) -> None:
    world = make_world(tmp_path, ("FRA", "DEU", "ITA", "NGA"))
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    world.consent("NGA", "ITA", "AMBER", ["malware"])
    async with (
        running_broker(world) as broker,
        legit_traffic(world, broker.port) as traffic,
        WireClient.connect(world, ATTACKER, broker.port) as silent,
    ):
        for _ in range(DEFAULT_LIMITS.requests):  # as many as a client may have in flight; none answered
            assert isinstance(await silent.next(), ev.CosignRequest)

        # Two more checkpoints: the broker has tried to ask again at least once.
        def signed_size() -> int:
            return broker.log.latest.size if broker.log.latest is not None else 0

        for _ in range(2):
            size = signed_size()
            await traffic.progress(1)
            await _wait_for(lambda: signed_size() > size)  # noqa: B023 - awaited within this iteration
        async with WireClient.connect(world, "NGA", broker.port) as nga:
            data = seal(world, "NGA", [ATTACKER], b"for ITA")
            assert isinstance(await nga.submit(data), ev.Receipt)
            await close_gracefully(nga)
        event = await silent.next()
        while isinstance(event, ev.CosignRequest):
            event = await silent.next()
        timed_out = isinstance(event, ev.ErrorMessage) and event.code == codes.TIMEOUT
        assert isinstance(event, ev.DeliverBegin) or timed_out, event
        await close_gracefully(silent)


# --- a hostile recipient ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "sender", "ack_id", "frame_id"),
    [
        ("another sender", "ITA", None, None),
        ("another packet id, in the ack and the frame", None, b"\xee" * 16, b"\xee" * 16),
        ("another packet id in the frame only", None, None, b"\xee" * 16),
    ],
    ids=["sender", "packet-id", "frame-id"],
)
async def test_an_acknowledgement_that_misnames_the_packet_is_refused(
    tmp_path: Path, what: str, sender: str | None, ack_id: bytes | None, frame_id: bytes | None
) -> None:
    """A recipient signs an ack for the packet's digest but names another sender or packet id. Logged, it would
    be forwarded to the sender, shown to the member it names, and counted against the broker by the auditor."""
    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    data = seal(world, "FRA", ["DEU"], b"indicator")
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    real_id = head.core.packet_id
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        assert isinstance(await fra.submit(data), ev.Receipt)
        size = broker.store.size()
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            seq, _ = await deu.receive_delivery()
            ack = records.Ack.make(
                world.members["DEU"].signing, ack_id or real_id, head.digest, sender or "FRA", "DEU", int(time.time())
            )
            await deu.send(ev.Ack(seq, frame_id or real_id, ack.raw))
            fatal = await expect_fatal(deu, codes.BAD_PACKET)
            assert "does not match the packet" in fatal.message, what
        await fra.sync()
        assert broker.store.size() == size  # nothing logged
        # The item is still DEU's: pushed again on the next connection, and a true ack goes through.
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            seq, got = await deu.receive_delivery()
            assert got == data
            ack = records.Ack.make(world.members["DEU"].signing, real_id, head.digest, "FRA", "DEU", int(time.time()))
            await deu.send(ev.Ack(seq, real_id, ack.raw))
            forwarded = await fra.next_of(ev.AckForward)
            assert isinstance(forwarded, ev.AckForward)
            assert records.Ack.parse(forwarded.ack)[0].sender == "FRA"


# --- descriptors ----------------------------------------------------------------------------------------------------


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads the broker's limits from /proc")
async def test_the_broker_raises_its_descriptor_limit_to_the_hard_one(tmp_path: Path) -> None:
    world = _world(tmp_path)
    async with broker_process(world.home.root, tmp_path / "broker.log", nofile=(256, 1024)) as proc:
        assert _soft_nofile(proc.proc.pid) == 1024


async def test_a_flood_of_unauthenticated_connections_cannot_use_up_the_descriptors(tmp_path: Path) -> None:
    """A broker limited to 256 descriptors (soft = hard: it cannot raise them), 300 held TCP connections to each of
    its ports: the HTTP ones asking for the checkpoint every second, the TLS ones idle. Members still connect and
    the log is still read; before the broker kept its unauthenticated peers to a share of its descriptors, accept
    failed with EMFILE and the member timed out."""
    world = _world(tmp_path)
    flood = 300
    async with broker_process(world.home.root, tmp_path / "broker.log", nofile=(256, 256)) as proc:
        held: list[trio.SocketStream] = []

        async def keep_asking(s: trio.SocketStream) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    await s.send_all(b"GET /checkpoint HTTP/1.1\r\nHost: x\r\n\r\n")
                    await trio.sleep(1)

        try:
            async with trio.open_nursery() as nursery:
                for port in (proc.http_port, proc.port):
                    for _ in range(flood):
                        with trio.fail_after(10):
                            s = await trio.open_tcp_stream("127.0.0.1", port)
                        held.append(s)
                        if port == proc.http_port:
                            nursery.start_soon(keep_asking, s)
                await trio.sleep(1.5)
                with trio.fail_after(10):
                    async with WireClient.connect(world, "FRA", proc.port) as fra:
                        fra.refuse_cosign = True
                        await fra.send(ev.GetCheckpoint(fra.conn.new_rid()))
                        assert isinstance(await fra.next_of(ev.Checkpoint), ev.Checkpoint)
                        await close_gracefully(fra)
                    status, _, body = await http_get(proc.http_port, "/checkpoint")
                assert status == 200
                assert body.startswith(ORIGIN.encode())
                nursery.cancel_scope.cancel()
        finally:
            for s in held:
                await trio.aclose_forcefully(s)
        assert proc.alive()
