"""`valise broker init|info|status` and `valise log export`: the broker's home and its log."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from valise import keyfiles
from valise.broker import status as broker_status
from valise.broker.home import BrokerHome
from valise.cli.main import group
from valise.cli.text import shown
from valise.errors import NoteError
from valise.genesis import Genesis
from valise.logservice import LogService
from valise.store.export import export_tiles
from valise.store.sqlite import SqliteLog
from valise.tlog import note
from valise.utctime import utc

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

    p = broker.add_parser(
        "status",
        help="whether the broker runs; the log, its checkpoint and the delivery queues (what waits for whom, since "
        "when); orphans, spool and free disk",
    )
    p.add_argument("--dir", required=True, type=Path, help="the broker directory")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=status)

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


def status(args: argparse.Namespace) -> int:
    """Exit 0 if the broker runs and nothing is wrong, 3 otherwise (the report says what), for scripts."""
    facts = broker_status.status(BrokerHome.open(args.dir))
    if args.json:
        print(json.dumps(facts))
    else:
        print(_status_text(facts))
    return 0 if facts["running"] and not facts["problems"] else 3


def _status_text(f: dict[str, Any]) -> str:
    state = "running" if f["running"] else f"not running (start it: valise broker serve --dir {f['dir']} ...)"
    lines = [f"broker      {state}; origin {f['origin']}"]
    lines.append(f"log         {f['log_size']} entries, checkpoint {f['checkpoint_size']}")
    behind = f["queues_behind"]
    lines.append(
        "queues      " + ("up to date with the log" if not behind else f"{behind} log entries not taken in yet")
    )
    for member, q in f["queues"].items():
        oldest = f", oldest {utc(q['oldest'])}" if q["oldest"] is not None else ""
        waiting = f"{q['packets']} packet(s), {_size(q['bytes'])}{oldest}; {q['notices']} notice(s)"
        lines.append(f"  {shown(member):<10} {waiting}")
    lines.append(f"orphans     {f['orphans']}")
    lines.append(f"spool       {f['spool']['files']} file(s), {_size(f['spool']['bytes'])}")
    disk = f["disk"]
    lines.append(f"disk        {_size(disk['free'])} free of {_size(disk['total'])}")
    lines += [f"PROBLEM     {p}" for p in f["problems"]]
    return "\n".join(lines)


def _size(n: int) -> str:
    """Bytes as a person reads them (1023 bytes, 4.0 KiB, 1.5 GiB)."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


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
