"""The baseline for tools/bench_broker.py: a bare TLS relay on trio with no crypto of its own, no policy and no log.

    python tools/relay_baseline.py --cert C --key K --members KEYS [--listen 127.0.0.1:0]

It speaks the same transport as the broker (TLS 1.3, mutual authentication with the same pinned Ed25519
certificates, the same ALPN, the same read size, the same TLS stream: valise.tlsstream), so the ratio
valise/baseline isolates what the broker adds on top of moving bytes: wire-protocol parsing, signature checks,
policy, the log, the mailboxes and their fsyncs.

A frame is a 4-byte big-endian length, then `kind` (1 byte) and a peer index (2 bytes, big-endian), then opaque
bytes. A member's index is its position in the sorted list of directories under `--members` (each holding
`<NAME>.tls.crt`, as `valise keygen` writes them); the relay learns who a connection is from its certificate.
- DATA to peer j: answered at once with a RECEIPT to the sender (the first 16 bytes of the body, standing for
  the packet id), and forwarded to j as DATA from the sender;
- ACK to peer j: forwarded to j as ACK from the sender.
That is the message pattern of a valise relay (submit, receipt, deliver, acknowledgement forwarded to the
sender) without any of the work that makes it trustworthy.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import struct
import sys
from pathlib import Path

import trio

from valise import tls
from valise.tlsstream import TLSSocketStream

HEADER = struct.Struct(">IBH")  # length of what follows the 4 length bytes, kind, peer index
DATA, RECEIPT, ACK = 1, 2, 3
MAX_FRAME = (1 << 20) + 64
READ_SIZE = 65536  # the same read size as valise.wire.connection.READ_SIZE


def frame(kind: int, peer: int, body: bytes) -> bytes:
    return HEADER.pack(3 + len(body), kind, peer) + body


class Relay:
    def __init__(self, context: ssl.SSLContext, members: dict[bytes, int]) -> None:
        self.context = context
        self.members = members
        self.peers: dict[int, tuple[TLSSocketStream, trio.Lock]] = {}

    async def send(self, peer: int, data: bytes) -> None:
        target = self.peers.get(peer)
        if target is None:
            return  # not connected: a bare relay has nowhere to keep it
        stream, lock = target
        async with lock:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(data)

    async def handle(self, tcp: trio.SocketStream) -> None:
        try:
            stream = TLSSocketStream.wrap(tcp, self.context, server_side=True)
        except trio.BrokenResourceError:
            return
        try:
            await stream.do_handshake()
            me = self.members.get(tls.peer_certificate(stream))
            if me is None:
                return
            self.peers[me] = (stream, trio.Lock())
            buf = bytearray()
            while True:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    return
                buf += data
                while len(buf) >= HEADER.size:
                    length, kind, peer = HEADER.unpack_from(buf)
                    if length > MAX_FRAME or length < 3:
                        return
                    end = 4 + length
                    if len(buf) < end:
                        break
                    body = bytes(buf[HEADER.size : end])
                    del buf[:end]
                    if kind == DATA:
                        await self.send(me, frame(RECEIPT, peer, body[:16]))
                        await self.send(peer, frame(DATA, me, body))
                    elif kind == ACK:
                        await self.send(peer, frame(ACK, me, body))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, tls.TLSPeerError):
            pass
        finally:
            for index, (s, _) in list(self.peers.items()):
                if s is stream:
                    del self.peers[index]
            await trio.aclose_forcefully(stream)


def member_certs(root: Path) -> dict[bytes, int]:
    """DER certificate → index, for every member directory under `root` in sorted order."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    out = {}
    for index, d in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        pem = (d / f"{d.name}.tls.crt").read_bytes()
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        out[der] = index
    return out


async def serve(cert: Path, key: Path, members: Path, host: str, port: int) -> None:
    certs = member_certs(members)
    relay = Relay(tls.server_context(cert, key, list(certs)), certs)
    listeners = await trio.open_tcp_listeners(port, host=host)
    print(f"relay listening on {host}:{listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(relay.handle, listeners)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cert", required=True, type=Path, help="the server's TLS certificate (PEM)")
    ap.add_argument("--key", required=True, type=Path, help="the server's TLS key (PEM)")
    ap.add_argument("--members", required=True, type=Path, help="a directory of member key directories")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default %(default)s)")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.cert, args.key, args.members, host, int(port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
