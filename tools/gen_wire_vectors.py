"""Generate the transcript and the test vectors of specs/wire.md from the wire code itself.

    python tools/gen_wire_vectors.py            # print the generated sections
    python tools/gen_wire_vectors.py --write    # rewrite them in specs/wire.md (between the marker comments)

The transcript is a real session between two `valise.wire.Connection`s in memory; every hex line is a frame
that `Connection.send` produced and the other side accepted. Signed payloads (heads, receipts, acks,
checkpoints) are placeholders: their formats belong to packet.md, protocol.md and log.md, and the wire carries
them as opaque bytes. The proofs are real, over a log of placeholder entries. tests/test_wire_vectors.py checks
that the spec matches this output and replays every vector against the state machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from valise.errors import ProtocolError
from valise.store.memory import MemoryLog
from valise.tlog import merkle
from valise.wire import codes, frame
from valise.wire import events as ev
from valise.wire.codec import encode
from valise.wire.pair import ConnectionPair, drain, feed
from valise.wire.state import Role

SPEC = Path(__file__).resolve().parent.parent / "specs" / "wire.md"
TIME = 1_790_000_000
PID = bytes.fromhex("5f1d3a9c0b7e42d68e21c4a7f03b9d10")
DIGEST = bytes.fromhex("9a0f6c1e5b3d27840e6a1f9c2d7b5e3a18c4f0926d3b7a5e1c8f4b2d6a0e9371")
HEAD = b"<head: magic, header, signature (packet.md)>"
CIPHERTEXT = b"<ciphertext: 40 bytes (packet.md)>-------"


def _show(value: object) -> str:
    if isinstance(value, bytes):
        if len(value) > 24:
            return f"<{len(value)} bytes>"
        return repr(value) if value.isascii() else value.hex()
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "{" + ", ".join(f"{f.name}: {_show(getattr(value, f.name))}" for f in dataclasses.fields(value)) + "}"
    return repr(value)


def _describe(msg: ev.Message) -> str:
    return f"{msg.TYPE} {_show(msg)}"


def _hex_lines(data: bytes, width: int = 32) -> list[str]:
    return [data[i : i + width].hex() for i in range(0, len(data), width)]


def _dummy_log(size: int) -> MemoryLog:
    """A log of `size` placeholder entries, so that the transcript's proofs are real RFC 9162 proofs."""
    log = MemoryLog()
    log.append([b"entry %d" % i for i in range(size)])
    return log


def session() -> list[tuple[Role, ev.Message]]:
    """The scripted session of the transcript: handshake, the broker's cosigning request that opens every node
    session, submit, receipt, deliveries (one taken, one refused), ack, queries, goodbye."""
    pair = ConnectionPair()
    log = _dummy_log(44)
    script: list[tuple[Role, ev.Message]] = [
        (Role.CLIENT, pair.hello(member="FRA", seen=41)),
        (Role.SERVER, pair.welcome(broker="BROKER", time=TIME)),
        (
            Role.SERVER,
            ev.CosignRequest(
                rid=0, old=41, proof=tuple(merkle.consistency_proof(41, 42, log)), checkpoint=b"<checkpoint, size 42>"
            ),
        ),
        (Role.CLIENT, ev.CosignResponse(rid=0, cosignature=b"<FRA's cosignature line>")),
        (Role.CLIENT, ev.SubmitBegin(rid=1, head=HEAD, size=len(CIPHERTEXT))),
        (Role.CLIENT, ev.SubmitChunk(rid=1, data=CIPHERTEXT[:24])),
        (Role.CLIENT, ev.SubmitChunk(rid=1, data=CIPHERTEXT[24:])),
        (Role.CLIENT, ev.SubmitEnd(rid=1)),
        (Role.SERVER, ev.Receipt(rid=1, id=PID, index=42, digest=DIGEST, receipt=b"<signed receipt>")),
        (Role.SERVER, ev.DeliverBegin(seq=7, head=HEAD, size=len(CIPHERTEXT))),
        (Role.SERVER, ev.DeliverChunk(seq=7, data=CIPHERTEXT)),
        (Role.SERVER, ev.DeliverEnd(seq=7)),
        (Role.CLIENT, ev.Ack(seq=7, id=PID, ack=b"<signed ack>")),
        (Role.SERVER, ev.AckForward(seq=8, id=PID, by="DEU", index=43, ack=b"<signed ack>")),
        (Role.CLIENT, ev.Seen(seq=8)),
        # The next checkpoint covers the packet (42) and DEU's acknowledgement (43): the broker asks again.
        (
            Role.SERVER,
            ev.CosignRequest(
                rid=1, old=42, proof=tuple(merkle.consistency_proof(42, 44, log)), checkpoint=b"<checkpoint, size 44>"
            ),
        ),
        (Role.CLIENT, ev.CosignResponse(rid=1, cosignature=b"<FRA's cosignature line>")),
        (Role.SERVER, ev.DeliverBegin(seq=9, head=HEAD, size=len(CIPHERTEXT))),
        (Role.SERVER, ev.DeliverChunk(seq=9, data=CIPHERTEXT)),
        (Role.SERVER, ev.DeliverEnd(seq=9)),
        (Role.CLIENT, ev.Refuse(seq=9, code=codes.BAD_SIGNATURE, message="packet header from DEU does not verify")),
        (Role.CLIENT, ev.GetInclusion(rid=2, index=42, size=44)),
        (Role.SERVER, ev.Inclusion(rid=2, proof=tuple(merkle.inclusion_proof(42, 44, log)))),
        (Role.CLIENT, ev.Ping(n=1)),
        (Role.SERVER, ev.Pong(n=1)),
        (Role.CLIENT, ev.Goodbye(message="done")),
        (Role.SERVER, ev.Goodbye(message="")),
    ]
    for role, msg in script:
        got = pair.send(role, msg)
        if got != [msg]:
            raise AssertionError(f"{msg.TYPE} was not received as sent: {got}")
    return script


def transcript() -> str:
    lines = ["```"]
    for role, msg in session():
        data = frame(encode(msg))
        arrow = "C→S" if role is Role.CLIENT else "S→C"
        lines.append(f"# {arrow} {_describe(msg)}")
        lines.append(data[:4].hex())
        lines += _hex_lines(data[4:])
    lines.append("```")
    return "\n".join(lines)


@dataclass(frozen=True)
class Vector:
    name: str
    open: bool  # replay after a handshake (hello from the client, the transcript's welcome from the server)
    stream: bytes  # what the client sends (after the hello, when `open`)
    eof: bool  # the stream ends after `stream`
    code: str  # the expected error code


def _frames(*msgs: ev.Message) -> bytes:
    return b"".join(frame(encode(m)) for m in msgs)


def _raw(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def vectors() -> list[Vector]:
    pair = ConnectionPair()
    hello = _frames(pair.hello(member="FRA", seen=41))
    return [
        Vector("first frame is not hello", False, _frames(ev.Ping(1)), False, codes.EXPECTED_HELLO),
        Vector(
            "length prefix over the handshake limit (4 bytes suffice)",
            False,
            b"\x00\x00\x10\x01",
            False,
            codes.FRAME_TOO_LARGE,
        ),
        Vector("zero length", False, b"\x00\x00\x00\x00", False, codes.BAD_FRAME),
        Vector("keys out of order", False, _raw(b"\x82\xa1t\xa4ping\xa1n\x01"), False, codes.BAD_ENCODING),
        Vector(
            "integer not in its shortest form",
            False,
            _raw(b"\x82\xa1n\xcc\x01\xa1t\xa4ping"),
            False,
            codes.BAD_ENCODING,
        ),
        Vector("unknown message type", False, _raw(b"\x82\xa1n\x01\xa1t\xa5pong2"), False, codes.UNKNOWN_TYPE),
        Vector(
            "text where bytes are due",
            False,
            _raw(b"\x83\xa4data\xa1x\xa3rid\x01\xa1t\xacsubmit-chunk"),
            False,
            codes.BAD_FIELD,
        ),
        Vector("hello cut short by the end of the stream", False, hello[:-3], True, codes.TRUNCATED),
        Vector(
            "length prefix over the connection limit",
            True,
            (1_052_673).to_bytes(4, "big"),
            False,
            codes.FRAME_TOO_LARGE,
        ),
        Vector("chunk outside a submission", True, _frames(ev.SubmitChunk(9, b"x")), False, codes.UNEXPECTED_FRAME),
        Vector(
            "second begin with a rid in flight",
            True,
            _frames(ev.SubmitBegin(1, b"h", 1), ev.SubmitBegin(1, b"h", 1)),
            False,
            codes.DUPLICATE_REQUEST,
        ),
        Vector(
            "end after fewer bytes than declared",
            True,
            _frames(ev.SubmitBegin(1, b"h", 10), ev.SubmitChunk(1, b"abc"), ev.SubmitEnd(1)),
            False,
            codes.LENGTH_MISMATCH,
        ),
        Vector(
            "chunk over the window",
            True,
            _frames(ev.SubmitBegin(1, b"h", 2 * 1024 * 1024), *[ev.SubmitChunk(1, bytes(256 * 1024))] * 5),
            False,
            codes.FLOW_CONTROL,
        ),
        Vector("pong without a ping", True, _frames(ev.Pong(3)), False, codes.UNEXPECTED_FRAME),
        Vector(
            "a server-only message from the client",
            True,
            _frames(ev.Checkpoint(1, b"c")),
            False,
            codes.UNEXPECTED_FRAME,
        ),
    ]


def replay(vector: Vector) -> str | None:
    """Feed a vector to a fresh server; the error code it raised (None if it raised nothing)."""
    pair = ConnectionPair()
    server = pair.server
    data = vector.stream
    try:
        if vector.open:
            pair.send(Role.CLIENT, pair.hello(member="FRA", seen=41))
            pair.send(Role.SERVER, pair.welcome(broker="BROKER", time=TIME))
        feed(server, data)
        if vector.eof:
            server.receive_data(b"")
            drain(server)
    except ProtocolError as exc:
        return exc.code
    return None


def vector_table() -> str:
    lines = [
        "| # | case | state | client bytes (hex) | expected |",
        "|---|------|-------|--------------------|----------|",
    ]
    for i, v in enumerate(vectors(), 1):
        shown = v.stream.hex()
        if len(shown) > 96:
            shown = f"{shown[:64]}… ({len(v.stream)} bytes, see the generator)"
        state = ("open" if v.open else "fresh") + (", then EOF" if v.eof else "")
        lines.append(f"| {i} | {v.name} | {state} | `{shown}` | `{v.code}` |")
    return "\n".join(lines)


SECTIONS: dict[str, Callable[[], str]] = {"transcript": transcript, "vectors": vector_table}


def render(spec_text: str) -> str:
    """`spec_text` with every generated section replaced by fresh output."""
    for name, make in SECTIONS.items():
        begin, end = f"<!-- generated:{name} -->", f"<!-- end:{name} -->"
        head, _, rest = spec_text.partition(begin)
        _, found, tail = rest.partition(end)
        if not found:
            raise SystemExit(f"specs/wire.md lacks the markers {begin} … {end}")
        spec_text = f"{head}{begin}\n{make()}\n{end}{tail}"
    return spec_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write", action="store_true", help="rewrite the generated sections of specs/wire.md")
    args = parser.parse_args(argv)
    for v in vectors():
        if replay(v) != v.code:
            raise SystemExit(f"vector {v.name!r}: expected {v.code}, got {replay(v)}")
    if args.write:
        SPEC.write_text(render(SPEC.read_text()))
        return 0
    for make in SECTIONS.values():
        print(make(), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
