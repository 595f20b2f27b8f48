"""A member moves to new identity and TLS keys (a compromise, or routine rotation): `valise keygen --rotate`
signs the hand-over with the old key, the operator appends it (`valise broker member rekey`), and the broker
ends connections on the old certificate and takes the new one. Real broker, real TLS, the real commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from valise import keyfiles
from valise.policy import records as prec
from valise.wire import codes
from valise.wire import events as ev

from .harness import ORIGIN, WireClient, cli, make_world, running_broker, seal


def test_a_rekey_request_for_another_log_or_signed_by_another_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = make_world(tmp_path)
    broker = str(world.home.root)
    out = tmp_path / "fra-new"
    assert (
        cli(["keygen", "--rotate", str(world.dirs["FRA"]), "--origin", "another.example/log", "--out", str(out)]) == 0
    )
    capsys.readouterr()
    assert cli(["broker", "member", "rekey", "--dir", broker, "--request", str(out / "FRA.rekey")]) == 2
    assert "hands over a membership in another.example/log, not in this log" in capsys.readouterr().err
    # The new bundle, handed over with DEU's key instead of FRA's old one: the fold refuses it, nothing appended.
    forged = prec.rekey_request(world.members["DEU"].signing, "FRA", ORIGIN, keyfiles.load_bundle(out / "FRA.pub").raw)
    (tmp_path / "forged.rekey").write_bytes(forged)
    assert cli(["broker", "member", "rekey", "--dir", broker, "--request", str(tmp_path / "forged.rekey")]) != 0
    assert "hand-over signature of FRA" in capsys.readouterr().err
    assert cli(["keygen", "--rotate", str(world.dirs["FRA"]), "--out", str(tmp_path / "x")]) == 2
    assert "--rotate needs --origin" in capsys.readouterr().err


async def test_a_member_moves_to_new_keys_and_its_old_certificate_is_cut_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU")
    new_dir = tmp_path / "fra-new"
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as old:
        old.refuse_cosign = True
        assert isinstance(await old.submit(seal(world, "FRA", ["DEU"], b"before")), ev.Receipt)
        capsys.readouterr()
        fra = str(world.dirs["FRA"])
        assert cli(["keygen", "--rotate", fra, "--origin", ORIGIN, "--out", str(new_dir), "--json"]) == 0
        rotated = json.loads(capsys.readouterr().out)
        request = rotated["request"]
        assert cli(["broker", "member", "rekey", "--dir", str(world.home.root), "--request", request, "--json"]) == 0
        said = capsys.readouterr()
        assert json.loads(said.out)["kind"] == "member-rekey", said
        # The connection on the old certificate ends once the broker has folded the record (its policy poll).
        closed = await old.next_of(ev.ErrorMessage)
        assert isinstance(closed, ev.ErrorMessage)
        assert closed.code == codes.UNAUTHENTICATED
        assert "FRA moved to new keys" in closed.message
        new = keyfiles.load_identity(new_dir)
        assert broker.policy.members["FRA"].sign_key == new.bundle.sign_key
        assert broker.policy.members["FRA"].enc_key == new.bundle.enc_key != world.members["FRA"].bundle.enc_key
        assert [k.private_bytes_raw() for k in new.enc_previous] == [
            world.members["FRA"].enc_private.private_bytes_raw()
        ]
        world.members["FRA"], world.dirs["FRA"] = new, new_dir
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            fra.refuse_cosign = True
            assert isinstance(await fra.submit(seal(world, "FRA", ["DEU"], b"after")), ev.Receipt)
        with trio.fail_after(5):
            while broker.sessions.get("FRA") is not None:  # noqa: ASYNC110 - the daemon's own state
                await trio.sleep(0.01)


def test_policy_show_lists_the_keys_a_member_moved_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An operator or auditor sees which identity key signed a member's entries up to where: `policy show`."""
    world = make_world(tmp_path)
    broker = str(world.home.root)
    out = tmp_path / "fra-new"
    assert cli(["keygen", "--rotate", str(world.dirs["FRA"]), "--origin", ORIGIN, "--out", str(out)]) == 0
    assert cli(["broker", "member", "rekey", "--dir", broker, "--request", str(out / "FRA.rekey"), "--json"]) == 0
    rekeyed_at = json.loads(capsys.readouterr().out.splitlines()[-1])["index"]
    assert cli(["policy", "show", "--dir", broker, "--json"]) == 0
    members = {m["id"]: m for m in json.loads(capsys.readouterr().out)["members"]}
    old_key = world.members["FRA"].bundle.sign_key.hex()
    assert members["FRA"]["replaced_keys"] == [{"key": old_key, "until": rekeyed_at}]
    assert members["FRA"]["sign_key"] == keyfiles.load_identity(out).bundle.sign_key.hex()
    assert members["DEU"]["replaced_keys"] == []
    assert cli(["policy", "show", "--dir", broker]) == 0
    assert f"identity key {old_key[:16]}… replaced at log entry {rekeyed_at}" in capsys.readouterr().out
