"""`valise seal`, `open`, `inspect` through the real entry point, on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from valise import identity, keyfiles
from valise.cli.main import main

from .conftest import NOW

STIX = b'{"type": "bundle", "id": "bundle--1b1e0f35-ec5c-4f3e-9f4b-4c6c3b2f8b10", "objects": []}'


@pytest.fixture
def keys(tmp_path: Path, members: dict[str, identity.Identity]) -> Path:
    for m in ("FRA", "DEU", "ITA"):
        keyfiles.save_identity(tmp_path / m.lower(), members[m], None)
    return tmp_path


def test_seal_inspect_open(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (keys / "in.json").write_bytes(STIX)
    to = f"{keys / 'deu' / 'DEU.pub'},{keys / 'ita' / 'ITA.pub'}"
    args = ["seal", "--identity", str(keys / "fra"), "--to", to, "--tlp", "AMBER+STRICT"]
    args += ["--category", "malware,phishing", "--operation", "OP-7", str(keys / "in.json"), "-o", str(keys / "p")]
    assert main(args) == 0
    assert "sealed packet" in capsys.readouterr().err
    assert main([*args[:-2], "-o", str(keys / "p2"), "--json"]) == 0
    sealed = json.loads(capsys.readouterr().out)
    assert (sealed["to"], sealed["size"]) == (["DEU", "ITA"], (keys / "p2").stat().st_size)
    assert main([*args[:-2], "-o", "-", "--json"]) == 2  # the packet and the JSON would share stdout

    assert main(["inspect", str(keys / "p"), "--from", str(keys / "fra" / "FRA.pub"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["to"] == ["DEU", "ITA"]
    assert info["labels"]["content_type"] == "application/stix+json;version=2.1"
    assert info["signature_verified"] is True
    assert main(["inspect", str(keys / "p")]) == 0
    assert "NOT verified" in capsys.readouterr().out

    out = keys / "out.json"
    assert (
        main(
            [
                "open",
                "--identity",
                str(keys / "ita"),
                "--from",
                str(keys / "fra" / "FRA.pub"),
                str(keys / "p"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes() == STIX
    err = capsys.readouterr().err
    assert "TLP:AMBER+STRICT" in err
    assert "categories malware, phishing" in err

    assert (
        main(
            [
                "open",
                "--identity",
                str(keys / "deu"),
                "--from",
                str(keys / "fra" / "FRA.pub"),
                str(keys / "p"),
                "-o",
                str(keys / "o2"),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["labels"]["operation"] == "OP-7"


def test_errors_are_one_line_and_leave_no_output(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (keys / "in").write_bytes(b"payload")
    assert (
        main(
            [
                "seal",
                "--identity",
                str(keys / "fra"),
                "--to",
                str(keys / "deu" / "DEU.pub"),
                "--tlp",
                "RED",
                str(keys / "in"),
                "-o",
                str(keys / "p"),
            ]
        )
        == 0
    )
    capsys.readouterr()

    out = keys / "never"
    code = main(
        [
            "open",
            "--identity",
            str(keys / "ita"),
            "--from",
            str(keys / "fra" / "FRA.pub"),
            str(keys / "p"),
            "-o",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert "ITA is not a recipient" in err
    assert not out.exists()
    assert not [p for p in keys.iterdir() if p.name.startswith(".never")]  # temp file removed

    code = main(
        [
            "open",
            "--identity",
            str(keys / "deu"),
            "--from",
            str(keys / "ita" / "ITA.pub"),
            str(keys / "p"),
            "-o",
            str(out),
        ]
    )
    assert code == 1
    assert "packet is from FRA" in capsys.readouterr().err

    data = bytearray((keys / "p").read_bytes())
    data[-1] ^= 1
    (keys / "bad").write_bytes(bytes(data))
    code = main(
        [
            "open",
            "--identity",
            str(keys / "deu"),
            "--from",
            str(keys / "fra" / "FRA.pub"),
            str(keys / "bad"),
            "-o",
            str(out),
        ]
    )
    assert code == 1
    assert "ciphertext does not match the SHA-256 in the signed header" in capsys.readouterr().err
    assert not out.exists()


def test_usage_errors(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (keys / "in").write_bytes(b"x")
    base = [
        "seal",
        "--identity",
        str(keys / "fra"),
        "--to",
        str(keys / "deu" / "DEU.pub"),
        str(keys / "in"),
        "-o",
        str(keys / "p"),
    ]
    assert main([*base, "--tlp", "amber"]) == 1
    assert "TLP level" in capsys.readouterr().err
    assert main([*base, "--tlp", "RED", "--category", "Bad Category"]) == 1
    assert "category" in capsys.readouterr().err
    assert main([*base, "--tlp", "RED", "--expires", "2030-01-01T00:00:00"]) == 2
    assert "time zone" in capsys.readouterr().err
    assert main([*base, "--tlp", "RED", "--expires", "2001-01-01T00:00:00Z"]) == 2
    assert "future" in capsys.readouterr().err
    assert not (keys / "p").exists()


def test_passphrase_identity_and_expiry(
    keys: Path,
    members: dict[str, identity.Identity],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keyfiles.save_identity(keys / "nga", members["NGA"], b"open sesame")
    monkeypatch.setenv("VALISE_TEST_PASS", "open sesame")
    (keys / "in").write_bytes(b"\x00" * 70_000)
    assert (
        main(
            [
                "seal",
                "--identity",
                str(keys / "nga"),
                "--passphrase-env",
                "VALISE_TEST_PASS",
                "--to",
                str(keys / "fra" / "FRA.pub"),
                "--tlp",
                "GREEN",
                "--expires",
                "2099-01-01T00:00:00+02:00",
                str(keys / "in"),
                "-o",
                str(keys / "p"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "open",
                "--identity",
                str(keys / "fra"),
                "--from",
                str(keys / "nga" / "NGA.pub"),
                str(keys / "p"),
                "-o",
                str(keys / "out"),
                "--json",
            ]
        )
        == 0
    )
    assert (keys / "out").read_bytes() == b"\x00" * 70_000
    assert json.loads(capsys.readouterr().out)["expires"] == 4070901600
    assert NOW < 4070901600
    assert os.stat(keys / "nga" / "NGA.key").st_mode & 0o077 == 0


def test_stdin_and_stdout_pipes(keys: Path) -> None:
    """`-` for input and output, through a real process and real pipes (seal spools; open streams)."""
    cli = [sys.executable, "-m", "valise.cli.main"]
    payload = os.urandom(200_000)
    sealed = subprocess.run(
        [
            *cli,
            "seal",
            "--identity",
            str(keys / "fra"),
            "--to",
            str(keys / "deu" / "DEU.pub"),
            "--tlp",
            "CLEAR",
            "-",
            "-o",
            "-",
        ],
        input=payload,
        capture_output=True,
        check=True,
    ).stdout
    opened = subprocess.run(
        [*cli, "open", "--identity", str(keys / "deu"), "--from", str(keys / "fra" / "FRA.pub"), "-", "-o", "-"],
        input=sealed,
        capture_output=True,
        check=True,
    )
    assert opened.stdout == payload
    assert b"TLP:CLEAR" in opened.stderr
