"""valise.wire.codec: every message round-trips, and every malformed payload is refused with the right code."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from valise import encoding
from valise.errors import EncodingError, LocalProtocolError
from valise.wire import codec, codes
from valise.wire import events as ev
from valise.wire.limits import DEFAULT_LIMITS, MAX_BLOB, MAX_CHUNK, MAX_HEAD, MAX_PACKET, MAX_PROOF

PID = bytes(range(16))
DIGEST = bytes(range(32))
HASHES = (b"\x11" * 32, b"\x22" * 32)

# One instance of every message type (the round-trip test checks that none is missing).
SAMPLES: list[ev.Message] = [
    ev.Hello(versions=(1,), member="FRA", role="node", seen=7, limits=DEFAULT_LIMITS),
    ev.Welcome(version=1, broker="BROKER", time=1_790_000_000, limits=DEFAULT_LIMITS),
    ev.SubmitBegin(rid=1, head=b"VALISE\x01head+sig", size=3),
    ev.SubmitChunk(rid=1, data=b"abc"),
    ev.SubmitEnd(rid=1),
    ev.SubmitCancel(rid=1),
    ev.Receipt(rid=1, id=PID, index=41, digest=DIGEST, receipt=b"signed receipt"),
    ev.Deny(rid=2, id=PID, reasons=(ev.DenyReason("DEU", "no grant from FRA to DEU"), ev.DenyReason("ITA", "x"))),
    ev.DeliverBegin(seq=5, head=b"head", size=0),
    ev.DeliverChunk(seq=5, data=b"x" * 10),
    ev.DeliverEnd(seq=5),
    ev.DeliverCancel(seq=5, code="internal"),
    ev.AckForward(seq=6, id=PID, by="DEU", index=43, ack=b"signed ack"),
    ev.RetractForward(seq=7, id=PID, by="FRA", index=44, retraction=b"signed retraction"),
    ev.Ack(seq=5, id=PID, ack=b"signed ack"),
    ev.Seen(seq=6),
    ev.Refuse(seq=7, code=codes.BAD_SIGNATURE, message="packet header from DEU does not verify"),
    ev.Retract(rid=3, id=PID, retraction=b"signed retraction"),
    ev.RetractResult(rid=3, index=44, receipt=b"signed receipt"),
    ev.Statement(rid=4, statement=b"signed statement"),
    ev.StatementResult(rid=4, index=45, receipt=b"signed receipt"),
    ev.GetCheckpoint(rid=5),
    ev.Checkpoint(rid=5, checkpoint=b"origin\n46\nroot\n\n- sig\n"),
    ev.GetInclusion(rid=6, index=41, size=46),
    ev.Inclusion(rid=6, proof=HASHES),
    ev.GetConsistency(rid=7, old=0, new=46),
    ev.Consistency(rid=7, proof=()),
    ev.GetEntries(rid=8, start=0, end=1 << 40),
    ev.Entries(rid=8, start=0, entries=(b"\x81\xa1t\xa7genesis", b"\x07" * 32), hashed=(1,), levels=(5,)),
    ev.CosignRequest(rid=0, old=40, proof=HASHES, checkpoint=b"checkpoint"),
    ev.CosignResponse(rid=0, cosignature=b"cosignature"),
    ev.Credit(amount=65536),
    ev.Ping(n=9),
    ev.Pong(n=9),
    ev.ErrorMessage(rid=None, code="expected-hello", message="expected hello as the first frame, got ping"),
    ev.ErrorMessage(rid=3, code="not-found", message=""),
    ev.Goodbye(message="shutting down"),
]


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(ev.MESSAGE_TYPES)
    assert len({cls.TYPE for cls in ev.MESSAGE_TYPES}) == len(ev.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg: ev.Message) -> None:
    payload = codec.encode(msg)
    assert codec.decode(payload) == msg
    decoded = encoding.unpack(payload, what="t", max_size=len(payload))
    assert decoded["t"] == msg.TYPE
    assert set(decoded) - {"t"} == {f.name for f in dataclasses.fields(msg)}


def _wire(msg: ev.Message) -> dict[str, Any]:
    value: dict[str, Any] = encoding.unpack(codec.encode(msg), what="t", max_size=1 << 21)
    return value


def _refused(value: Any, code: str, match: str | None = None) -> None:
    with pytest.raises(LocalProtocolError, match=match) as info:
        codec.decode(encoding.pack(value))
    assert info.value.code == code


# A value of a wrong msgpack type for any field: text where bytes/ints/maps are expected, and vice versa.
WRONG: list[Any] = ["text", b"bytes", -1, True, None, [1], {"a": 1}, 2**64 - 1]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_every_field_refuses_wrong_types(msg: ev.Message) -> None:
    good = _wire(msg)
    for name in set(good) - {"t"}:
        for bad in WRONG:
            changed = {**good, name: bad}
            refusal: LocalProtocolError | None = None
            try:
                again = codec.decode(encoding.pack(changed))
            except LocalProtocolError as exc:
                refusal = exc
            if refusal is None:
                # The only wrong-looking values accepted are those that fit (e.g. None for an optional rid).
                assert codec._to_wire(getattr(again, name)) == bad, (msg.TYPE, name, bad)
                continue
            assert refusal.code == codes.BAD_FIELD, (name, bad, refusal)
            assert repr(name) in refusal.what or "limits" in refusal.what


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_missing_and_extra_fields_are_refused(msg: ev.Message) -> None:
    good = _wire(msg)
    for name in set(good) - {"t"}:
        _refused({k: v for k, v in good.items() if k != name}, codes.BAD_FIELD, f"lacks field.*{name}")
    _refused({**good, "zz": 1}, codes.BAD_FIELD, "unknown field")


def test_unknown_type_and_missing_type() -> None:
    _refused({"t": "teleport", "rid": 1}, codes.UNKNOWN_TYPE, "unknown message type 'teleport'")
    _refused({"t": "Hello"}, codes.UNKNOWN_TYPE)
    _refused({"rid": 1}, codes.BAD_ENCODING, "no text field 't'")
    _refused({"t": 1}, codes.BAD_ENCODING)
    _refused([1, 2], codes.BAD_ENCODING, "not a map")


@pytest.mark.parametrize(
    "payload",
    [
        # keys out of order: {"t": "ping", "n": 1}
        b"\x82\xa1t\xa4ping\xa1n\x01",
        # an integer in a longer form than needed (uint8 for 1)
        b"\x82\xa1n\xcc\x01\xa1t\xa4ping",
        # a float
        b"\x82\xa1n\xcb" + b"\x3f\xf0" + b"\x00" * 6 + b"\xa1t\xa4ping",
        # bytes as str8 where fixstr would do
        b"\x82\xa1n\x01\xd9\x01t\xa4ping",
        # duplicate key
        b"\x83\xa1n\x01\xa1n\x01\xa1t\xa4ping",
        # trailing garbage
        b"\x82\xa1n\x01\xa1t\xa4ping\x00",
        # truncated map
        b"\x82\xa1n\x01\xa1t",
        # an extension type
        b"\x82\xa1n\xd4\x01\x00\xa1t\xa4ping",
    ],
)
def test_non_canonical_msgpack_is_refused(payload: bytes) -> None:
    assert codec.decode(b"\x82\xa1n\x01\xa1t\xa4ping") == ev.Ping(1)
    with pytest.raises(LocalProtocolError) as info:
        codec.decode(payload)
    assert info.value.code == codes.BAD_ENCODING


def test_str_where_bin_is_expected_is_refused() -> None:
    # msgpack-python with raw=False would turn a str into text; the field wants bin.
    payload = msgpack.packb({"ack": "signed", "id": PID, "seq": 1, "t": "ack"}, use_bin_type=True)
    with pytest.raises(LocalProtocolError, match="'ack' must be bytes") as info:
        codec.decode(payload)
    assert info.value.code == codes.BAD_FIELD


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (ev.SubmitBegin(rid=1, head=b"", size=0), "'head' is 0 bytes"),
        (ev.SubmitBegin(rid=1, head=b"h" * (MAX_HEAD + 1), size=0), "'head' is 65537 bytes"),
        (ev.SubmitBegin(rid=1, head=b"h", size=MAX_PACKET + 1), "'size' must be an integer in 0..4294967296"),
        (ev.SubmitBegin(rid=2**32, head=b"h", size=1), "'rid' must be an integer"),
        (ev.SubmitChunk(rid=1, data=b""), "'data' is 0 bytes"),
        (ev.SubmitChunk(rid=1, data=b"x" * (MAX_CHUNK + 1)), "'data' is 1048577 bytes"),
        (ev.Receipt(rid=1, id=b"short", index=1, digest=DIGEST, receipt=b"r"), "'id' must be 16 bytes"),
        (ev.Receipt(rid=1, id=PID, index=1, digest=DIGEST[:31], receipt=b"r"), "'digest' must be 32 bytes"),
        (ev.Ack(seq=1, id=PID, ack=b"a" * (MAX_BLOB + 1)), "'ack' is 65537 bytes"),
        (ev.Inclusion(rid=1, proof=(b"\x00" * 32,) * (MAX_PROOF + 1)), "has 129 items"),
        (ev.Inclusion(rid=1, proof=(b"\x00" * 31,)), r"proof'\[0\] must be 32 bytes"),
        (ev.GetInclusion(rid=1, index=5, size=5), "index 5 is not below size 5"),
        (ev.GetConsistency(rid=1, old=6, new=5), "old size 6 is above new size 5"),
        (ev.Credit(amount=0), "'amount' must be positive"),
        (ev.Credit(amount=2**31), "'amount' must be an integer"),
        (ev.Deny(rid=1, id=PID, reasons=()), "has 0 items"),
        (ev.Deny(rid=1, id=PID, reasons=(ev.DenyReason("DEU", "a"), ev.DenyReason("DEU", "b"))), "twice"),
        (ev.Deny(rid=1, id=PID, reasons=(ev.DenyReason("not a member", "a"),)), "member id"),
        (ev.ErrorMessage(rid=None, code="Bad_Code", message=""), "error code"),
        (ev.ErrorMessage(rid=None, code="x", message="é" * 513), "over 1024 bytes"),
        (ev.Hello(versions=(), member="FRA", role="node", seen=0, limits=DEFAULT_LIMITS), "has 0 items"),
        (ev.Hello(versions=(2, 1), member="FRA", role="node", seen=0, limits=DEFAULT_LIMITS), "ascending"),
        (ev.Hello(versions=(0,), member="FRA", role="node", seen=0, limits=DEFAULT_LIMITS), "positive"),
        (ev.Hello(versions=(1,), member="FRA", role="admin", seen=0, limits=DEFAULT_LIMITS), '"node" or "auditor"'),
        (ev.Hello(versions=(1,), member="", role="node", seen=0, limits=DEFAULT_LIMITS), "member id"),
        (ev.Welcome(version=0, broker="B", time=0, limits=DEFAULT_LIMITS), "positive"),
    ],
)
def test_out_of_range_fields_are_refused_on_both_sides(msg: ev.Message, match: str) -> None:
    # encode() runs the receiver's checks, so this side never sends what the peer must refuse ...
    with pytest.raises(LocalProtocolError, match=match) as info:
        codec.encode(msg)
    assert info.value.code == codes.BAD_FIELD
    # ... and decode() refuses the same value built by hand.
    wire = codec.to_map(msg)
    with pytest.raises(LocalProtocolError, match=match):
        codec.decode(encoding.pack(wire))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"frame": 1000}, "'frame' must be at least"),
        ({"chunk": 10}, "'chunk' must be"),
        ({"frame": 70 * 1024, "chunk": 68 * 1024}, "'chunk' must be"),
        ({"window": 1024}, "'window' must be at least one chunk"),
        ({"requests": 0}, "at least 1"),
        ({"pushes": 0}, "at least 1"),
        ({"requests": 65}, "'requests' must be an integer in 0..64"),
    ],
)
def test_announced_limits_must_hang_together(change: dict[str, int], match: str) -> None:
    limits = dataclasses.replace(DEFAULT_LIMITS, **change)
    with pytest.raises(LocalProtocolError, match=match):
        codec.encode(ev.Welcome(version=1, broker="B", time=0, limits=limits))


def test_encode_refuses_non_messages_and_non_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="not a wire message"):
        codec.encode(ev.ConnectionClosed(clean=True))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="must be bytes"):
        codec.encode(ev.SubmitChunk(rid=1, data=bytearray(b"x")))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("msg", "rule"),
    [
        (ev.GetEntries(rid=1, start=5, end=5), "at least one entry"),
        (ev.GetEntries(rid=1, start=6, end=5), "at least one entry"),
        (ev.Entries(rid=1, start=0, entries=(b"abc",), hashed=(0,), levels=(0,)), "32-byte subtree hash"),
        (ev.Entries(rid=1, start=0, entries=(b"a", b"b"), hashed=(1, 1), levels=(0, 0)), "distinct ascending"),
        (ev.Entries(rid=1, start=0, entries=(b"a",), hashed=(1,), levels=(0,)), "offsets into"),
        (ev.Entries(rid=1, start=0, entries=(bytes(32),), hashed=(0,), levels=()), "one level per offset"),
        (ev.Entries(rid=1, start=0, entries=(bytes(32),), hashed=(0,), levels=(63,)), "0..62"),
    ],
)
def test_entries_relations_are_checked_both_ways(msg: ev.Message, rule: str) -> None:
    with pytest.raises(LocalProtocolError, match=rule):
        codec.encode(msg)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_encoding_is_the_house_canonical_form(msg: ev.Message) -> None:
    # codec packs with plain msgpack for speed; it must agree byte for byte with valise.encoding.
    assert codec.encode(msg) == encoding.pack(codec.to_map(msg))


def test_decoder_refuses_what_the_house_decoder_refuses() -> None:
    for payload in [b"\x82\xa1t\xa4ping\xa1n\x01", b"\x82\xa1n\xcc\x01\xa1t\xa4ping", b"\x81\xc4\x01t\xa4ping"]:
        with pytest.raises(EncodingError):
            encoding.unpack(payload, what="x", max_size=100)
        with pytest.raises(LocalProtocolError) as info:
            codec.decode(payload)
        assert info.value.code == codes.BAD_ENCODING
