"""valise.wire.frames: length prefixes are checked before buffering, and the buffer stays bounded."""

from __future__ import annotations

import pytest

from valise.errors import FrameTooLarge, LimitError, LocalProtocolError, RemoteProtocolError
from valise.wire import codes
from valise.wire.frames import FrameReader, frame
from valise.wire.limits import HANDSHAKE_FRAME, MAX_FRAME


def test_frames_split_at_any_boundary() -> None:
    stream = frame(b"\x81\xa1t\xa4ping") + frame(b"x" * 300) + frame(b"y")
    for step in (1, 2, 3, 5, 7, 64, len(stream)):
        reader = FrameReader(HANDSHAKE_FRAME, MAX_FRAME)
        got = []
        for i in range(0, len(stream), step):
            reader.feed(stream[i : i + step])
            while (payload := reader.next_frame()) is not None:
                got.append(payload)
        assert got == [b"\x81\xa1t\xa4ping", b"x" * 300, b"y"]
        assert reader.buffered == 0
        assert not reader.has_partial


def test_oversized_frame_is_refused_from_its_prefix_alone() -> None:
    reader = FrameReader(HANDSHAKE_FRAME, MAX_FRAME)
    # The first frame is held to the handshake limit: 4 bytes of prefix are enough to refuse it.
    with pytest.raises(FrameTooLarge, match=f"frame of {HANDSHAKE_FRAME + 1} bytes announced") as info:
        reader.feed((HANDSHAKE_FRAME + 1).to_bytes(4, "big"))
    assert info.value.code == codes.FRAME_TOO_LARGE
    assert isinstance(info.value, RemoteProtocolError)
    assert isinstance(info.value, LimitError)
    assert reader.buffered == 0


def test_later_frames_use_the_connection_limit() -> None:
    reader = FrameReader(HANDSHAKE_FRAME, MAX_FRAME)
    reader.feed(frame(b"a"))
    reader.feed(MAX_FRAME.to_bytes(4, "big"))  # exactly the limit: fine, and only the prefix is held
    assert reader.next_frame() == b"a"
    assert reader.has_partial
    reader = FrameReader(HANDSHAKE_FRAME, MAX_FRAME)
    with pytest.raises(FrameTooLarge, match=f"{MAX_FRAME + 1} bytes announced, over the limit of {MAX_FRAME}"):
        reader.feed(frame(b"a") + (MAX_FRAME + 1).to_bytes(4, "big"))


def test_huge_prefix_inside_one_read_is_refused_before_the_rest() -> None:
    reader = FrameReader(HANDSHAKE_FRAME, MAX_FRAME)
    with pytest.raises(FrameTooLarge, match="4294967295"):
        reader.feed(frame(b"ok") + b"\xff\xff\xff\xff" + b"z" * 1000)
    assert reader.buffered == 0


def test_zero_length_frame_is_refused() -> None:
    reader = FrameReader(HANDSHAKE_FRAME, MAX_FRAME)
    with pytest.raises(RemoteProtocolError, match="0 bytes") as info:
        reader.feed(b"\x00\x00\x00\x00")
    assert info.value.code == codes.BAD_FRAME


def test_truncated_stream_is_partial_at_eof() -> None:
    reader = FrameReader(HANDSHAKE_FRAME, MAX_FRAME)
    reader.feed(frame(b"hello")[:-1])
    assert reader.next_frame() is None
    reader.feed(b"")
    assert reader.eof
    assert reader.has_partial
    with pytest.raises(LocalProtocolError, match="after the end of the stream"):
        reader.feed(b"o")


def test_feeding_without_draining_is_bounded() -> None:
    reader = FrameReader(HANDSHAKE_FRAME, 70 * 1024)
    small = frame(b"s" * 1000)
    while reader.buffered + len(small) <= reader.max_buffer:
        reader.feed(small)
    with pytest.raises(LocalProtocolError, match="drain next_event"):
        reader.feed(small)
    assert reader.buffered <= reader.max_buffer


def test_draining_keeps_the_buffer_small_and_compacts() -> None:
    reader = FrameReader(HANDSHAKE_FRAME, MAX_FRAME)
    data = b"".join(frame(bytes([i % 256]) * 100) for i in range(5000))
    count = 0
    for i in range(0, len(data), 4096):
        reader.feed(data[i : i + 4096])
        while reader.next_frame() is not None:
            count += 1
        assert reader.buffered < 4096 + 104
    assert count == 5000


def test_any_byte_buffer_can_be_fed() -> None:
    # trio's receive_some returns a bytearray; views work too.
    reader = FrameReader(HANDSHAKE_FRAME, MAX_FRAME)
    data = frame(b"abc") + frame(b"de")
    reader.feed(bytearray(data[:5]))
    reader.feed(memoryview(data)[5:])
    assert reader.next_frame() == b"abc"
    assert reader.next_frame() == b"de"
