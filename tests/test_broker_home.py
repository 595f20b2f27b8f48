"""The broker's seed key files (operator and log keys): plain or sealed under a passphrase, and refused when
damaged, swapped, oversized or readable by others."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from valise import encoding
from valise.broker.home import SEED_FILE_MAX, read_seed_file, write_seed_file
from valise.errors import KeyFileError, PassphraseError

SEED = bytes(range(32))


@pytest.mark.parametrize("passphrase", [None, b"correct horse"])
def test_a_seed_file_gives_back_its_key(tmp_path: Path, passphrase: bytes | None) -> None:
    path = tmp_path / "operator.key"
    write_seed_file(path, "operator", SEED, passphrase)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert SEED not in path.read_bytes() or passphrase is None
    key = read_seed_file(path, "operator", passphrase)
    assert key.public == read_seed_file(path, "operator", passphrase).public
    # The key is the seed's: the same seed written plainly gives the same public key.
    plain = tmp_path / "plain.key"
    write_seed_file(plain, "operator", SEED)
    assert read_seed_file(plain, "operator").public == key.public


def test_a_sealed_seed_file_needs_its_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "operator.key"
    write_seed_file(path, "operator", SEED, b"correct horse")
    with pytest.raises(PassphraseError, match="is encrypted"):
        read_seed_file(path, "operator")
    with pytest.raises(PassphraseError, match="the passphrase does not open operator key"):
        read_seed_file(path, "operator", b"incorrect horse")


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _alter_box(data: bytes) -> bytes:
    head = encoding.unpack(data, what="test", max_size=SEED_FILE_MAX)
    head["data"] = head["data"][:-1] + bytes([head["data"][-1] ^ 1])
    return encoding.pack(head)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_alter_box, "the passphrase does not open"),  # the sealed box altered: its MAC fails
        (lambda b: b[: len(b) // 2], "is damaged"),  # truncated
        (lambda b: b + bytes(SEED_FILE_MAX), "too large for a operator key"),  # refused before parsing
    ],
)
def test_a_damaged_sealed_seed_file_is_refused(tmp_path: Path, damage: object, message: str) -> None:
    path = tmp_path / "operator.key"
    write_seed_file(path, "operator", SEED, b"correct horse")
    assert callable(damage)
    _rewrite(path, damage(path.read_bytes()))
    with pytest.raises((KeyFileError, PassphraseError), match=message):
        read_seed_file(path, "operator", b"correct horse")


@pytest.mark.parametrize("passphrase", [None, b"correct horse"])
def test_a_log_key_is_not_an_operator_key(tmp_path: Path, passphrase: bytes | None) -> None:
    path = tmp_path / "log.key"
    write_seed_file(path, "log", SEED, passphrase)
    with pytest.raises(KeyFileError, match="is not a operator key"):
        read_seed_file(path, "operator", passphrase)


def test_a_seed_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "operator.key"
    write_seed_file(path, "operator", SEED)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        read_seed_file(path, "operator")


@pytest.mark.parametrize(
    ("ops", "mem"),
    [(0, 2**26), (-1, 2**26), (3, 0), (3, -5), (5, 2**26), (16, 2**30), (3, 2**31)],
)
def test_crafted_key_derivation_parameters_are_refused_before_any_work(tmp_path: Path, ops: int, mem: int) -> None:
    """A key file decides how much work and memory unlocking it takes: out of libsodium's range, or above its
    "sensitive" level, it is refused by name before any derivation (not a crash, not 1 GiB and 12 s spent)."""
    path = tmp_path / "operator.key"
    head = {"v": 1, "kdf": "argon2id", "salt": b"s" * 16, "ops": ops, "mem": mem, "data": bytes(80)}
    path.write_bytes(encoding.pack(head))
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=rf"unreasonable key-derivation parameters \(ops {ops}, mem {mem}\)"):
        read_seed_file(path, "operator", b"correct horse")
