"""`valise broker init`, `valise broker info` and `valise log export`: the broker's home and its log."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from valise import keyfiles
from valise.broker.home import BrokerHome
from valise.cli.main import group
from valise.errors import NoteError
from valise.genesis import Genesis
from valise.logservice import LogService
from valise.store.export import export_tiles
from valise.store.sqlite import SqliteLog
from valise.tlog import note

DEFAULT_BROKER_ID = "broker"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = group(sub, "broker", "create and administer a broker")
    p = broker.add_parser("init", help="create a broker directory: identity, operator and log keys, the log")
    p.add_argument("--dir", required=True, type=Path, help="the broker directory to create")
    p.add_argument("--origin", required=True, help="the log's origin (checkpoint key name), e.g. valise.example/log")
    p.add_argument("--id", dest="broker_id", default=DEFAULT_BROKER_ID, help="the broker's member id")
    p.add_argument(
        "--operator-passphrase-env",
        metavar="VAR",
        help="seal the operator key under the passphrase in $VAR (operator commands then need it)",
    )
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="seal the broker's identity and log keys under the passphrase in $VAR (broker serve then needs it; "
        "operator commands append and leave the checkpoint to the running broker)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=init)

    p = broker.add_parser("info", help="print the broker's origin, log size and checkpoint verifier key")
    p.add_argument("--dir", required=True, type=Path, help="the broker directory")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=info)

    log = group(sub, "log", "the broker's transparency log")
    p = log.add_parser(
        "export",
        help="write the log as C2SP tlog-tiles files (checkpoint, tile/...) to a directory, for auditors: its "
        "entry bundles say who sent what to whom",
    )
    p.add_argument("--dir", required=True, type=Path, help="the broker directory")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="directory to write: static files an auditors-only web server can serve (never a public one)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=export)


def _service(home: BrokerHome, passphrase: bytes | None = None) -> LogService:
    return home.log_service(SqliteLog.open(home.db_path), passphrase)


def _describe(home: BrokerHome, log: LogService) -> dict[str, object]:
    cfg = home.config()
    latest = log.latest
    return {
        "dir": str(home.root),
        "origin": cfg.origin,
        "broker_id": cfg.broker_id,
        "log_size": log.store.size(),
        "checkpoint_size": None if latest is None else latest.size,
        "vkey": log.verifier.vkey(),
        "log_vkey": str(home.log_vkey_path) if home.log_vkey_path.exists() else None,
        "broker_pub": str(home.broker_bundle_path),
        "keys_sealed": home.log_key_sealed(),  # then `broker serve` needs --passphrase-env
    }


def _print(facts: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(facts))
    else:
        width = max(len(k) for k in facts)
        for k, v in facts.items():
            print(f"{k:<{width}}  {v}")


def init(args: argparse.Namespace) -> int:
    now = time.time()
    operator_passphrase = keyfiles.passphrase_from_env(args.operator_passphrase_env)
    passphrase = keyfiles.passphrase_from_env(args.passphrase_env)
    home = BrokerHome.create(
        args.dir, args.origin, args.broker_id, os.urandom, int(now), operator_passphrase, passphrase
    )
    log = _service(home, passphrase)
    try:
        # Entry 0 names the operator key and the broker, so the log key is the only key anyone must pin.
        first = Genesis(args.origin, home.operator_key(passphrase=operator_passphrase).public, home.broker_bundle())
        log.append_and_sign([first.entry()], now)
        _print(_describe(home, log), args.json)
    finally:
        log.store.close()
    if not args.json:
        unlock = f" --passphrase-env {args.passphrase_env}" if passphrase is not None else ""
        print(f"start it with: valise broker serve --dir {args.dir}{unlock}")
    return 0


def info(args: argparse.Namespace) -> int:
    home = BrokerHome.open(args.dir)
    log = _service(home)
    try:
        _print(_describe(home, log), args.json)
    finally:
        log.store.close()
    return 0


def _cosigned(home: BrokerHome, signed: bytes) -> bytes:
    """The running broker's cosigned copy of checkpoint `signed`, if it has one (same text: same tree), else
    `signed`: an auditor's quorum of witnesses can only be checked on the cosigned note."""
    try:
        cosigned = home.cosigned_path.read_bytes()
        if note.parse_note(cosigned).text == note.parse_note(signed).text:
            return cosigned
    except (OSError, NoteError):
        pass  # none yet, or unreadable: the log's own signature is still a valid checkpoint
    return signed


def export(args: argparse.Namespace) -> int:
    home = BrokerHome.open(args.dir)
    log = _service(home)
    try:
        latest = log.latest or log.sign()
        done = export_tiles(args.out, _cosigned(home, latest.note), log.tile, origin=log.origin)
    finally:
        log.store.close()
    _print({"out": str(args.out), "size": done.size, "files_written": done.written}, args.json)
    return 0
