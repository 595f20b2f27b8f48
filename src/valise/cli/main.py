"""Entry point of the `valise` command.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its commands with a `handler`
default: `handler(args) -> int` (the exit code). A valise `Error` becomes one line on stderr and the error's
exit code; a traceback is only ever shown for a bug.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from valise import __version__
from valise.cli.text import shown
from valise.errors import Error

COMMAND_MODULES = [
    "valise.cli.demo",
    "valise.cli.keys",
    "valise.cli.packet",
    "valise.cli.broker_log",
    "valise.cli.broker_serve",
    "valise.cli.policy",
    "valise.cli.node",
    "valise.cli.audit",
]

# Attribute under which group() keeps a top-level command's sub-subparsers on that command's parser.
_GROUP_ATTR = "_valise_group"


def group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The sub-subcommands of top-level command `name` (e.g. `broker`), creating `name` on first use.

    Several modules add commands under one group (`valise broker init` and `valise broker member add` live in
    different modules); argparse refuses a second `add_parser("broker")`, so every module goes through here.
    The first caller's `help` is kept. `valise NAME` alone prints the group's help and exits with 2.
    """
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help, description=help)
    cached: argparse._SubParsersAction[argparse.ArgumentParser] | None = getattr(parser, _GROUP_ATTR, None)
    if cached is None:
        cached = parser.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")
        usage = parser

        def show_help(args: argparse.Namespace) -> int:
            usage.print_help()
            return 2

        parser.set_defaults(handler=show_help)
        setattr(parser, _GROUP_ATTR, cached)
    return cached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="valise",
        description="valise: signed, end-to-end encrypted exchange through a neutral broker with a witnessed log.",
    )
    parser.add_argument("--version", action="version", version=f"valise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    # With --json a script also gets a failure where it reads the result: on stdout, as the one JSON value there
    # ({"ok": false, "error", "code"}, the shape `send --json` answers a refusal with), so that success and failure
    # parse alike; on stderr when stdout carries a payload (`-o -`), where the result's JSON goes too.
    report = None
    if getattr(args, "json", False):
        report = sys.stderr if getattr(args, "output", None) == "-" else sys.stdout
    try:
        code: int = handler(args)
    except BaseExceptionGroup as group:  # from a daemon's nursery: one failure, usually, wrapped by trio
        return _failed(_first(group), group, report)
    except (Error, KeyboardInterrupt, OSError) as exc:
        return _failed(exc, exc, report)
    return code


def _failed(exc: BaseException, original: BaseException, report: TextIO | None = None) -> int:
    """Report a failure the user can act on in one line (and as JSON on `report`); anything else is a bug, and
    keeps its traceback."""
    if isinstance(exc, Error):
        print(f"valise: error: {shown(exc)}", file=sys.stderr)
        if report is not None:
            print(json.dumps({"ok": False, "error": str(exc), "code": exc.exit_code}), file=report)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        print("valise: interrupted", file=sys.stderr)
        return 130
    if isinstance(exc, BrokenPipeError):
        return 1
    if isinstance(exc, OSError):
        # A port in use, a directory that does not exist or cannot be written: the system's words, and the path.
        if exc.filename is not None and exc.strerror:
            what = f"{exc.strerror}: {exc.filename}"
        else:  # e.g. trio's "error while attempting to bind on address (...): address already in use"
            what = str(exc).removeprefix(f"[Errno {exc.errno}] ")
        print(f"valise: error: {shown(what)}", file=sys.stderr)
        if report is not None:
            print(json.dumps({"ok": False, "error": what, "code": 1}), file=report)
        return 1
    raise original


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
