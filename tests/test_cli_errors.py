"""Failures a user can act on are one line on stderr with an exit code, never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from valise.cli.main import main as cli
from valise.node.home import NodeHome

from .harness import broker_process, log_vkey, make_world


def test_a_broker_port_in_use_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = make_world(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli(["broker", "serve", "--dir", str(world.home.root), "--listen", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("valise: error: ")
    assert f"cannot listen on 127.0.0.1:{port} (--listen): Address already in use" in err
    assert "pick another port" in err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_an_output_path_that_cannot_be_written_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code = cli(["keygen", "--id", "FRA", "--out", str(not_a_dir / "keys")])
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"valise: error: Not a directory: {not_a_dir / 'keys'}\n"


async def test_a_second_broker_on_one_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two brokers on one directory would both sign checkpoints and push the same mailboxes."""
    world = make_world(tmp_path)
    async with broker_process(world.home.root, tmp_path / "broker.log") as first:
        code = cli(["broker", "serve", "--dir", str(world.home.root), "--listen", "127.0.0.1:0"])
        assert code == 2
        pid = first.proc.pid
        assert (
            capsys.readouterr().err
            == f"valise: error: another broker is running on {world.home.root} (broker, pid {pid})\n"
        )
        assert first.alive()
    # Released with the process (SIGKILL here): the next broker starts.
    async with broker_process(world.home.root, tmp_path / "broker2.log") as second:
        assert second.alive()


async def test_auditing_an_address_that_does_not_serve_entries_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's own broker serves no entry bundles on --http (they say who sent what to whom): the audit said
    only "HTTP 403"."""
    world = make_world(tmp_path)
    async with broker_process(world.home.root, tmp_path / "broker.log") as broker:
        url = f"http://127.0.0.1:{broker.http_port}"
        argv = ["audit", "verify", "--log", url, "--broker-key", log_vkey(world)]
        code = await trio.to_thread.run_sync(cli, argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "HTTP 403: this address does not serve the log's entries" in err
    assert "--serve-entries" in err


async def test_a_tree_only_audit_needs_no_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--tree-only` checks the checkpoint and the tree, which the public hash tiles give; it fetched the entry
    bundles anyway, and so failed (403) on every broker address but an auditors' one."""
    world = make_world(tmp_path)
    capsys.readouterr()  # what `broker init` printed
    async with broker_process(world.home.root, tmp_path / "broker.log") as broker:
        url = f"http://127.0.0.1:{broker.http_port}"
        argv = ["audit", "verify", "--log", url, "--broker-key", log_vkey(world), "--tree-only", "--json"]
        code = await trio.to_thread.run_sync(cli, argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["tree_verified"] is True
    assert report["findings"] == []
    async with broker_process(world.home.root, tmp_path / "broker2.log") as broker:
        url = f"http://127.0.0.1:{broker.http_port}"
        argv = ["audit", "verify", "--log", url, "--broker-key", log_vkey(world), "--tree-only"]
        assert await trio.to_thread.run_sync(cli, argv) == 0
    out = capsys.readouterr().out
    assert "entries not checked (--tree-only)" in out
    assert "summary:" not in out  # it said "0 entries, 0 members" of a log it never read


def test_a_broker_directory_given_for_a_node_and_the_reverse_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = make_world(tmp_path)
    broker = str(world.home.root)
    node = str(tmp_path / "node-fra")
    pub = str(world.home.broker_bundle_path)
    init = ["node", "init", "--dir", node, "--identity", str(world.dirs["FRA"]), "--broker", "127.0.0.1:9"]
    assert cli([*init, "--broker-pub", pub, "--log-key", log_vkey(world)]) == 0
    capsys.readouterr()
    for argv in (["node", "run", "--dir", broker], ["status", "--node", broker], ["inbox", "--node", broker]):
        assert cli(argv) == 2
        assert f"{broker} is a broker directory, not a node directory" in capsys.readouterr().err
    for argv in (["broker", "info", "--dir", node], ["policy", "show", "--dir", node]):
        assert cli(argv) == 2
        assert f"{node} is a node directory, not a broker directory" in capsys.readouterr().err


def test_node_init_pins_the_log_key_from_the_brokers_log_vkey_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = make_world(tmp_path)
    pub = str(world.home.broker_bundle_path)
    init = ["node", "init", "--identity", str(world.dirs["FRA"]), "--broker", "127.0.0.1:9", "--broker-pub", pub]
    assert cli([*init, "--dir", str(tmp_path / "a"), "--log-key", str(world.home.log_vkey_path)]) == 0
    assert NodeHome.open(tmp_path / "a").config().log_vkey == log_vkey(world)
    capsys.readouterr()
    missing = str(tmp_path / "log.vkey")
    assert cli([*init, "--dir", str(tmp_path / "b"), "--log-key", missing]) == 2
    assert f"--log-key: no file {missing}, and it is not a log verifier key" in capsys.readouterr().err
    big = tmp_path / "big.vkey"
    big.write_bytes(b"x" * 100_000)
    assert cli([*init, "--dir", str(tmp_path / "c"), "--log-key", str(big)]) == 2
    assert "too large for a verifier key" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "c").exists()
    # The private key beside it, given by mistake: named, never quoted back (its bytes hold the seed).
    secret = world.home.log_key_path
    seed = world.home.log_key().seed
    assert cli([*init, "--dir", str(tmp_path / "d"), "--log-key", str(secret)]) == 2
    err = capsys.readouterr().err
    assert f"{secret} does not hold a verifier key" in err
    assert not any(seed[i : i + 4].decode("latin-1") in err for i in range(29))
    log_copy = tmp_path / "log-copy"
    assert cli(["log", "export", "--dir", str(world.home.root), "--out", str(log_copy)]) == 0
    capsys.readouterr()
    assert cli(["audit", "verify", "--log", str(log_copy), "--broker-key", str(secret)]) == 2
    assert f"{secret} does not hold a verifier key" in capsys.readouterr().err


def test_node_init_says_how_to_start_a_node_whose_key_has_a_passphrase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    world = make_world(tmp_path)
    monkeypatch.setenv("PW", "correct horse")
    keys = tmp_path / "keys" / "GBR"
    assert cli(["keygen", "--id", "GBR", "--out", str(keys), "--passphrase-env", "PW"]) == 0
    capsys.readouterr()
    for ident, unlock in ((keys, " --passphrase-env VAR"), (world.dirs["FRA"], "")):
        node = tmp_path / f"node-{ident.name}"
        argv = ["node", "init", "--dir", str(node), "--identity", str(ident), "--broker", "127.0.0.1:9"]
        assert cli([*argv, "--broker-pub", str(world.home.broker_bundle_path), "--log-key", log_vkey(world)]) == 0
        assert capsys.readouterr().out.rstrip().endswith(f"start it with: valise node run --dir {node}{unlock}")


def test_with_json_a_failure_is_one_json_value_on_stdout_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A script reads stdout with --json: success and failure must parse alike (the text stays on stderr)."""
    for argv, code, what in (
        (["status", "--node", str(tmp_path / "nowhere"), "--json"], 1, "is not a node directory"),
        (["broker", "info", "--dir", str(tmp_path / "nowhere"), "--json"], 1, "is not a broker directory"),
        (["audit", "verify", "--log", str(tmp_path), "--broker-key", "not a key", "--json"], 2, "key"),
    ):
        assert cli(argv) == code
        out, err = capsys.readouterr()
        reply = json.loads(out)
        assert (reply["ok"], reply["code"]) == (False, code)
        assert what in reply["error"]
        assert err.startswith("valise: error: ")
    assert cli(["broker", "info", "--dir", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().out == ""  # without --json, nothing on stdout


def test_mixed_up_key_files_and_paths_are_named_for_what_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = make_world(tmp_path)
    keys = world.dirs["DEU"]
    add = ["broker", "member", "add", "--dir", str(world.home.root), "--kind", "country", "--region", "x"]
    assert cli([*add, "--bundle", str(keys / "DEU.key")]) == 1  # the private key, about to be handed out
    assert "DEU.key is a private key file, not a public bundle: never hand it out" in capsys.readouterr().err
    out = tmp_path / "b.vls"
    argv = ["seal", "--identity", str(keys / "DEU.key"), "--to", str(keys / "DEU.pub"), "--tlp", "GREEN"]
    assert cli([*argv, str(tmp_path / "keys" / "FRA" / "FRA.pub"), "-o", str(out)]) == 1
    assert "DEU.key is a file: give the identity directory that holds it" in capsys.readouterr().err
    argv = ["audit", "verify", "--log", str(tmp_path), "--broker-key", str(tmp_path / "vkey.txt")]
    assert cli(argv) == 2
    assert f"no file {tmp_path / 'vkey.txt'}, and it is not a vkey" in capsys.readouterr().err
    target = tmp_path / "missing" / "g.stmt"
    argv = ["policy", "grant", "--identity", str(keys), "--origin", "x.example/log", "--to", "FRA", "--tlp", "GREEN"]
    assert cli([*argv, "-o", str(target)]) == 1
    err = capsys.readouterr().err
    assert f"No such file or directory: {target}" in err
    assert ".tmp" not in err  # our scratch file's name is not the user's business


def test_with_json_and_a_payload_on_stdout_a_failure_goes_to_stderr(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """`open -o -` writes the plaintext to stdout; a failure's JSON must not be appended to that stream."""
    world = make_world(tmp_path)
    bad = tmp_path / "bad.vls"
    bad.write_bytes(b"not a packet at all")
    capsysbinary.readouterr()  # what making the world printed
    keys, pub = str(world.dirs["DEU"]), str(world.dirs["FRA"] / "FRA.pub")
    assert cli(["open", "--identity", keys, "--from", pub, "--json", "-o", "-", str(bad)]) != 0
    out, err = capsysbinary.readouterr()
    assert out == b""
    reply = json.loads(err.decode().splitlines()[-1])
    assert reply["ok"] is False


def test_a_node_with_a_damaged_tls_key_stops_at_start_naming_the_file(tmp_path: Path) -> None:
    """It used to start, then fail every connection attempt for ever with OpenSSL's "PEM lib", naming no file."""
    world = make_world(tmp_path)
    node = tmp_path / "node-fra"
    pub = str(world.home.broker_bundle_path)
    init = ["node", "init", "--dir", str(node), "--identity", str(world.dirs["FRA"]), "--broker", "127.0.0.1:9"]
    assert cli([*init, "--broker-pub", pub, "--log-key", log_vkey(world)]) == 0
    key = world.dirs["FRA"] / "FRA.tls.key"
    key.write_bytes(key.read_bytes()[:40])
    run = subprocess.run(
        [sys.executable, "-m", "valise.cli.main", "node", "run", "--dir", str(node)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert f"the TLS certificate {world.dirs['FRA'] / 'FRA.tls.crt'} or its key {key} cannot be used" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_broker_with_a_damaged_tls_key_stops_at_start_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = make_world(tmp_path)
    key = world.home.identity_dir / "broker.tls.key"
    key.write_bytes(key.read_bytes()[:40])
    capsys.readouterr()
    assert cli(["broker", "serve", "--dir", str(world.home.root), "--listen", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err
    assert (
        f"cannot make the broker's TLS context from its certificate {key.with_name('broker.tls.crt')}, its key {key}"
        in err
    )


def test_a_lost_broker_log_is_named_not_recreated_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`broker info` reported a log of size 0 and left a new empty broker.db; `serve` then failed on "entry range
    [0, 1) is not within the log of 0 entries"."""
    world = make_world(tmp_path)
    db = world.home.db_path
    for name in (db.name + "-wal", db.name + "-shm"):
        (db.parent / name).unlink(missing_ok=True)
    db.write_bytes(b"")
    capsys.readouterr()
    for argv in (["broker", "info", "--dir", str(world.home.root)], ["broker", "serve", "--dir", str(world.home.root)]):
        assert cli(argv) == 1
        assert f"{db} is missing or empty: the broker's log is lost" in capsys.readouterr().err
    assert db.stat().st_size == 0  # nothing made in its place
