#!/usr/bin/env python3
"""Generate the packet v1 known-answer vectors in specs/vectors/packet-*.json (see specs/packet.md, "Test vectors").

Everything is derived from fixed seeds: member keys come from `identity.generate` with a SHA-256 counter-mode
byte source, and sealing draws its randomness (packet id, content key K, one HPKE ikmE per recipient) from
a list of byte strings recorded in the vector, so anyone can replay a seal without this script.

    python tools/gen_packet_vectors.py           # (re)write the vectors
    python tools/gen_packet_vectors.py --check   # exit 1 if the checked-in vectors differ
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

from valise import identity, packet
from valise.crypto import stream
from valise.crypto.seeded import seeded_random
from valise.packet import format as fmt

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "specs" / "vectors"
NOW = 1_790_000_000  # 2026-09-21T12:53:20Z
FULL_HEX_LIMIT = 4096  # packets larger than this are recorded by SHA-256 only


class Recorder:
    """A byte source that remembers every draw, so the vector can list them."""

    def __init__(self, seed: bytes) -> None:
        self._src = seeded_random(seed)
        self.draws: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        self.draws.append(self._src(n))
        return self.draws[-1]


def member(mid: str) -> identity.Identity:
    return identity.generate(mid, seeded_random(b"valise packet vector " + mid.encode()), NOW - 86400)


def member_json(m: identity.Identity) -> dict[str, str]:
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in m.secrets().items()}


CASES: list[dict[str, Any]] = [
    {
        "name": "stix",
        "description": "a STIX 2.1 bundle from FRA to DEU and ITA, TLP:AMBER, two categories and an operation",
        "sender": "FRA",
        "to": ["DEU", "ITA"],
        "tlp": "AMBER",
        "categories": ["phishing", "malware"],
        "operation": "TRIDENT-2026",
        "content_type": None,
        "expires": NOW + 7 * 86400,
        "payload": (
            b'{"type": "bundle", "id": "bundle--44af6c39-c09b-49c5-9de2-394224b04982", "objects": '
            b'[{"type": "indicator", "spec_version": "2.1", "id": "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f", '
            b'"pattern": "[url:value = \'http://x.example/\']", "pattern_type": "stix"}]}'
        ),
    },
    {
        "name": "empty",
        "description": "an empty payload from DEU to FRA, TLP:RED, no categories",
        "sender": "DEU",
        "to": ["FRA"],
        "tlp": "RED",
        "categories": [],
        "operation": None,
        "content_type": "application/octet-stream",
        "expires": NOW + 3600,
        "payload": b"",
    },
    {
        "name": "two-chunks",
        "description": "65537 bytes (i mod 251) from ITA to FRA: two chunks, the last one partly padding",
        "sender": "ITA",
        "to": ["FRA"],
        "tlp": "AMBER+STRICT",
        "categories": ["cyber-crime"],
        "operation": None,
        "content_type": "application/octet-stream",
        "expires": NOW + 86400,
        "payload": bytes(i % 251 for i in range(65537)),
    },
]


def build(case: dict[str, Any]) -> dict[str, Any]:
    members = {m: member(m) for m in sorted({case["sender"], *case["to"]})}
    rec = Recorder(b"valise packet vector randomness " + case["name"].encode())
    out = io.BytesIO()
    packet.seal(
        io.BytesIO(case["payload"]),
        out,
        sender=members[case["sender"]],
        recipients=[members[m].bundle for m in case["to"]],
        tlp=case["tlp"],
        now=NOW,
        random=rec,
        expires=case["expires"],
        categories=case["categories"],
        operation=case["operation"],
        content_type=case["content_type"],
    )
    data = out.getvalue()
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    packet_id, content_key = rec.draws[0], rec.draws[1]
    first = data[head.head_size : head.head_size + min(stream.CT_CHUNK, head.header.ct_len)]
    expected: dict[str, Any] = {
        "packet_id": packet_id.hex(),
        "content_key": content_key.hex(),
        "payload_key": stream.payload_key(content_key, packet_id).hex(),
        "key_commitment": stream.key_commitment(content_key, packet_id).hex(),
        "core": head.core.raw.hex(),
        "payload_aad": fmt.payload_aad(head.core.raw).hex(),
        "header": head.header.raw.hex(),
        "signature": head.signature.hex(),
        "header_digest": head.digest.hex(),
        "stanza_info": {
            s.recipient: fmt.stanza_info(s.type, packet_id, case["sender"], s.recipient).hex()
            for s in head.header.stanzas
        },
        "first_chunk_sha256": hashlib.sha256(first).hexdigest(),
        "packet_size": len(data),
        "packet_sha256": hashlib.sha256(data).hexdigest(),
    }
    if len(data) <= FULL_HEX_LIMIT:
        expected["first_chunk"] = first.hex()
        expected["packet"] = data.hex()
    return {
        "description": case["description"],
        "source": "generated by tools/gen_packet_vectors.py (self-made; see specs/packet.md)",
        "members": {m: member_json(i) for m, i in members.items()},
        "sender": case["sender"],
        "to": case["to"],
        "now": NOW,
        "expires": case["expires"],
        "tlp": case["tlp"],
        "categories": case["categories"],
        "operation": case["operation"],
        "content_type": case["content_type"],
        "payload": payload_json(case["payload"]),
        "randomness": [d.hex() for d in rec.draws],
        "expected": expected,
    }


def payload_json(payload: bytes) -> str | dict[str, int]:
    """Short payloads as hex; the long one by its rule (byte i is i mod 251), which the tests expand."""
    if len(payload) <= FULL_HEX_LIMIT:
        return payload.hex()
    assert payload == bytes(i % 251 for i in range(len(payload)))
    return {"mod": 251, "size": len(payload)}


def render(case: dict[str, Any]) -> str:
    return json.dumps(build(case), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare with the checked-in vectors instead")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    stale = []
    for case in CASES:
        path = OUT / f"packet-{case['name']}.json"
        text = render(case)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"stale vectors: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
