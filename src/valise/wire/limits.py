"""Hard limits of wire protocol version 1 and the per-connection limits each side announces (specs/wire.md, "Limits").

Two kinds of numbers live here:
- protocol constants, the same for every implementation of version 1 (a field over one is always `bad-field`);
- `Limits`, what one side is willing to *receive*, announced in its `hello` or `welcome`. Each side enforces its
  own announced limits on what arrives and respects the peer's on what it sends. An announced limit may be lower
  than the protocol ceiling, never higher.

Every check happens before the data it guards is buffered, decoded or verified.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Frames: 4-byte big-endian length, then the payload. Before the handshake completes, a side accepts only small
# frames: `hello` and `welcome` are a few hundred bytes, and nobody is owed a megabyte before saying who they are.
LENGTH_SIZE = 4
HANDSHAKE_FRAME = 4 * KiB
MAX_CHUNK = 1 * MiB
# Room for the map around the biggest chunk (type, request id, bin header) with a wide margin.
FRAME_OVERHEAD = 4 * KiB
MAX_FRAME = MAX_CHUNK + FRAME_OVERHEAD
MIN_FRAME = 64 * KiB + FRAME_OVERHEAD
MIN_CHUNK = 1 * KiB

# A packet head (magic ‖ header ‖ signature) becomes a log entry, and entries are at most 65535 bytes
# (C2SP tlog-tiles entry bundles); 64 KiB is therefore a ceiling the head never legitimately reaches.
MAX_HEAD = 64 * KiB
MAX_PACKET = 4 * GiB
# Opaque signed payloads (acknowledgements, retractions, statements, receipts, cosignatures, checkpoints).
MAX_BLOB = 64 * KiB
# Merkle proofs: an inclusion proof has at most 63 hashes for a tree below 2^63 leaves, a consistency proof at most
# about twice that; 128 covers both with a margin while bounding the list.
MAX_PROOF = 128
# Items per `entries` answer: one level-0 tile (C2SP tlog-tiles width); each entry is at most MAX_ENTRY bytes.
MAX_ENTRIES = 256
MAX_LEVEL = 62  # of a complete subtree standing for entries in an `entries` answer (trees hold < 2^63 leaves)
MAX_ENTRY = 65535
HASH_SIZE = 32
PACKET_ID_SIZE = 16
MAX_TEXT = 1024
MAX_VERSIONS = 16
MAX_REASONS = 1024

MAX_RID = 2**32 - 1
# Log indices, tree sizes and mailbox sequence numbers fit SQLite's signed 64-bit integers.
MAX_INDEX = 2**63 - 1
MAX_TIME = 2**63 - 1
MAX_WINDOW = 2**31 - 1
MAX_REQUESTS = 64
MAX_PUSHES = 1024
# Pings a side may have unanswered at once; a ping answers nothing, so a handful is plenty.
MAX_PINGS = 4


@dataclass(frozen=True, slots=True)
class Limits:
    """What one side accepts from its peer (announced in `hello` / `welcome`).

    - `frame`: largest frame payload, bytes (MIN_FRAME..MAX_FRAME);
    - `chunk`: largest `data` of one chunk, bytes (MIN_CHUNK..min(MAX_CHUNK, frame - FRAME_OVERHEAD));
    - `packet`: largest declared packet `size` (ciphertext bytes), 0..MAX_PACKET;
    - `requests`: requests the peer may have unanswered at once (1..MAX_REQUESTS);
    - `window`: initial flow-control window for chunk data, bytes (chunk..MAX_WINDOW);
    - `pushes`: mailbox items the broker may have pushed and not yet had confirmed (1..MAX_PUSHES; a broker
      announces it too, and nothing uses it).
    """

    frame: int
    chunk: int
    packet: int
    requests: int
    window: int
    pushes: int


# Defaults: 256 KiB chunks and a 1 MiB window per connection, so 200 slow peers cost a broker at most ~200 MiB of
# granted-but-unread data, while one fast peer still keeps four chunks in flight.
DEFAULT_LIMITS = Limits(
    frame=MAX_FRAME,
    chunk=256 * KiB,
    packet=MAX_PACKET,
    requests=16,
    window=1 * MiB,
    pushes=64,
)


def choose_version(offered: tuple[int, ...], supported: tuple[int, ...] = SUPPORTED_VERSIONS) -> int | None:
    """The highest version both sides speak, or None (then answer `unsupported-version`)."""
    common = set(offered) & set(supported)
    return max(common) if common else None
