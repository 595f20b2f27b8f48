"""Generate tests/vectors/log-example.json: the worked example of specs/log.md (self-made vectors).

The 8-leaf RFC 6962 test tree (transparency-dev/merkle testonly), signed as a checkpoint by a log key and
cosigned by one witness, both keys derived from fixed labels; plus a tlog-proof bundle for leaf 5.
tests/test_tlog_vectors.py checks the file two ways: it is exactly what this script writes, and its signatures
and hashes verify with an independent implementation (pyca/cryptography Ed25519 and hashlib, no valise code).

Run from the project root: .venv/bin/python tools/gen_log_vectors.py
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "src"))

from valise.crypto.sign import SigningKey
from valise.tlog import checkpoint, cosignature, merkle, note, proofbundle

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "vectors" / "log-example.json"
LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
TIME = 1_790_000_000


def build() -> dict[str, object]:
    store = merkle.MemoryHashes()
    for d in LEAVES:
        store.append(merkle.hash_leaf(bytes.fromhex(d)))
    log_seed = hashlib.sha256(b"valise spec example log key").digest()
    witness_seed = hashlib.sha256(b"valise spec example witness key").digest()
    log = note.Ed25519Signer("log.example/valise", SigningKey(log_seed))
    witness = cosignature.Cosigner("witness.example/fra", SigningKey(witness_seed))
    cp = checkpoint.Checkpoint(log.name, len(LEAVES), merkle.tree_hash(len(LEAVES), store))
    msg = cosignature.add_cosignatures(checkpoint.sign_checkpoint(cp, log), [witness.cosign(cp, TIME)])
    bundle = proofbundle.create(5, merkle.inclusion_proof(5, len(LEAVES), store), msg)
    return {
        "leaves_hex": LEAVES,
        "log_seed_hex": log_seed.hex(),
        "log_skey": log.skey(),
        "log_vkey": log.verifier().vkey(),
        "witness_seed_hex": witness_seed.hex(),
        "witness_vkey": witness.verifier().vkey(),
        "cosignature_time": TIME,
        "checkpoint_note": msg.decode(),
        "proof_bundle_leaf_index": 5,
        "proof_bundle": bundle.decode(),
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT.name}")
