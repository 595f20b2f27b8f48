"""Mutual TLS with pinned certificates, over real sockets on 127.0.0.1."""

from __future__ import annotations

import functools
import ssl
import time
from pathlib import Path

import pytest
import trio

from valise import identity, keyfiles, tls

from .conftest import NOW, seeded_random


def _make(tmp_path: Path, member_id: str) -> tuple[identity.Identity, Path]:
    ident = identity.generate(member_id, seeded_random(b"tls" + member_id.encode()), NOW)
    d = tmp_path / member_id
    keyfiles.save_identity(d, ident, None)
    return ident, d


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[bytes | None, str | None]:
    """Run one handshake; return (client cert seen by the server, server error name)."""
    seen: list[bytes] = []
    errors: list[str] = []

    async def handler(stream: trio.SocketStream) -> None:
        s = trio.SSLStream(stream, server_ctx, server_side=True)
        try:
            await s.do_handshake()
            seen.append(tls.peer_certificate(s))
            await s.send_all(b"ok")
        except trio.BrokenResourceError as exc:
            errors.append(type(exc.__cause__).__name__)
        finally:
            await trio.aclose_forcefully(s)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_ctx)
        with trio.move_on_after(5):
            try:
                await client.do_handshake()
                await client.receive_some(10)
            except trio.BrokenResourceError:
                pass  # the refusal is read from the server side
        await trio.aclose_forcefully(client)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return (seen[0] if seen else None), (errors[0] if errors else None)


async def test_known_member_is_accepted_and_pinned(tmp_path: Path) -> None:
    broker, bdir = _make(tmp_path, "BRK")
    fra, fdir = _make(tmp_path, "FRA")
    sctx = tls.server_context(bdir / "BRK.tls.crt", bdir / "BRK.tls.key", [fra.bundle.cert_der])
    cctx = tls.client_context(fdir / "FRA.tls.crt", fdir / "FRA.tls.key", broker.bundle.cert_der)
    seen, err = await _handshake(sctx, cctx)
    assert err is None
    assert seen == fra.bundle.cert_der
    tls.check_pinned(seen, fra.bundle.cert_der, who="FRA")


@pytest.mark.parametrize("made", [900, -11 * 365 * 86_400], ids=["on machines 15 minutes fast", "eleven years ago"])
async def test_certificates_made_on_a_fast_clock_or_long_ago_are_accepted(tmp_path: Path, made: int) -> None:
    """Certificates are pinned, so their dates only refused good peers: a review found keys made on a machine 15
    minutes fast refused as "bad certificate" (and a broker's, as "not the pinned one"), and every certificate
    expired after ten years. OpenSSL checks them against this machine's real clock, hence time.time() here."""
    now = int(time.time()) + made
    broker = identity.generate("BRK", seeded_random(b"clock-brk"), now)
    fra = identity.generate("FRA", seeded_random(b"clock-fra"), now)
    for ident in (broker, fra):
        keyfiles.save_identity(tmp_path / ident.member_id, ident, None)
    bdir, fdir = tmp_path / "BRK", tmp_path / "FRA"
    sctx = tls.server_context(bdir / "BRK.tls.crt", bdir / "BRK.tls.key", [fra.bundle.cert_der])
    cctx = tls.client_context(fdir / "FRA.tls.crt", fdir / "FRA.tls.key", broker.bundle.cert_der)
    seen, err = await _handshake(sctx, cctx)
    assert err is None
    assert seen == fra.bundle.cert_der


async def test_unknown_client_certificate_is_refused(tmp_path: Path) -> None:
    broker, bdir = _make(tmp_path, "BRK")
    fra, _ = _make(tmp_path, "FRA")
    _, edir = _make(tmp_path, "EVIL")
    sctx = tls.server_context(bdir / "BRK.tls.crt", bdir / "BRK.tls.key", [fra.bundle.cert_der])
    cctx = tls.client_context(edir / "EVIL.tls.crt", edir / "EVIL.tls.key", broker.bundle.cert_der)
    seen, err = await _handshake(sctx, cctx)
    assert seen is None
    assert err == "SSLCertVerificationError", err


async def test_node_refuses_a_broker_it_did_not_pin(tmp_path: Path) -> None:
    _, bdir = _make(tmp_path, "BRK")
    other, _ = _make(tmp_path, "OTHER")
    fra, fdir = _make(tmp_path, "FRA")
    sctx = tls.server_context(bdir / "BRK.tls.crt", bdir / "BRK.tls.key", [fra.bundle.cert_der])
    cctx = tls.client_context(fdir / "FRA.tls.crt", fdir / "FRA.tls.key", other.bundle.cert_der)
    seen, _ = await _handshake(sctx, cctx)
    assert seen is None


def test_check_pinned_names_the_mismatch(tmp_path: Path) -> None:
    a, _ = _make(tmp_path, "A")
    b, _ = _make(tmp_path, "B")
    with pytest.raises(tls.TLSPeerError, match="expected the pinned"):
        tls.check_pinned(a.bundle.cert_der, b.bundle.cert_der, who="A")


def test_only_tls13_is_offered(tmp_path: Path) -> None:
    _, bdir = _make(tmp_path, "BRK")
    ctx = tls.server_context(bdir / "BRK.tls.crt", bdir / "BRK.tls.key", [])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED


async def test_a_tls12_client_is_refused_and_a_member_gets_no_session_ticket(tmp_path: Path) -> None:
    """wire.md: TLS 1.3 only, and no resumption (so no 0-RTT either): the broker issues no session tickets."""
    broker, bdir = _make(tmp_path, "BRK")
    fra, fdir = _make(tmp_path, "FRA")
    sctx = tls.server_context(bdir / "BRK.tls.crt", bdir / "BRK.tls.key", [fra.bundle.cert_der])
    old = tls.client_context(fdir / "FRA.tls.crt", fdir / "FRA.tls.key", broker.bundle.cert_der)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    seen, err = await _handshake(sctx, old)
    assert seen is None
    assert err == "SSLError", err

    tickets: list[bool] = []

    async def handler(stream: trio.SocketStream) -> None:
        s = trio.SSLStream(stream, sctx, server_side=True)
        await s.do_handshake()
        await s.send_all(b"ok")
        await s.receive_some(10)  # until the client has looked

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        cctx = tls.client_context(fdir / "FRA.tls.crt", fdir / "FRA.tls.key", broker.bundle.cert_der)
        client = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), cctx)
        await client.do_handshake()
        assert await client.receive_some(10) == b"ok"  # a ticket would have come before these bytes
        session = client.session
        tickets.append(session is not None and session.has_ticket)
        await client.send_all(b"done")
        await trio.aclose_forcefully(client)
        nursery.cancel_scope.cancel()
    assert tickets == [False]


async def test_a_node_sends_nothing_to_a_broker_that_does_not_select_the_valise_protocol(tmp_path: Path) -> None:
    """wire.md: a connection on which `valise/1` was not selected is closed before any frame. The server here has
    the broker's own certificate (the pin holds) but negotiates no ALPN protocol."""
    from valise.node.daemon import NodeDaemon
    from valise.node.home import NodeHome

    from .harness import log_vkey, make_world

    world = make_world(tmp_path)
    ident = world.home.identity_dir / "broker"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(ident.with_suffix(".tls.crt"), ident.with_suffix(".tls.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ssl.DER_cert_to_PEM_cert(world.members["FRA"].bundle.cert_der))
    received: list[bytes] = []
    handshakes = 0

    async def handler(tcp: trio.SocketStream) -> None:
        nonlocal handshakes
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            await stream.do_handshake()
            handshakes += 1
            while data := await stream.receive_some(65536):
                received.append(data)
        except trio.BrokenResourceError:
            pass

    daemon: NodeDaemon | None = None
    try:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            home = NodeHome.create(
                tmp_path / "node", world.dirs["FRA"], f"127.0.0.1:{port}", world.home.broker_bundle_path,
                log_vkey(world),
            )  # fmt: skip
            daemon = NodeDaemon(home, world.members["FRA"], poll_interval=0.2)
            nursery.start_soon(daemon.run)
            with trio.fail_after(10):
                while handshakes == 0 or daemon.last_error is None:  # noqa: ASYNC110 - the daemon's own state
                    await trio.sleep(0.02)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    finally:
        if daemon is not None:  # once its run has ended: it records a clean stop in its store
            daemon.store.close()
    assert daemon is not None
    assert "did not negotiate the protocol valise/1" in daemon.last_error
    assert received == []  # no hello, nothing


@pytest.mark.parametrize(
    "text",
    [
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate is not yet valid (_ssl.c:1006)",
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired (_ssl.c:1006)",
        "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired (_ssl.c:2580)",
    ],
)
def test_a_certificate_out_of_its_dates_is_explained_as_a_clock_not_as_pinning(text: str) -> None:
    """A review: OpenSSL said "not yet valid", and the node's explanation said the broker was not the pinned one."""
    told = tls.explain_failure(text)
    assert "a certificate's dates do not cover this machine's clock, or the broker's" in told
    assert "not the pinned one" not in told
