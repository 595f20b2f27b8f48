"""Framing: a 4-byte big-endian length, then that many bytes of payload (specs/wire.md, "Frames").

`FrameReader` turns a byte stream into payloads without decoding them. Every length prefix is checked the moment
its four bytes arrive, so a peer that announces a 2 GiB frame is refused after sending 4 bytes, not after we
have buffered its body. The buffer itself is bounded: the caller must drain complete frames before feeding more,
and then at most one partial frame (< 4 + limit bytes) plus one read are ever held.
"""

from __future__ import annotations

from valise.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from valise.wire import codes
from valise.wire.limits import LENGTH_SIZE

# Compact the buffer only once this much has been consumed, so that a stream of small frames does not pay a
# memmove per frame; the partial frame that remains is then moved once.
_COMPACT_AT = 64 * 1024


def frame(payload: bytes) -> bytes:
    """The frame carrying `payload` (length checks are the caller's: see Connection.send)."""
    return len(payload).to_bytes(LENGTH_SIZE, "big") + payload


class FrameReader:
    """Splits a byte stream into frame payloads. `first_limit` applies to the first frame, `limit` to the rest."""

    def __init__(self, first_limit: int, limit: int) -> None:
        self.first_limit = first_limit
        self.limit = limit
        # One partial frame plus one read of at most a frame's size: what a caller that drains between reads holds.
        self.max_buffer = 2 * (LENGTH_SIZE + limit)
        self.eof = False
        self._buf = bytearray()
        self._start = 0  # first byte not yet returned by next_frame()
        self._scan = 0  # first byte of the first frame whose length prefix is not yet checked in full
        self._scanned = 0  # frames whose prefix has been checked (to tell the first frame from the others)

    @property
    def buffered(self) -> int:
        """Bytes held: complete frames not yet taken plus a partial one."""
        return len(self._buf) - self._start

    @property
    def has_partial(self) -> bool:
        """True when bytes are held that do not make a complete frame (at EOF, the stream was truncated)."""
        return self.buffered > 0 and self._complete_length() is None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the stream; `b""` means the stream ended. Raises on a bad length prefix."""
        if self.eof:
            if data:
                raise LocalProtocolError("data fed after the end of the stream", code=codes.INTERNAL)
            return
        if not data:
            self.eof = True
            return
        size = memoryview(data).nbytes
        if self.buffered + size > self.max_buffer:
            raise LocalProtocolError(
                f"feeding {size} bytes would hold {self.buffered + size}, over {self.max_buffer}",
                code=codes.INTERNAL,
                hint="drain next_event() until NEED_DATA before feeding more, and feed at most one frame's size",
            )
        if self._start >= _COMPACT_AT or self._start == len(self._buf):
            del self._buf[: self._start]
            self._scan -= self._start
            self._start = 0
        self._buf += data
        self._check_prefixes()

    def _check_prefixes(self) -> None:
        buf = self._buf
        while self._scan + LENGTH_SIZE <= len(buf):
            n = int.from_bytes(buf[self._scan : self._scan + LENGTH_SIZE], "big")
            limit = self.first_limit if self._scanned == 0 else self.limit
            if n > limit:
                self._discard()
                raise FrameTooLarge(f"frame of {n} bytes announced, over the limit of {limit}")
            if n == 0:
                self._discard()
                raise RemoteProtocolError("frame of 0 bytes (a payload is a non-empty map)", code=codes.BAD_FRAME)
            self._scanned += 1
            self._scan += LENGTH_SIZE + n
        # Here `_scan` may point past the end of the buffer (inside a frame whose body is still arriving).

    def _discard(self) -> None:
        self._buf = bytearray()
        self._start = self._scan = 0

    def _complete_length(self) -> int | None:
        if self.buffered < LENGTH_SIZE:
            return None
        n = int.from_bytes(self._buf[self._start : self._start + LENGTH_SIZE], "big")
        return n if self.buffered >= LENGTH_SIZE + n else None

    def next_frame(self) -> bytes | None:
        """The next complete payload, or None if the buffer holds none."""
        n = self._complete_length()
        if n is None:
            return None
        begin = self._start + LENGTH_SIZE
        with memoryview(self._buf) as view:
            payload = bytes(view[begin : begin + n])
        self._start = begin + n
        return payload
