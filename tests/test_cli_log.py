"""`valise broker init|info` and `valise log export`, run through the real entry point on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from valise.broker.home import BrokerHome
from valise.cli.main import main
from valise.genesis import Genesis
from valise.logservice import LogService
from valise.store.export import verify_export
from valise.store.sqlite import SqliteLog
from valise.tlog import merkle, note


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_info_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "broker"
    code, out, _ = run(capsys, "broker", "init", "--dir", str(d), "--origin", "valise.example/log", "--json")
    assert code == 0
    made = json.loads(out)
    assert made["origin"] == "valise.example/log"
    assert made["broker_id"] == "broker"
    # Entry 0 is the genesis record, already under a signed checkpoint.
    assert (made["log_size"], made["checkpoint_size"]) == (1, 1)
    verifier = note.parse_vkey(made["vkey"])
    assert made["vkey"].startswith("valise.example/log+")
    assert Path(made["broker_pub"]).is_file()

    code, out, _ = run(capsys, "broker", "info", "--dir", str(d), "--json")
    assert code == 0
    assert json.loads(out) == made

    # Append through the service, as the daemon would, then export and check the export from the outside.
    home = BrokerHome.open(d)
    with SqliteLog.open(home.db_path) as store:
        LogService(store, "valise.example/log", home.log_key()).append_and_sign(
            [b"entry %d" % i for i in range(300)], now=0.0
        )
    code, out, _ = run(capsys, "log", "export", "--dir", str(d), "--out", str(tmp_path / "site"), "--json")
    assert code == 0
    assert json.loads(out)["size"] == 301
    cp = verify_export(tmp_path / "site", verifier)
    assert cp.size == 301
    with SqliteLog.open(home.db_path) as store:
        genesis = Genesis.parse(store.entries(0, 1)[0], origin="valise.example/log")
    assert genesis.operator_key == home.operator_key().public
    assert genesis.broker.member_id == "broker"
    leaves = [genesis.entry()] + [b"entry %d" % i for i in range(300)]
    assert cp.root == merkle.root_from_leaf_hashes([merkle.hash_leaf(e) for e in leaves])

    code, out, _ = run(capsys, "broker", "info", "--dir", str(d))
    assert code == 0
    assert "log_size         301" in out
    assert f"vkey             {made['vkey']}" in out


def test_init_refuses_existing_dir_and_bad_origin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "b")
    assert run(capsys, "broker", "init", "--dir", d, "--origin", "o.example/log")[0] == 0
    code, _, err = run(capsys, "broker", "init", "--dir", d, "--origin", "o.example/log")
    assert code == 2
    assert "already a broker directory" in err
    code, _, err = run(capsys, "broker", "init", "--dir", str(tmp_path / "c"), "--origin", "has space")
    assert code == 2
    assert "origin 'has space' is not valid" in err


def test_info_and_export_need_a_broker_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "broker", "info", "--dir", str(tmp_path))
    assert code == 1
    assert "is not a broker directory" in err
    code, _, err = run(capsys, "log", "export", "--dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 1
    assert "is not a broker directory" in err


def test_bare_group_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "broker")
    assert code == 2
    assert "init" in out
    assert "info" in out
