"""The genesis record: entry 0 of every valise log (pure; specs/protocol.md, "Records").

It names the log's origin, the operator key that signs directory records and operator rules, and the broker's
public bundle. Anyone who pins the log key (the checkpoint `vkey`) learns the rest from the log itself: the
operator key from entry 0, every member key from the directory records after it. So a node or an auditor needs
exactly one key from outside, and the broker cannot show different members different operator keys without
forking the log, which witnesses catch.
"""

from __future__ import annotations

from dataclasses import dataclass

from valise import encoding, identity
from valise.errors import EncodingError, StoreError

GENESIS_VERSION = 1
GENESIS_MAX = 16384


@dataclass(frozen=True, slots=True)
class Genesis:
    origin: str
    operator_key: bytes
    broker: identity.PublicBundle

    def entry(self) -> bytes:
        return encoding.pack(
            {
                "t": "genesis",
                "v": GENESIS_VERSION,
                "origin": self.origin,
                "operator_key": self.operator_key,
                "broker_bundle": self.broker.raw,
            }
        )

    @classmethod
    def parse(cls, entry: bytes, *, origin: str) -> Genesis:
        """Decode entry 0 of log `origin`; refuse anything else."""
        try:
            m = encoding.unpack_map(
                entry,
                what="genesis record",
                max_size=GENESIS_MAX,
                fields={"t": str, "v": int, "origin": str, "operator_key": bytes, "broker_bundle": bytes},
            )
        except EncodingError as exc:
            raise StoreError(f"entry 0 is not a genesis record: {exc.what}") from None
        if m["t"] != "genesis" or m["v"] != GENESIS_VERSION:
            raise StoreError("entry 0 is not a version 1 genesis record")
        if m["origin"] != origin:
            raise StoreError(f"the genesis record is for log {m['origin']!r}, not {origin!r}")
        if len(m["operator_key"]) != 32:
            raise StoreError("the genesis record's operator key is not 32 bytes")
        return cls(origin, m["operator_key"], identity.PublicBundle.from_bytes(m["broker_bundle"]))
