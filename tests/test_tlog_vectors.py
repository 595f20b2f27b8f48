"""The self-made log vectors (tests/vectors/log-example.json, the worked example of specs/log.md).

Checked two ways: the file is exactly what tools/gen_log_vectors.py writes, and an independent implementation
(pyca/cryptography Ed25519 and hashlib; no valise code) verifies every signature, key id and hash in it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from valise.tlog import cosignature, merkle, note, proofbundle

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "log-example.json"


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
    return data


def test_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("gen_log_vectors", ROOT / "tools" / "gen_log_vectors.py")
    assert spec is not None
    assert spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.render() == VECTORS.read_text(encoding="utf-8")


def _pub(seed_hex: str) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)).public_key().public_bytes_raw()


def test_independent_check_of_the_example() -> None:
    v = load()
    text, sigs = v["checkpoint_note"].rsplit("\n\n", 1)
    text += "\n"
    origin, size, root64 = text.splitlines()
    # The root is MTH of the 8-leaf tree, computed here from scratch; the RFC 6962 value is published too.
    level = [hashlib.sha256(b"\x00" + bytes.fromhex(d)).digest() for d in v["leaves_hex"]]
    while len(level) > 1:
        level = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    assert base64.b64decode(root64) == level[0]
    assert level[0].hex() == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    assert (origin, size) == ("log.example/valise", "8")

    log_line, witness_line = sigs.splitlines()
    log_pub, witness_pub = _pub(v["log_seed_hex"]), _pub(v["witness_seed_hex"])
    raw = base64.b64decode(log_line.split(" ")[2])
    assert raw[:4] == hashlib.sha256(origin.encode() + b"\n\x01" + log_pub).digest()[:4]
    Ed25519PublicKey.from_public_bytes(log_pub).verify(raw[4:], text.encode())
    raw = base64.b64decode(witness_line.split(" ")[2])
    assert raw[:4] == hashlib.sha256(b"witness.example/fra\n\x04" + witness_pub).digest()[:4]
    assert int.from_bytes(raw[4:12], "big") == v["cosignature_time"]
    message = b"cosignature/v1\ntime %d\n" % v["cosignature_time"] + text.encode()
    Ed25519PublicKey.from_public_bytes(witness_pub).verify(raw[12:], message)
    assert v["log_vkey"].endswith(base64.b64encode(b"\x01" + log_pub).decode())
    assert v["witness_vkey"].endswith(base64.b64encode(b"\x04" + witness_pub).decode())


def test_valise_accepts_the_example() -> None:
    v = load()
    leaf = merkle.hash_leaf(bytes.fromhex(v["leaves_hex"][5]))
    bundle, cp = proofbundle.verify(
        v["proof_bundle"].encode(),
        leaf,
        note.parse_vkey(v["log_vkey"]),
        witnesses=[cosignature.parse_vkey(v["witness_vkey"])],
        quorum=1,
    )
    assert (bundle.index, cp.size) == (v["proof_bundle_leaf_index"], 8)
