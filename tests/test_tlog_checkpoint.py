"""Checkpoints, cosignatures and proof bundles (valise.tlog.checkpoint, .cosignature, .proofbundle)."""

from __future__ import annotations

import base64

import pytest

from valise.crypto.sign import SigningKey
from valise.errors import CheckpointError, NoteError, ProofError
from valise.tlog import checkpoint, cosignature, merkle, note, proofbundle

from .conftest import NOW, seeded_random

ORIGIN = "broker.example/valise-log"
LOG = note.Ed25519Signer(ORIGIN, SigningKey(seeded_random(b"log")(32)))
W1 = cosignature.Cosigner("fra.example/witness", SigningKey(seeded_random(b"w1")(32)))
W2 = cosignature.Cosigner("deu.example/witness", SigningKey(seeded_random(b"w2")(32)))


def tree(n: int) -> merkle.MemoryHashes:
    store = merkle.MemoryHashes()
    for i in range(n):
        store.append(merkle.hash_leaf(b"entry %d" % i))
    return store


STORE = tree(20)


def head(size: int) -> checkpoint.Checkpoint:
    return checkpoint.Checkpoint(ORIGIN, size, merkle.tree_hash(size, STORE))


def test_go_tree_note_body_known_answer() -> None:
    # Source: golang/mod sumdb/tlog/note_test.go TestFormatTree.
    cp = checkpoint.Checkpoint("go.sum database tree", 123456789012, merkle.hash_leaf(b"hello world"))
    assert cp.body() == "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n"
    assert checkpoint.parse_body(cp.body()) == cp


def test_c2sp_example_body_parses() -> None:
    # Source: C2SP tlog-checkpoint.md example.
    text = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    cp = checkpoint.parse_body(text)
    assert (cp.origin, cp.size, cp.extensions) == ("example.com/behind-the-sofa", 20852163, ())
    assert cp.body() == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("o\n5\n" + "A" * 43 + "=", "newline"),
        ("o\n5\n", "fewer than three"),
        ("\n5\n" + "A" * 43 + "=\n", "origin is empty"),
        ("o\n05\n" + "A" * 43 + "=\n", "leading zeros"),
        ("o\n+5\n" + "A" * 43 + "=\n", "not a decimal"),
        ("o\n-5\n" + "A" * 43 + "=\n", "not a decimal"),
        ("o\n٥\n" + "A" * 43 + "=\n", "not a decimal"),
        ("o\n99999999999999999999\n" + "A" * 43 + "=\n", "not a decimal"),
        ("o\n5\n" + "A" * 42 + "==\n", "32"),
        ("o\n5\n" + "A" * 42 + "B=\n", "canonical"),
        ("o\n5\n" + "A" * 43 + "=\n\n", "extension"),
    ],
)
def test_malformed_bodies_are_rejected(text: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        checkpoint.parse_body(text)


def test_sign_and_open_with_extensions() -> None:
    cp = checkpoint.Checkpoint(ORIGIN, 20, merkle.tree_hash(20, STORE), ("ext one",))
    msg = checkpoint.sign_checkpoint(cp, LOG)
    got, opened = checkpoint.open_checkpoint(msg, note.parse_vkey(LOG.verifier().vkey()))
    assert got == cp
    assert len(opened.verified) == 1


def test_open_requires_the_log_key_and_origin() -> None:
    msg = checkpoint.sign_checkpoint(head(5), LOG)
    other = note.Ed25519Signer(ORIGIN, SigningKey(bytes(32)))
    with pytest.raises(NoteError, match="no verifiable"):
        checkpoint.open_checkpoint(msg, other.verifier())
    with pytest.raises(CheckpointError, match="origin"):
        checkpoint.open_checkpoint(msg, LOG.verifier(), origin="another.example/log")
    # A witness's valid cosignature alone is not the log's signature.
    only_witness = note.format_note(head(5).body(), [W1.cosign(head(5), NOW)])
    with pytest.raises(NoteError, match="not signed by the log"):
        checkpoint.open_checkpoint(only_witness, LOG.verifier(), witnesses=[W1.verifier()])


def test_check_newer() -> None:
    checkpoint.check_newer(head(5), head(20), merkle.consistency_proof(5, 20, STORE))
    checkpoint.check_newer(head(5), head(5), [])
    checkpoint.check_newer(checkpoint.Checkpoint(ORIGIN, 0, merkle.EMPTY_ROOT), head(3), [])
    with pytest.raises(CheckpointError, match="backwards"):
        checkpoint.check_newer(head(20), head(5), merkle.consistency_proof(5, 20, STORE))
    fork = checkpoint.Checkpoint(ORIGIN, 20, merkle.hash_leaf(b"x"))
    with pytest.raises(CheckpointError, match="not consistent"):
        checkpoint.check_newer(head(5), fork, merkle.consistency_proof(5, 20, STORE))
    with pytest.raises(CheckpointError, match="not consistent"):
        checkpoint.check_newer(head(20), fork, [])
    with pytest.raises(CheckpointError, match="origin changed"):
        checkpoint.check_newer(head(5), checkpoint.Checkpoint("x", 20, head(20).root), [])


# --- cosignatures -------------------------------------------------------------------------------------


def test_cosignature_parse_vector() -> None:
    # Source: transparency-dev/formats note/note_cosigv1_test.go TestCoSigV1Timestamp.
    raw = base64.b64decode(
        "ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOworDcFiEBYJXORmnFBOBA=="
    )
    sig = note.Signature("w", raw[:4], raw[4:])
    assert sig.key_id.hex() == "646846b9"
    assert cosignature.timestamp_of(sig) == 1727964367


def test_cosigned_checkpoint_meets_quorum() -> None:
    cp = head(20)
    msg = checkpoint.sign_checkpoint(cp, LOG)
    msg = cosignature.add_cosignatures(msg, [W1.cosign(cp, NOW), W2.cosign(cp, NOW + 1)])
    witnesses = [cosignature.parse_vkey(W1.verifier().vkey()), W2.verifier()]
    got, opened = checkpoint.open_checkpoint(msg, LOG.verifier(), witnesses=witnesses, quorum=2)
    assert got == cp
    assert sorted(cosignature.timestamp_of(s) for s in opened.verified[1:]) == [NOW, NOW + 1]
    with pytest.raises(NoteError, match="fewer than the quorum"):
        checkpoint.open_checkpoint(msg, LOG.verifier(), witnesses=witnesses[:1], quorum=2)
    # The signed message is cosignature/v1 + time + body: the line is byte-for-byte reproducible.
    line = W1.cosign(cp, NOW)
    body = cp.body().encode()
    cosignature.CosignatureVerifier(W1.name, W1.key.public).verify(body, line.sig)
    assert line.sig[8:] == W1.key.sign_raw(b"cosignature/v1\ntime %d\n" % NOW + body)


def test_bad_cosignatures_are_rejected() -> None:
    cp = head(20)
    good = W1.cosign(cp, NOW)
    wrong_time = note.Signature(good.name, good.key_id, (NOW + 1).to_bytes(8, "big") + good.sig[8:])
    msg = cosignature.add_cosignatures(checkpoint.sign_checkpoint(cp, LOG), [wrong_time])
    with pytest.raises(NoteError, match="invalid cosignature"):
        checkpoint.open_checkpoint(msg, LOG.verifier(), witnesses=[W1.verifier()])
    other_tree = W1.cosign(head(19), NOW)
    msg = cosignature.add_cosignatures(checkpoint.sign_checkpoint(cp, LOG), [other_tree])
    with pytest.raises(NoteError, match="invalid cosignature"):
        checkpoint.open_checkpoint(msg, LOG.verifier(), witnesses=[W1.verifier()])
    short = note.Signature(good.name, good.key_id, good.sig[:-1])
    msg = cosignature.add_cosignatures(checkpoint.sign_checkpoint(cp, LOG), [short])
    with pytest.raises(NoteError, match="expected 72"):
        checkpoint.open_checkpoint(msg, LOG.verifier(), witnesses=[W1.verifier()])
    with pytest.raises(NoteError, match="signed twice"):
        cosignature.add_cosignatures(msg, [short])
    with pytest.raises(NoteError, match="not an Ed25519 cosignature"):
        cosignature.parse_vkey(LOG.verifier().vkey())
    with pytest.raises(NoteError, match="is not Ed25519"):
        note.parse_vkey(W1.verifier().vkey())


# --- proof bundles ------------------------------------------------------------------------------------


def bundle(index: int, size: int = 20) -> bytes:
    cp = head(size)
    msg = cosignature.add_cosignatures(checkpoint.sign_checkpoint(cp, LOG), [W1.cosign(cp, NOW)])
    return proofbundle.create(index, merkle.inclusion_proof(index, size, STORE), msg, extra=b"context")


def test_proof_bundle_round_trip() -> None:
    data = bundle(7)
    text = data.decode()
    assert text.startswith("c2sp.org/tlog-proof@v1\nextra Y29udGV4dA==\nindex 7\n")
    got, cp = proofbundle.verify(
        data, merkle.hash_leaf(b"entry 7"), LOG.verifier(), witnesses=[W1.verifier()], quorum=1
    )
    assert (got.index, got.extra, cp.size) == (7, b"context", 20)
    single = proofbundle.create(0, [], checkpoint.sign_checkpoint(head(1), LOG))
    proofbundle.verify(single, merkle.hash_leaf(b"entry 0"), LOG.verifier())


def test_proof_bundle_failures() -> None:
    data = bundle(7)
    with pytest.raises(ProofError, match="does not lead to the root"):
        proofbundle.verify(data, merkle.hash_leaf(b"entry 8"), LOG.verifier())
    with pytest.raises(ProofError, match=r"does not lead to the root|expected"):
        proofbundle.verify(data.replace(b"index 7", b"index 6"), merkle.hash_leaf(b"entry 7"), LOG.verifier())
    with pytest.raises(NoteError, match="quorum"):
        proofbundle.verify(data, merkle.hash_leaf(b"entry 7"), LOG.verifier(), quorum=1)
    bad = [
        (data.replace(b"index 7", b"index 07"), "leading zeros"),
        (data.replace(b"c2sp.org/tlog-proof@v1", b"c2sp.org/tlog-proof@v2"), "does not start"),
        (data.replace(b"\n\n", b"\n", 1), "no blank line|base64|32"),
        (data.replace(b"extra Y29udGV4dA==\n", b""), None),
        (b"c2sp.org/tlog-proof@v1\nindex 1\n" + b"A" * 43 + b"=\n\n", "no blank line"),  # no checkpoint
    ]
    for damaged, message in bad:
        if message is None:
            proofbundle.verify(damaged, merkle.hash_leaf(b"entry 7"), LOG.verifier())  # extra is optional
            continue
        with pytest.raises((ProofError, NoteError), match=message):
            proofbundle.verify(damaged, merkle.hash_leaf(b"entry 7"), LOG.verifier())
