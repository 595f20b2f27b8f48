"""Padmé padding (Nikitin et al., "Reducing Metadata Leakage from Encrypted Files and Communication with
PURBs", PETS 2019, §4) with an ISO/IEC 7816-4 marker, so the payload length leaks less (pure).

A payload of L bytes becomes `payload ‖ 0x80 ‖ 0x00…` of exactly `padme(L + 1)` bytes. Padmé rounds a length
to a multiple of a power of two that grows with the length: at most O(log log L) bits of the length are
visible and the overhead is below 12%. The marker makes removal unambiguous (the last non-zero byte is 0x80,
every later byte is zero); the padding sits inside the authenticated payload, and the opener also insists that
the padded length is exactly `padme(L + 1)`, so one payload has exactly one padded form.
"""

from __future__ import annotations

from collections.abc import Callable

MARKER = 0x80
_ZEROS = bytes(65536)


def padme(length: int) -> int:
    """Padmé(L): L rounded up so that only its top ⌊log2 E⌋ + 1 bits below the leading bit can be non-zero."""
    if length < 1:
        raise ValueError("Padmé is defined for lengths ≥ 1")
    e = length.bit_length() - 1  # ⌊log2 L⌋
    s = e.bit_length()  # ⌊log2 E⌋ + 1 (0 when E = 0)
    mask = (1 << (e - s)) - 1
    return (length + mask) & ~mask


def padded_size(payload_size: int) -> int:
    """Size of the padded plaintext for a payload of `payload_size` bytes (always ≥ 1: the marker)."""
    return padme(payload_size + 1)


class Unpadder:
    """Removes the padding from a stream of padded chunks without buffering it.

    The last non-zero byte seen is held back (it may be the marker) together with a *count* of the zero bytes
    after it, so a long run of zeros, in the payload or in the padding, costs no memory.
    """

    __slots__ = ("_held", "_write", "_zeros", "emitted", "seen")

    def __init__(self, write: Callable[[bytes | memoryview], object]) -> None:
        self._write = write
        self._held: int | None = None
        self._zeros = 0
        self.emitted = 0
        self.seen = 0

    def _flush_zeros(self) -> None:
        while self._zeros:
            n = min(self._zeros, len(_ZEROS))
            self._write(_ZEROS[:n])
            self._zeros -= n
            self.emitted += n

    def feed(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        if not chunk:
            return
        stripped = chunk if chunk[-1] else chunk.rstrip(b"\x00")
        if not stripped:
            self._zeros += len(chunk)
            return
        if self._held is not None:
            self._write(bytes((self._held,)))
            self.emitted += 1
        self._flush_zeros()
        body = memoryview(stripped)[:-1]
        if body:
            self._write(body)
            self.emitted += len(body)
        self._held = stripped[-1]
        self._zeros = len(chunk) - len(stripped)

    def finish(self) -> int:
        """Check the padding once every chunk is in; return the payload length. Raises ValueError if malformed."""
        if self._held != MARKER:
            raise ValueError("padding marker 0x80 is missing")
        if padded_size(self.emitted) != self.seen:
            raise ValueError(f"padding of a {self.emitted}-byte payload is not the canonical Padmé length")
        return self.emitted
