"""`valise broker init|info` and `valise log export`: the broker's durable transparency log (work in progress)."""

from __future__ import annotations

import argparse

from valise.cli.main import group


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group(sub, "broker", "run and administer a broker")
    group(sub, "log", "the broker's transparency log")
