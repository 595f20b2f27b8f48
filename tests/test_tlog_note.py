"""C2SP signed notes: known answers from golang.org/x/mod/sumdb/note and C2SP, and strict parsing."""

from __future__ import annotations

import pytest

from valise.crypto.sign import SigningKey
from valise.errors import NoteError
from valise.tlog import note

# Source: golang/mod sumdb/note/note_test.go (TestSign, TestOpen).
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = (
    "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
ENOCH_SIG = "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
# Source: C2SP signed-note.md, "Example".
FOO_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
FOO_NOTE = (
    "This is an example message.\n\n— example.com/foo "
    "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)


def peter_note(*sig_lines: str) -> bytes:
    return (PETER_TEXT + "\n" + "".join(sig_lines)).encode()


def test_go_signing_vector_is_reproduced_byte_for_byte() -> None:
    signer = note.parse_skey(PETER_SKEY)
    assert signer.skey() == PETER_SKEY
    assert signer.verifier().vkey() == PETER_VKEY
    assert note.sign_note(PETER_TEXT, [signer]) == peter_note(PETER_SIG)


def test_c2sp_example_verifies() -> None:
    verifier = note.parse_vkey(FOO_VKEY)
    assert verifier.key_id.hex() == "530d903a"
    opened = note.open_note(FOO_NOTE.encode(), [verifier])
    assert opened.text == "This is an example message.\n"
    assert [s.name for s in opened.verified] == ["example.com/foo"]


def test_unknown_signers_are_ignored_but_kept() -> None:
    opened = note.open_note(peter_note(PETER_SIG, ENOCH_SIG), [note.parse_vkey(PETER_VKEY)])
    assert [s.name for s in opened.verified] == ["PeterNeumann"]
    assert [s.name for s in opened.unverified] == ["EnochRoot"]
    both = note.open_note(peter_note(PETER_SIG, ENOCH_SIG), [note.parse_vkey(PETER_VKEY), note.parse_vkey(ENOCH_VKEY)])
    assert len(both.verified) == 2


def test_no_verifiable_signature_rejects() -> None:
    with pytest.raises(NoteError, match="no verifiable signatures"):
        note.open_note(peter_note(PETER_SIG), [])
    with pytest.raises(NoteError, match="no verifiable signatures") as info:
        note.open_note(peter_note(ENOCH_SIG), [note.parse_vkey(PETER_VKEY)])
    # Who signed it, and whom we trust, from the C2SP example keys: a wrong pin is visible at once.
    enoch, peter = note.parse_vkey(ENOCH_VKEY), note.parse_vkey(PETER_VKEY)
    assert f"signed by EnochRoot+{enoch.key_id.hex()}" in info.value.what
    assert f"the keys trusted here are PeterNeumann+{peter.key_id.hex()}" in info.value.what


def test_a_known_keys_bad_signature_rejects_the_note() -> None:
    bad = PETER_SIG.replace("kuBS9", "kuBS8")  # inside the signature, not the key id
    with pytest.raises(NoteError, match=r"invalid signature for key PeterNeumann\+c74f20a3"):
        note.open_note(peter_note(bad, ENOCH_SIG), [note.parse_vkey(PETER_VKEY), note.parse_vkey(ENOCH_VKEY)])
    tampered = peter_note(PETER_SIG).replace(b"problem,", b"problem!")
    with pytest.raises(NoteError, match="invalid signature"):
        note.open_note(tampered, [note.parse_vkey(PETER_VKEY)])


def test_signature_count_is_capped_before_verifying() -> None:
    with pytest.raises(NoteError, match="over the limit of 100"):
        note.open_note(peter_note(*[PETER_SIG] * 101), [note.parse_vkey(PETER_VKEY)])


def test_duplicate_signer_is_rejected() -> None:
    with pytest.raises(NoteError, match="signed twice"):
        note.open_note(peter_note(PETER_SIG, PETER_SIG), [note.parse_vkey(PETER_VKEY)])


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (PETER_TEXT.encode() + PETER_SIG.encode(), "blank line"),
        (peter_note(PETER_SIG.rstrip("\n")), "end in a newline"),
        (peter_note(PETER_SIG.replace("— ", "-- ")), "does not start"),
        (peter_note(PETER_SIG.replace(" x08go", "  x08go")), "not canonical|not valid|not '—"),
        (peter_note(PETER_SIG.replace("AM=", "AN=")), "canonical base64"),
        (peter_note(PETER_SIG.replace("PeterNeumann", "Peter+Neumann")), r"contains '\+'"),
        (peter_note("— PeterNeumann AAAA\n"), "too short"),
        (peter_note(PETER_SIG).replace(b"problem,", b"problem\t"), "control character"),
        (peter_note(PETER_SIG).replace(b"problem,", b"problem\xff"), "UTF-8"),
        (peter_note(PETER_SIG) + b"\n", "end in a newline|does not start"),
        (b"x" * (note.MAX_NOTE_SIZE + 1), "over the limit"),
    ],
)
def test_malformed_notes_are_rejected(msg: bytes, message: str) -> None:
    with pytest.raises(NoteError, match=message):
        note.open_note(msg, [note.parse_vkey(PETER_VKEY)])


@pytest.mark.parametrize(
    ("vkey", "message"),
    [
        (PETER_VKEY.replace("c74f20a3", "c74f20a4"), "does not match"),
        (PETER_VKEY.replace("c74f20a3", "C74F20A3"), "lowercase"),
        ("PeterNeumann+c74f20a3", "name\\+keyid\\+key"),
        ("+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "empty"),
        (PETER_VKEY[:-1], "base64"),
        ("x+00000000+AQ==", "no key material"),
    ],
)
def test_bad_vkeys_are_rejected(vkey: str, message: str) -> None:
    with pytest.raises(NoteError, match=message):
        note.parse_vkey(vkey)


def test_round_trip_with_our_own_key() -> None:
    signer = note.Ed25519Signer("log.example/valise", SigningKey(bytes(range(32))))
    msg = note.sign_note("hello\n\nworld\n", [signer])
    opened = note.open_note(msg, [note.parse_vkey(signer.verifier().vkey())])
    assert opened.text == "hello\n\nworld\n"  # the text may contain blank lines: the LAST one splits
    assert note.parse_skey(signer.skey()).key.seed == bytes(range(32))
    with pytest.raises(NoteError, match="end in a newline"):
        note.sign_note("no newline", [signer])
    with pytest.raises(NoteError, match="contains ' '"):
        note.Ed25519Signer("bad name", SigningKey(bytes(32)))
