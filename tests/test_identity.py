from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from valise import encoding, identity, keyfiles
from valise.cli.main import main
from valise.errors import BundleError, KeyFileError, MemberIdError, PassphraseError, UsageError

from .conftest import NOW, seeded_random


@pytest.mark.parametrize("good", ["FRA", "a", "x" * 64, "desk.africa_1-2"])
def test_member_id_accepts_allowed_characters(good: str) -> None:
    assert identity.check_member_id(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 65, "FR A", "FRA/..", "é", "a\n", "a:b"])
def test_member_id_refuses_others(bad: str) -> None:
    with pytest.raises(MemberIdError, match="not valid"):
        identity.check_member_id(bad)


def test_generation_is_reproducible_from_randomness() -> None:
    a = identity.generate("FRA", seeded_random(b"x"), NOW)
    b = identity.generate("FRA", seeded_random(b"x"), NOW)
    assert a.bundle.raw == b.bundle.raw
    assert a.bundle.sign_key != a.bundle.tls_public_key  # separate keys, separate jobs


def test_bundle_round_trip(members: dict[str, identity.Identity]) -> None:
    fra = members["FRA"]
    loaded = identity.PublicBundle.from_bytes(fra.bundle.raw)
    assert loaded == fra.bundle
    assert loaded.enc_key == fra.enc_private.public_key().public_bytes_raw()


def test_every_flipped_byte_of_a_bundle_is_refused(members: dict[str, identity.Identity]) -> None:
    raw = members["FRA"].bundle.raw
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        with pytest.raises(BundleError):
            identity.PublicBundle.from_bytes(bytes(bad))


def test_bundle_with_swapped_encryption_key_is_refused(members: dict[str, identity.Identity]) -> None:
    outer = encoding.unpack(members["FRA"].bundle.raw, what="b", max_size=10_000)
    body = encoding.unpack(outer["body"], what="b", max_size=10_000)
    body["enc_key"] = members["DEU"].bundle.enc_key
    # Re-sign the outer layer with FRA's key: the inner key statement must still catch the swap.
    new_body = encoding.pack(body)
    forged = encoding.pack({"body": new_body, "sig": members["FRA"].signing.sign(identity.BUNDLE_DOMAIN, new_body)})
    with pytest.raises(BundleError, match="encryption key statement"):
        identity.PublicBundle.from_bytes(forged)


def test_bundle_truncated_and_oversized_are_refused(members: dict[str, identity.Identity]) -> None:
    raw = members["FRA"].bundle.raw
    with pytest.raises(BundleError, match="malformed"):
        identity.PublicBundle.from_bytes(raw[:-10])
    with pytest.raises(BundleError, match="over the limit"):
        identity.PublicBundle.from_bytes(raw + b"\x00" * identity.BUNDLE_MAX_SIZE)


def test_keyfiles_plain_and_encrypted(tmp_path: Path, members: dict[str, identity.Identity]) -> None:
    fra = members["FRA"]
    keyfiles.save_identity(tmp_path / "plain", fra, None)
    assert keyfiles.load_identity(tmp_path / "plain").bundle == fra.bundle
    mode = stat.S_IMODE(os.stat(tmp_path / "plain" / "FRA.key").st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "plain" / "FRA.tls.key").st_mode) == 0o600

    keyfiles.save_identity(tmp_path / "enc", fra, b"correct horse")
    assert b"sign_seed" not in (tmp_path / "enc" / "FRA.key").read_bytes()
    assert keyfiles.load_identity(tmp_path / "enc", b"correct horse").signing.seed == fra.signing.seed
    with pytest.raises(PassphraseError, match="does not open"):
        keyfiles.load_identity(tmp_path / "enc", b"wrong")
    with pytest.raises(PassphraseError, match="encrypted"):
        keyfiles.load_identity(tmp_path / "enc", None)


def test_keyfile_with_loose_permissions_is_refused(tmp_path: Path, members: dict[str, identity.Identity]) -> None:
    keyfiles.save_identity(tmp_path, members["FRA"], None)
    os.chmod(tmp_path / "FRA.key", 0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        keyfiles.load_identity(tmp_path)


def test_keygen_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["keygen", "--id", "FRA", "--out", str(tmp_path / "k")]) == 0
    assert keyfiles.load_bundle(tmp_path / "k" / "FRA.pub").member_id == "FRA"
    # A second keygen into the same directory must not destroy the first identity.
    assert main(["keygen", "--id", "FRA", "--out", str(tmp_path / "k")]) == 2
    assert "already exists" in capsys.readouterr().err
    # Nor may another member's identity join it (a mistyped --out): the directory would become ambiguous.
    before = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert main(["keygen", "--id", "GBR", "--out", str(tmp_path / "k")]) == 2
    assert f"{tmp_path / 'k'} already holds identity FRA" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == before
    assert keyfiles.load_identity(tmp_path / "k").member_id == "FRA"
    assert main(["keygen", "--id", "no spaces", "--out", str(tmp_path / "x")]) == 2
    assert "not valid" in capsys.readouterr().err
    monkeypatch.setenv("PW", "s3cret")
    assert main(["keygen", "--id", "DEU", "--out", str(tmp_path / "d"), "--passphrase-env", "PW"]) == 0
    assert keyfiles.load_identity(tmp_path / "d", b"s3cret").member_id == "DEU"


def test_a_passphrase_for_a_key_that_has_none_is_said_to_be_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Harmless, but the person believes the key is protected: they are told it is not."""
    assert main(["keygen", "--id", "FRA", "--out", str(tmp_path / "k")]) == 0
    assert keyfiles.load_identity(tmp_path / "k", b"some passphrase").member_id == "FRA"
    assert "FRA.key is not encrypted; the passphrase given is not used" in caplog.text
    caplog.clear()
    keyfiles.load_identity(tmp_path / "k")
    assert caplog.text == ""


def test_a_rotated_identity_keeps_its_member_id_and_may_keep_its_encryption_key() -> None:
    old = identity.generate("FRA", seeded_random(b"old"), NOW)
    new = identity.rotate(old, seeded_random(b"new"), NOW + 60, new_encryption_key=False)
    again = identity.PublicBundle.from_bytes(new.bundle.raw)  # verifies under the new identity key
    assert (again.member_id, again.enc_key, again.enc_created) == ("FRA", old.bundle.enc_key, old.bundle.enc_created)
    assert again.sign_key != old.bundle.sign_key
    assert again.cert_der != old.bundle.cert_der
    assert new.enc_private.private_bytes_raw() == old.enc_private.private_bytes_raw()
    assert new.enc_previous == ()


@pytest.mark.parametrize("passphrase", [None, b"s3cret"])
def test_a_rotation_replaces_the_encryption_key_and_keeps_the_old_ones_at_rest(
    tmp_path: Path, passphrase: bytes | None
) -> None:
    """By default (a compromise) the encryption key is replaced too, and the replaced ones kept, newest first, in
    the key file: what senders sealed to them before their logs showed the move must still open."""
    first = identity.generate("FRA", seeded_random(b"first"), NOW)
    second = identity.rotate(first, seeded_random(b"second"), NOW + 60)
    third = identity.rotate(second, seeded_random(b"third"), NOW + 120)
    raw = [k.private_bytes_raw() for k in (first.enc_private, second.enc_private, third.enc_private)]
    assert len(set(raw)) == 3
    assert third.bundle.enc_key == third.enc_private.public_key().public_bytes_raw()
    assert third.bundle.enc_created > second.bundle.enc_created > first.bundle.enc_created
    assert [k.private_bytes_raw() for k in third.enc_previous] == [raw[1], raw[0]]
    keyfiles.save_identity(tmp_path / "k", third, passphrase)
    loaded = keyfiles.load_identity(tmp_path / "k", passphrase)
    assert [k.private_bytes_raw() for k in loaded.enc_previous] == [raw[1], raw[0]]
    # A key file without replaced keys is exactly what earlier versions wrote and read (no new field).
    keyfiles.save_identity(tmp_path / "f", first, None)
    plain = keyfiles.open_secrets((tmp_path / "f" / "FRA.key").read_bytes(), None, what="key file")
    assert sorted(plain) == ["bundle", "enc_private", "id", "sign_seed", "tls_private"]


def test_a_key_file_with_a_damaged_list_of_replaced_keys_is_refused(tmp_path: Path) -> None:
    ident = identity.rotate(identity.generate("FRA", seeded_random(b"a"), NOW), seeded_random(b"b"), NOW + 1)
    secrets = ident.secrets()
    for bad, what in ((b"not a list", "wrong type"), ([b"short"], "not 32-byte keys"), ([7], "not 32-byte keys")):
        d = tmp_path / what.replace(" ", "-") / str(len(str(bad)))
        d.mkdir(parents=True)
        keyfiles.write_private(d / "FRA.key", keyfiles.seal_secrets({**secrets, "enc_previous": bad}, None))
        with pytest.raises((KeyFileError, BundleError), match=what):
            keyfiles.load_identity(d)


def test_a_rotation_whose_key_file_would_be_over_the_limit_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A review: a key file that keeps many replaced encryption keys grew past the 16 KiB a loader accepts, and
    `keygen --rotate` wrote it (and the rekey request) and exited 0: once the operator appended the request, the
    member could neither run its node nor read its inbox. It is refused before anything is written."""
    from dataclasses import replace

    from cryptography.hazmat.primitives.asymmetric import x25519

    rnd = seeded_random(b"many")
    ident = identity.generate("FRA", rnd, NOW)
    kept = tuple(x25519.X25519PrivateKey.from_private_bytes(rnd(32)) for _ in range(470))
    with pytest.raises(UsageError, match="over the limit of 16384: it keeps 470 replaced encryption keys"):
        keyfiles.save_identity(tmp_path / "full", replace(ident, enc_previous=kept), None)  # loading would refuse
    assert not (tmp_path / "full").exists()
    fits = max(n for n in range(470) if len(keyfiles.seal_secrets(replace(ident, enc_previous=kept[:n]).secrets(),
                                                                  None)) <= keyfiles.KEYFILE_MAX_SIZE)  # fmt: skip
    keyfiles.save_identity(tmp_path / "old", replace(ident, enc_previous=kept[:fits]), None)
    assert len(keyfiles.load_identity(tmp_path / "old").enc_previous) == fits
    argv = ["keygen", "--rotate", str(tmp_path / "old"), "--origin", "o.example/log", "--out", str(tmp_path / "new")]
    assert main(argv) == 2
    assert "over the limit of 16384" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # neither keys nor a rekey request
    assert main([*argv, "--keep-encryption-key"]) == 0  # keeping the key adds none


@pytest.mark.parametrize("field", ["sign_seed", "enc_private", "tls_private"])
def test_a_key_file_with_a_key_of_the_wrong_length_is_a_clear_error(tmp_path: Path, field: str) -> None:
    """A fuzzing review: a damaged key file (a 31-byte seed) raised a bare ValueError from the key constructors,
    so `valise open`, `node run` and `broker serve` stopped with a traceback."""
    me = identity.generate("FRA", seeded_random(b"FRA"), NOW)
    keyfiles.save_identity(tmp_path, me, None)
    path = tmp_path / "FRA.key"
    secrets = keyfiles.open_secrets(path.read_bytes(), None, what="key file")
    secrets[field] = secrets[field][:31]
    path.write_bytes(keyfiles.seal_secrets(secrets, None))
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match=f"the key file of FRA is damaged: its {field} is 31 bytes, not 32"):
        keyfiles.load_identity(tmp_path)
