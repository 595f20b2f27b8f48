"""The policy CLI end to end, on real broker directories and key files."""

from __future__ import annotations

import json
import shlex
import stat
from pathlib import Path

import pytest

from valise.broker.home import BrokerHome
from valise.cli.main import main
from valise.policy import records
from valise.store.sqlite import SqliteLog
from valise.tlog import cosignature

ORIGIN = "test.valise.example/log"


def log_size(d: Path) -> int:
    store = SqliteLog.open(BrokerHome(d).db_path)
    try:
        return store.size()
    finally:
        store.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A broker with FRA, DEU (countries, europe) and ACME (partner) admitted; keys under tmp_path/keys/ID."""
    d = tmp_path / "broker"
    assert main(["broker", "init", "--dir", str(d), "--origin", ORIGIN]) == 0
    for mid, kind in (("FRA", "country"), ("DEU", "country"), ("ACME", "partner")):
        keys = tmp_path / "keys" / mid
        assert main(["keygen", "--id", mid, "--out", str(keys)]) == 0
        bundle = str(keys / f"{mid}.pub")
        assert (
            main(["broker", "member", "add", "--dir", str(d), "--bundle", bundle, "--kind", kind, "--region", "europe"])
            == 0
        )
    capsys.readouterr()
    return d


def statement(capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str, who: str, *args: str) -> tuple[Path, str]:
    out = tmp_path / f"{kind}-{who}-{len(list(tmp_path.glob('*.stmt')))}.stmt"
    code, text, err = run(
        capsys, "policy", kind, "--identity", str(tmp_path / "keys" / who), "--origin", ORIGIN, *args, "-o", str(out)
    )
    assert code == 0, err
    return out, text.split()[1]  # "<kind> <id hex> by ..."


def test_the_broker_directory_is_its_owners_only(broker: Path) -> None:
    # The mailboxes, the spool and the full log say who sent what to whom: nobody else on the host may read them.
    assert stat.S_IMODE(broker.stat().st_mode) == 0o700


def test_grant_accept_explain_revoke(broker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(broker)
    explain = ("policy", "explain", "--dir", d, "--from", "FRA", "--to", "DEU", "--tlp", "AMBER", "--category", "fraud")
    code, out, _ = run(capsys, *explain)
    assert code == 3
    assert "FRA -> DEU: DENY: FRA has not granted anything to DEU" in out

    g, gid = statement(
        capsys, tmp_path, "grant", "FRA", "--to", "DEU", "--tlp", "AMBER", "--category", "phishing,malware"
    )
    a, _ = statement(capsys, tmp_path, "accept", "DEU", "--from", "FRA", "--tlp", "RED")
    code, out, err = run(capsys, "broker", "statement", "add", "--dir", d, str(g), str(a))
    assert code == 0, err
    assert f"added grant {gid} by FRA" in out

    code, out, _ = run(capsys, *explain)
    assert code == 3
    assert f"FRA has not granted DEU category 'fraud' (grant {gid[:8]}… covers malware, phishing)" in out
    code, out, _ = run(capsys, *explain[:-1], "malware", "--json")
    assert code == 0
    verdict = json.loads(out)["verdicts"][0]
    assert verdict["allowed"]
    assert verdict["grant"] == gid

    # The same file again is a replay; nothing is appended.
    size = log_size(broker)
    code, _, err = run(capsys, "broker", "statement", "add", "--dir", d, str(g))
    assert code == 1
    assert "replayed statement" in err
    assert log_size(broker) == size

    r, _ = statement(capsys, tmp_path, "revoke", "FRA", "--statement", gid)
    assert run(capsys, "broker", "statement", "add", "--dir", d, str(r))[0] == 0
    assert run(capsys, *explain[:-1], "malware")[0] == 3
    # A relay logged before the revoke is replayed against the policy of the log up to it: --log-size gives that
    # policy (a review: `--at` alone decided with today's, and contradicted the audit about that moment).
    code, out, _ = run(capsys, *explain[:-1], "malware", "--log-size", str(size), "--json")
    assert code == 0
    assert json.loads(out)["log_size"] == size
    code, _, err = run(capsys, *explain[:-1], "malware", "--log-size", str(size + 5))
    assert code == 2
    assert f"--log-size {size + 5} is not within the log, which holds {size + 1} entries" in err

    code, out, _ = run(capsys, "policy", "show", "--dir", d, "--json")
    facts = json.loads(out)
    statuses = {s["id"]: s["status"] for s in facts["statements"]}
    assert statuses[gid] == "revoked"
    assert [m["id"] for m in facts["members"]] == ["ACME", "DEU", "FRA"]
    code, out, _ = run(capsys, "policy", "show", "--dir", d)
    assert code == 0
    assert f"{gid}  grant  FRA -> DEU  up to AMBER, malware,phishing  [revoked]" in out
    # Each member's witness key, for quorum policies: no command gave it, so witnessing could not be set up.
    fra = next(m for m in facts["members"] if m["id"] == "FRA")
    verifier = cosignature.parse_vkey(fra["witness_key"])
    assert verifier.name == "FRA"
    assert verifier.public == bytes.fromhex(fra["sign_key"])
    assert f"  witness FRA {fra['witness_key']}" in out


def test_tampered_or_foreign_statements_are_refused_all_or_none(
    broker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(broker)
    good, _ = statement(capsys, tmp_path, "grant", "FRA", "--to", "DEU", "--tlp", "GREEN")
    bad = tmp_path / "bad.stmt"
    data = bytearray(good.read_bytes())
    data[-10] ^= 1  # a bit of the signature (the map ends with "t": "stmt", 7 bytes)
    bad.write_bytes(bytes(data))
    other, _ = statement(capsys, tmp_path, "grant", "FRA", "--to", "DEU", "--tlp", "CLEAR")
    size = log_size(broker)
    code, _, err = run(capsys, "broker", "statement", "add", "--dir", d, str(other), str(bad))
    assert code == 1
    assert "signature does not verify under the identity key of FRA" in err
    assert log_size(broker) == size  # the good one was not appended either
    foreign = tmp_path / "foreign.stmt"
    code, _, _ = run(
        capsys, "policy", "grant", "--identity", str(tmp_path / "keys" / "FRA"), "--origin", "other.example/log",
        "--to", "DEU", "--tlp", "GREEN", "-o", str(foreign),
    )  # fmt: skip
    assert code == 0
    code, _, err = run(capsys, "broker", "statement", "add", "--dir", d, str(foreign))
    assert code == 1
    assert "is for log 'other.example/log'" in err
    assert run(capsys, "broker", "statement", "add", "--dir", d, str(other))[0] == 0

    # Signing offline cannot know the directory; the broker refuses a grant to a member that does not exist.
    ghost, _ = statement(capsys, tmp_path, "grant", "FRA", "--to", "XXX", "--tlp", "GREEN")
    code, _, err = run(capsys, "broker", "statement", "add", "--dir", d, str(ghost))
    assert code == 1
    assert "XXX is not a member" in err


def test_operator_commands(broker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(broker)
    assert run(capsys, "broker", "group", "create", "--dir", d, "--name", "europe")[0] == 0
    for m in ("DEU", "ACME"):
        assert run(capsys, "broker", "group", "add", "--dir", d, "--name", "europe", "--id", m)[0] == 0
    code, _, err = run(capsys, "broker", "group", "add", "--dir", d, "--name", "europe", "--id", "DEU")
    assert code == 1
    assert "already in group europe" in err
    code, out, _ = run(
        capsys, "broker", "group", "create", "--dir", d, "--name", "TRIDENT",
        "--start", "2026-01-01", "--end", "2026-02-01T00:00:00Z",
    )  # fmt: skip
    assert code == 0
    assert "created operation group TRIDENT" in out

    g, _ = statement(capsys, tmp_path, "grant", "FRA", "--to", "group:europe", "--tlp", "RED")
    a1, _ = statement(capsys, tmp_path, "accept", "DEU", "--from", "FRA", "--tlp", "RED")
    a2, _ = statement(capsys, tmp_path, "accept", "ACME", "--from", "FRA", "--tlp", "RED")
    assert run(capsys, "broker", "statement", "add", "--dir", d, str(g), str(a1), str(a2))[0] == 0

    base = ("policy", "explain", "--dir", d, "--from", "FRA", "--to", "DEU,ACME")
    assert run(capsys, *base, "--tlp", "AMBER", "--category", "political")[0] == 0
    code, out, _ = run(capsys, *base, "--tlp", "AMBER+STRICT")
    assert code == 3
    assert "FRA -> DEU: allow" in out
    assert "never goes to a partner (ACME) through a group grant" in out
    assert "TLP:RED needs a grant that names DEU individually" in run(capsys, *base, "--tlp", "RED")[1]
    # A mistyped label is a usage error (exit 2), not a denial (exit 3); a group stands for its members.
    code, _, err = run(capsys, *base, "--tlp", "green")
    assert code == 2
    assert "'green' is not" in err
    assert run(capsys, *base, "--tlp", "AMBER", "--category", "Malware!")[0] == 2
    code, out, _ = run(
        capsys, "policy", "explain", "--dir", d, "--from", "FRA", "--to", "group:europe", "--tlp", "GREEN"
    )
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines()] == ["FRA -> ACME", "FRA -> DEU"]
    code, _, err = run(capsys, "policy", "explain", "--dir", d, "--from", "FRA", "--to", "group:nope", "--tlp", "GREEN")
    assert (code, "there is no group 'nope' in the directory" in err) == (2, True)

    code, out, _ = run(capsys, "policy", "matrix", "--dir", d, "--json")
    chans = {(c["from"], c["to"]): c["tlp"] for c in json.loads(out)["channels"]}
    assert chans == {("FRA", "DEU"): "AMBER+STRICT", ("FRA", "ACME"): "AMBER"}
    assert "FRA -> ACME  up to AMBER: any category" in run(capsys, "policy", "matrix", "--dir", d)[1]

    assert run(capsys, "broker", "rule", "ban-category", "--dir", d, "--category", "political")[0] == 0
    code, out, _ = run(capsys, *base, "--tlp", "AMBER", "--category", "political")
    assert code == 3
    assert "category 'political' is banned by operator rule" in out

    assert run(capsys, "broker", "member", "suspend", "--dir", d, "--id", "DEU", "--reason", "audit")[0] == 0
    code, out, _ = run(capsys, *base, "--tlp", "GREEN")
    assert code == 3
    assert "DEU is suspended (audit)" in out
    assert run(capsys, "broker", "member", "reinstate", "--dir", d, "--id", "DEU")[0] == 0
    assert run(capsys, *base, "--tlp", "GREEN")[0] == 0
    assert run(capsys, "broker", "member", "remove", "--dir", d, "--id", "ACME", "--reason", "contract ended")[0] == 0
    assert run(capsys, *base, "--tlp", "GREEN")[0] == 3

    code, _, err = run(capsys, "broker", "member", "suspend", "--dir", d, "--id", "XXX", "--reason", "r")
    assert code == 1
    assert "XXX is not a member" in err
    code, _, err = run(capsys, "broker", "rule", "ban-category", "--dir", d, "--category", "Not Valid")
    assert code == 1
    assert "is not valid" in err

    # The whole log still folds from scratch: every appended record replays.
    code, out, _ = run(capsys, "policy", "show", "--dir", d, "--json", "--verify")
    facts = json.loads(out)
    assert facts["rules"][0]["value"] == "political"
    assert {m["id"]: m["status"] for m in facts["members"]} == {"ACME": "removed", "DEU": "active", "FRA": "active"}


def test_an_operator_lifts_a_mistaken_rule(broker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(broker)
    g, _ = statement(capsys, tmp_path, "grant", "FRA", "--to", "DEU", "--tlp", "AMBER")
    a, _ = statement(capsys, tmp_path, "accept", "DEU", "--from", "FRA", "--tlp", "AMBER")
    assert run(capsys, "broker", "statement", "add", "--dir", d, str(g), str(a))[0] == 0
    explain = ("policy", "explain", "--dir", d, "--from", "FRA", "--to", "DEU", "--tlp", "GREEN", "--size", "500")
    assert run(capsys, *explain)[0] == 0

    code, out, _ = run(capsys, "broker", "rule", "max-size", "--dir", d, "--bytes", "10")  # meant 10 MB
    assert code == 0
    assert f"to lift it: valise broker rule lift --dir {d} --id " in out
    rule_id = out.rsplit("--id ", 1)[1].strip()
    code, out, _ = run(capsys, "broker", "rule", "ban-category", "--dir", d, "--category", "political", "--json")
    ban = json.loads(out)
    size = log_size(broker)
    code, _, err = run(capsys, "broker", "rule", "ban-category", "--dir", d, "--category", "political")
    assert code == 2  # a second copy would make lifting the first change nothing
    assert f"operator rule {ban['record'][:16]} (ban-category political) is already in force" in err
    assert log_size(broker) == size
    assert (ban["type"], ban["kind"], ban["index"]) == ("rule", "ban-category", log_size(broker) - 1)
    assert run(capsys, *explain)[0] == 3

    for unsafe in ("", "  ", rule_id[:7], "not-hex!"):  # an unset shell variable must not lift the only rule
        code, _, err = run(capsys, "broker", "rule", "lift", "--dir", d, "--id", unsafe)
        assert code == 2
        assert "give at least 8 hex digits of the id" in err
    code, _, err = run(capsys, "broker", "rule", "lift", "--dir", d, "--id", "ffffffff")
    assert code == 2
    assert "matches no rule in force" in err
    assert rule_id in err  # the error lists the rules one may lift
    size = log_size(broker)
    code, out, _ = run(capsys, "broker", "rule", "lift", "--dir", d, "--id", rule_id[:8] + "…", "--json")  # as shown
    lifted = json.loads(out)
    assert (lifted["kind"], lifted["index"]) == ("lift", size)
    assert lifted["done"] == "lifted operator rule " + rule_id + " (max-size 10)"
    assert run(capsys, *explain)[0] == 0  # the members' consent decides again
    code, _, err = run(capsys, "broker", "rule", "lift", "--dir", d, "--id", rule_id)
    assert code == 2
    assert f"operator rule {rule_id} was already lifted (log index {size})" in err
    assert log_size(broker) == size + 1

    code, out, _ = run(capsys, "policy", "show", "--dir", d, "--json", "--verify")
    facts = json.loads(out)
    assert [r["id"] for r in facts["rules"]] == [ban["record"]]
    assert [(r["id"][:16], r["lifted_at"]) for r in facts["lifted_rules"]] == [(rule_id, size)]
    assert "rules in force (1; 1 lifted):" in run(capsys, "policy", "show", "--dir", d)[1]
    code, out, _ = run(capsys, *explain[:-4], "--tlp", "GREEN", "--category", "political")
    assert code == 3
    assert "category 'political' is banned by operator rule" in out


def test_operator_commands_report_as_json(broker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(broker)
    size = log_size(broker)
    code, out, _ = run(capsys, "broker", "member", "suspend", "--dir", d, "--id", "DEU", "--reason", "audit", "--json")
    assert code == 0
    got = json.loads(out)
    assert (got["type"], got["kind"], got["index"], got["done"]) == ("dir", "member-suspend", size, "suspended DEU")
    assert len(bytes.fromhex(got["record"])) == 32
    g, gid = statement(capsys, tmp_path, "grant", "FRA", "--to", "ACME", "--tlp", "GREEN")
    a, aid = statement(capsys, tmp_path, "accept", "ACME", "--from", "FRA", "--tlp", "GREEN")
    code, out, _ = run(capsys, "broker", "statement", "add", "--dir", d, str(g), str(a), "--json")
    assert code == 0
    added = json.loads(out)["added"]
    assert [(x["record"], x["kind"], x["author"], x["index"]) for x in added] == [
        (gid, "grant", "FRA", size + 1),
        (aid, "accept", "ACME", size + 2),
    ]


def test_the_operator_key_can_be_sealed_and_kept_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running broker never needs the operator key: it can live under a passphrase, off the broker's disk."""
    d = tmp_path / "broker"
    monkeypatch.setenv("OPERATOR_PW", "correct horse")
    init = ("broker", "init", "--dir", str(d), "--origin", ORIGIN, "--operator-passphrase-env", "OPERATOR_PW")
    assert run(capsys, *init)[0] == 0
    assert b"correct horse" not in BrokerHome(d).operator_key_path.read_bytes()
    assert main(["keygen", "--id", "FRA", "--out", str(tmp_path / "keys" / "FRA")]) == 0
    add = ("broker", "member", "add", "--dir", str(d), "--bundle", str(tmp_path / "keys" / "FRA" / "FRA.pub"))
    add += ("--kind", "country", "--region", "europe")
    size = log_size(d)

    code, _, err = run(capsys, *add)
    assert code == 1
    assert "operator key" in err
    assert "is encrypted" in err
    assert "--passphrase-env" in err
    monkeypatch.setenv("WRONG_PW", "incorrect horse")
    code, _, err = run(capsys, *add, "--passphrase-env", "WRONG_PW")
    assert code == 1
    assert "the passphrase does not open operator key" in err
    assert log_size(d) == size  # nothing was appended

    offline = tmp_path / "offline" / "operator.key"
    offline.parent.mkdir()
    BrokerHome(d).operator_key_path.rename(offline)
    code, _, err = run(capsys, *add, "--passphrase-env", "OPERATOR_PW")
    assert code == 1
    assert "cannot read operator key" in err
    assert "--operator-key FILE" in err
    code, out, _ = run(capsys, *add, "--operator-key", str(offline), "--passphrase-env", "OPERATOR_PW", "--json")
    assert code == 0
    assert json.loads(out)["index"] == size

    code, out, _ = run(
        capsys, "broker", "rule", "max-size", "--dir", str(d), "--bytes", "10",
        "--operator-key", str(offline), "--passphrase-env", "OPERATOR_PW",
    )  # fmt: skip
    assert code == 0
    lift = shlex.split(out.rsplit("to lift it: ", 1)[1])
    assert lift[:4] == ["valise", "broker", "rule", "lift"]
    assert run(capsys, *lift[1:])[0] == 0  # the printed command works as it is
    size += 2

    # Another broker's operator key is not this log's, whatever its passphrase.
    other = tmp_path / "other"
    assert run(capsys, "broker", "init", "--dir", str(other), "--origin", ORIGIN)[0] == 0
    code, _, err = run(
        capsys, "broker", "rule", "max-tlp", "--dir", str(d), "--tlp", "AMBER",
        "--operator-key", str(BrokerHome(other).operator_key_path),
    )  # fmt: skip
    assert code == 1
    assert "is not the operator key named in the log's genesis record" in err
    assert log_size(d) == size + 1

    # A member's identity key given by mistake is named as such, not as a damaged file.
    code, _, err = run(
        capsys, "broker", "rule", "max-tlp", "--dir", str(d), "--tlp", "AMBER",
        "--operator-key", str(tmp_path / "keys" / "FRA" / "FRA.key"),
    )  # fmt: skip
    assert code == 1
    assert "FRA.key is FRA's identity key, not the operator key" in err


def test_member_add_refuses_a_second_admission(
    broker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = str(tmp_path / "keys" / "FRA" / "FRA.pub")
    code, _, err = run(
        capsys, "broker", "member", "add", "--dir", str(broker), "--bundle", bundle, "--kind", "desk", "--region", "x"
    )
    assert code == 1
    assert "FRA is already in the directory" in err


def test_bad_arguments(broker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = str(tmp_path / "keys" / "FRA")
    out = str(tmp_path / "x.stmt")
    code, _, err = run(
        capsys, "policy", "grant", "--identity", keys, "--origin", ORIGIN, "--to", "DEU", "--tlp", "PINK", "-o", out
    )
    assert code == 2
    assert "TLP level 'PINK' is not valid" in err
    code, _, err = run(
        capsys, "policy", "revoke", "--identity", keys, "--origin", ORIGIN, "--statement", "abc", "-o", out
    )
    assert code == 2
    assert "not 64 hex digits" in err
    code, _, err = run(capsys, "policy", "show", "--dir", str(tmp_path / "nowhere"))
    assert code == 1
    assert "is not a broker directory" in err


def test_an_offline_statement_reports_as_json(broker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.stmt"
    keys = str(tmp_path / "keys" / "FRA")
    argv = ("policy", "grant", "--identity", keys, "--origin", ORIGIN, "--to", "DEU", "--tlp", "GREEN", "-o", str(out))
    code, text, _ = run(capsys, *argv, "--json")
    assert code == 0
    got = json.loads(text)
    assert (got["kind"], got["author"], got["file"]) == ("grant", "FRA", str(out))
    assert got["statement"] == records.parse_policy(out.read_bytes()).id.hex()


def test_mistakes_that_would_be_logged_for_good_are_refused_first(
    broker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(broker)
    size = log_size(broker)
    keys = str(tmp_path / "keys" / "FRA")
    code, _, err = run(
        capsys, "policy", "grant", "--identity", keys, "--origin", ORIGIN, "--to", "DEU", "--tlp", "GREEN",
        "--until", "2020-01-01", "-o", str(tmp_path / "late.stmt"),
    )  # fmt: skip
    assert code == 2
    assert "--until 2020-01-01T00:00:00Z has passed: the statement would never be in force" in err
    code, _, err = run(capsys, "broker", "rule", "max-tlp", "--dir", d, "--tlp", "RED")
    assert (code, "max-tlp RED restricts nothing" in err) == (2, True)
    assert main(["keygen", "--id", "fra", "--out", str(tmp_path / "keys" / "fra-lower")]) == 0
    add = ("broker", "member", "add", "--dir", d, "--bundle", str(tmp_path / "keys" / "fra-lower" / "fra.pub"))
    code, _, err = run(capsys, *add, "--kind", "country", "--region", "europe")
    assert (code, "fra differs from member FRA only by case" in err) == (2, True)
    assert log_size(broker) == size
    code, _, err = run(capsys, "broker", "init", "--dir", str(tmp_path / "b2"), "--origin", "https://x.example/log")
    assert (code, "has a scheme" in err) == (2, True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1767225600", 1767225600),  # Unix seconds
        ("2026-01-01", 1767225600),  # ISO 8601, UTC unless it says otherwise
        ("20260101", 1767225600),  # ISO 8601's basic form: a date, not 1970 (a review found it read as seconds)
        ("2026-01-01T02:00:00+02:00", 1767225600),
    ],
)
def test_times_on_the_command_line_are_unix_seconds_or_iso_8601(text: str, expected: int) -> None:
    from valise.cli.policy import parse_time

    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["2026", "12345", "yesterday"])
def test_a_time_that_is_neither_is_refused(text: str) -> None:
    import argparse

    from valise.cli.policy import parse_time

    with pytest.raises(argparse.ArgumentTypeError, match="neither Unix seconds nor an ISO 8601 time"):
        parse_time(text)


@pytest.mark.parametrize("text", ["9223372036854775808", "253402300800", "1969-12-31T23:59:59Z"])
def test_a_time_outside_1970_to_9999_is_refused_by_name(text: str) -> None:
    """A review: `erase --before 9223372036854775808` ended in an OverflowError traceback from SQLite."""
    import argparse

    from valise.cli.policy import parse_time

    with pytest.raises(argparse.ArgumentTypeError, match="is not a time between 1970 and the year 9999"):
        parse_time(text)


def test_erase_before_a_time_past_9999_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        main(["erase", "--node", str(tmp_path), "--before", "9223372036854775808", "--dry-run"])
    assert exited.value.code == 2
    assert "'9223372036854775808' is not a time between 1970 and the year 9999" in capsys.readouterr().err


def test_broker_serve_takes_a_clock_window_within_a_minute_and_a_day(capsys: pytest.CaptureFixture[str]) -> None:
    """A packet whose upload takes longer than the broker's window cannot be taken (the node says so): an operator
    whose members upload large packets on slow links widens it, and auditors use the same."""
    from valise.cli.broker_serve import settings_of
    from valise.cli.main import build_parser

    args = build_parser().parse_args(["broker", "serve", "--dir", "b", "--window", "3600"])
    assert settings_of(args).window == 3600
    assert settings_of(build_parser().parse_args(["broker", "serve", "--dir", "b"])).window == 600
    for bad, why in (("59", "59 s is not between 60 s and a day"), ("ten", "'ten' is not a number of seconds")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["broker", "serve", "--dir", "b", "--window", bad])
        assert why in capsys.readouterr().err
