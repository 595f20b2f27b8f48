"""Packet v1: seal / open / inspect / reseal, and the incremental head parser for relays (specs/packet.md).

`seal`, `open` and `inspect` are pure: they read and write only the streams they are given; the clock
(`now`) and randomness (`random`) are parameters.
"""

from __future__ import annotations

from valise.packet.format import (
    MAX_CIPHERTEXT,
    MAX_HEADER,
    MAX_PAYLOAD,
    MAX_RECIPIENTS,
    X25519_STANZA,
    CiphertextHasher,
    Core,
    Head,
    Header,
    NeedMore,
    Stanza,
    parse_head,
)
from valise.packet.opening import Inspection, Opened, check_readable, inspect_packet, open_packet, read_head
from valise.packet.sealing import Sealed, reseal, seal

open = open_packet
inspect = inspect_packet

__all__ = [
    "MAX_CIPHERTEXT",
    "MAX_HEADER",
    "MAX_PAYLOAD",
    "MAX_RECIPIENTS",
    "X25519_STANZA",
    "CiphertextHasher",
    "Core",
    "Head",
    "Header",
    "Inspection",
    "NeedMore",
    "Opened",
    "Sealed",
    "Stanza",
    "check_readable",
    "inspect",
    "inspect_packet",
    "open",
    "open_packet",
    "parse_head",
    "read_head",
    "reseal",
    "seal",
]
