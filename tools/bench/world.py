"""A broker directory with N members who all consent to each other (through one group, so the log holds 3N+2
records rather than N² pairs), and every member's identity saved on disk as `valise keygen` writes it.

The broker directory is made by `valise broker init` (the real CLI, in process); the members are admitted by
operator-signed `member-add` records and the consent is members' own signed grant/accept statements, appended
directly to the broker's log before it starts: the records `valise broker member add` and `valise policy
grant|accept` would write, without a process start per member (196 members would take a minute that way).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from valise import identity, keyfiles
from valise.broker.home import BrokerHome
from valise.cli.main import main as cli
from valise.policy import records as prec
from valise.store.sqlite import SqliteLog

ORIGIN = "bench.valise/log"
GROUP = "all"


def name_of(i: int) -> str:
    return f"N{i:03d}"


@dataclass
class World:
    root: Path
    template: Path  # the broker directory; each configuration copies it
    keys: Path  # one directory per member (keygen layout), in member order
    members: list[identity.Identity]
    vkey: str  # the log's verifier key (for `valise node init --log-key`)
    broker_pub: Path


def _cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(list(args))
    if code != 0:
        raise SystemExit(f"`valise {' '.join(args)}` exited {code}")
    return out.getvalue()


def make_world(root: Path, n: int) -> World:
    template = root / "template"
    _cli("broker", "init", "--dir", str(template), "--origin", ORIGIN)
    info = json.loads(_cli("broker", "info", "--dir", str(template), "--json").strip().splitlines()[-1])
    home = BrokerHome.open(template)
    op = home.operator_key()
    now = int(time.time())
    seq = 0

    def operator(op_name: str, **fields: object) -> bytes:
        nonlocal seq
        seq += 1
        return prec.dir_record(op, ORIGIN, seq, now, op_name, **fields)

    members, entries = [], []
    entries.append(operator("group-create", name=GROUP, kind="region", start=None, end=None))
    for i in range(n):
        ident = identity.generate(name_of(i), os.urandom, now)
        keyfiles.save_identity(root / "keys" / name_of(i), ident, None)
        members.append(ident)
        fields = {"id": name_of(i), "kind": "country", "name": f"{name_of(i)} bureau", "region": "europe"}
        entries.append(operator("member-add", **fields, bundle=ident.bundle.raw))
        entries.append(operator("group-add", name=GROUP, id=name_of(i)))
    for m in members:
        g = f"group:{GROUP}"
        entries.append(prec.grant(m.signing, origin=ORIGIN, author=m.member_id, created=now, to=g, tlp="AMBER"))
        entries.append(prec.accept(m.signing, origin=ORIGIN, author=m.member_id, created=now, source=g, tlp="AMBER"))
    with SqliteLog.open(home.db_path) as store:
        store.append(entries)
    return World(root, template, root / "keys", members, info["vkey"], Path(info["broker_pub"]))
