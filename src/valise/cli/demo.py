"""`valise demo`: the whole system on this machine, in a minute."""

from __future__ import annotations

import argparse
from pathlib import Path

from valise import demo


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="run a broker and four member nodes on 127.0.0.1 and walk through sending, denial, audit"
    )
    p.add_argument("--dir", type=Path, help="keep all state here (a new or empty directory) instead of a temp dir")
    p.add_argument("--json", action="store_true", help="print only a JSON summary")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return demo.run(args.dir, args.json)
