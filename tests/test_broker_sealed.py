"""The broker's own keys (its identity, with the TLS key, and the log key) sealed under a passphrase: nothing on
disk opens without it, `broker serve` needs it, and everything else (operator commands, info, export) works
without it, leaving checkpoints to the running broker."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest
import trio

from valise import keyfiles
from valise.broker.daemon import BrokerDaemon, Settings
from valise.broker.home import BrokerHome
from valise.cli.main import main
from valise.errors import PassphraseError
from valise.store.sqlite import SqliteLog
from valise.tlog import note
from valise.wire import events as ev

from .harness import ORIGIN, WireClient, make_world, seal

PW_VAR = "BROKER_PW"
PASSPHRASE = "correct horse battery"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def sizes(home: BrokerHome) -> tuple[int, int]:
    """(entries in the log, size of the last signed checkpoint)."""
    with SqliteLog.open(home.db_path) as store:
        saved = store.load_checkpoint()
        return store.size(), 0 if saved is None else saved[0]


@pytest.fixture
def sealed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(PW_VAR, PASSPHRASE)
    d = tmp_path / "broker"
    assert main(["broker", "init", "--dir", str(d), "--origin", ORIGIN, "--passphrase-env", PW_VAR]) == 0
    return d


def test_init_says_how_to_start_a_broker_whose_keys_are_sealed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PW_VAR, PASSPHRASE)
    for name, extra, unlock in (("a", ("--passphrase-env", PW_VAR), f" --passphrase-env {PW_VAR}"), ("b", (), "")):
        d = tmp_path / name
        code, out, _ = run(capsys, "broker", "init", "--dir", str(d), "--origin", ORIGIN, *extra)
        assert code == 0
        assert out.rstrip().endswith(f"start it with: valise broker serve --dir {d}{unlock}")


def test_init_seals_the_identity_tls_and_log_keys(sealed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = BrokerHome.open(sealed)
    assert home.log_key_sealed()
    assert keyfiles.is_encrypted(home.identity_dir)
    assert b"ENCRYPTED PRIVATE KEY" in (home.identity_dir / "broker.tls.key").read_bytes()
    with pytest.raises(PassphraseError, match="is encrypted"):
        home.log_key()
    with pytest.raises(PassphraseError, match="is encrypted"):
        home.broker_identity()
    # The public halves need no passphrase: what nodes pin, and what `broker info` prints for them.
    key = home.log_key(PASSPHRASE.encode())
    vkey = note.Ed25519Signer(ORIGIN, key).verifier().vkey()
    assert home.log_vkey_path.read_text() == vkey + "\n"
    code, out, _ = run(capsys, "broker", "info", "--dir", str(sealed), "--json")
    assert code == 0
    facts = json.loads(out)
    assert (facts["vkey"], facts["log_size"], facts["checkpoint_size"]) == (vkey, 1, 1)
    assert (facts["log_vkey"], facts["keys_sealed"]) == (str(home.log_vkey_path), True)
    assert home.broker_bundle().cert_der == home.broker_identity(PASSPHRASE.encode()).bundle.cert_der


def test_serve_needs_the_passphrase(
    sealed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = ("broker", "serve", "--dir", str(sealed), "--listen", "127.0.0.1:0")
    code, _, err = run(capsys, *serve)
    assert code != 0
    assert "is encrypted" in err
    assert "--passphrase-env" in err
    monkeypatch.setenv("WRONG_PW", "incorrect horse")
    code, _, err = run(capsys, *serve, "--passphrase-env", "WRONG_PW")
    assert code != 0
    assert "the passphrase does not open" in err
    # Refused before serving, the broker let go of its directory's lock: another may take it at once.
    with (sealed / "serve.lock").open("a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


async def test_operator_commands_append_and_the_running_broker_signs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(PW_VAR, PASSPHRASE)
    world = make_world(tmp_path, init=("--passphrase-env", PW_VAR))
    home = world.home
    assert home.log_key_sealed()
    world.consent("FRA", "DEU")
    rule = ("broker", "rule", "ban-category", "--dir", str(home.root), "--category", "political")
    code, _, err = run(capsys, *rule)
    assert code == 0
    assert "the log key is sealed: the running broker signs" in err
    size, signed = sizes(home)
    assert signed < size  # appended, not yet signed: nothing here could sign it

    settings = Settings(listen=("127.0.0.1", 0), http=None, checkpoint_interval=0.1, policy_poll=0.1)
    daemon = BrokerDaemon(home, settings, PASSPHRASE.encode())
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        with trio.fail_after(10):
            while sizes(home)[1] < size:  # noqa: ASYNC110 - the log on disk, which another process may read
                await trio.sleep(0.05)
        # The TLS key opened with the same passphrase: members connect, and the broker signs receipts.
        async with WireClient.connect(world, "FRA", daemon.port) as fra:
            fra.refuse_cosign = True
            answer = await fra.submit(seal(world, "FRA", ["DEU"], b"indicator"))
            assert isinstance(answer, ev.Receipt), answer
            assert answer.index >= size
            denied = await fra.submit(seal(world, "FRA", ["DEU"], b"x", categories=("political",)))
            assert isinstance(denied, ev.Deny), denied
        await daemon.shutdown(nursery)
    # An auditor checks what it signed against log.vkey, the file made for pinning.
    out = tmp_path / "export"
    assert main(["log", "export", "--dir", str(home.root), "--out", str(out)]) == 0
    assert main(["audit", "verify", "--log", str(out), "--broker-key", str(home.log_vkey_path)]) == 0


def test_a_log_vkey_that_is_not_the_log_key_is_refused(sealed: Path, tmp_path: Path) -> None:
    home = BrokerHome.open(sealed)
    other = tmp_path / "other"
    assert main(["broker", "init", "--dir", str(other), "--origin", ORIGIN]) == 0
    home.log_vkey_path.write_bytes((other / "log.vkey").read_bytes())
    with SqliteLog.open(home.db_path) as store, pytest.raises(Exception, match="is not the key of"):
        home.log_service(store, PASSPHRASE.encode())
