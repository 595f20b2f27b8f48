"""`valise broker serve`: run the broker daemon in the foreground."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from valise import keyfiles
from valise.broker import relay
from valise.broker.daemon import Settings, serve_forever
from valise.broker.home import BrokerHome
from valise.cli.main import group
from valise.node.home import parse_address


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = group(sub, "broker", "create and administer a broker")
    p = broker.add_parser("serve", help="run the broker: mutual-TLS relay for members, log tiles over HTTP")
    p.add_argument("--dir", required=True, type=Path, help="the broker directory (from valise broker init)")
    p.add_argument("--listen", default="127.0.0.1:7443", help="HOST:PORT for member connections (default %(default)s)")
    p.add_argument("--http", default=None, help="HOST:PORT to serve the log's tiles (C2SP tlog-tiles) over HTTP")
    p.add_argument(
        "--serve-entries",
        action="store_true",
        help="also serve entry bundles over --http (every record in full, who sent what to whom): "
        "only on an address that just auditors reach",
    )
    p.add_argument("--checkpoint-interval", type=float, default=1.0, help="seconds between checkpoints")
    p.add_argument(
        "--window",
        type=_window,
        default=relay.DEFAULT_WINDOW,
        metavar="SECONDS",
        help="how far a packet's `created` may be from this broker's clock (default %(default)s); a packet whose "
        "upload takes longer cannot be taken. Auditors must use the same: valise audit verify --window",
    )
    p.add_argument(
        "--rebuild-mailboxes",
        action="store_true",
        help="start although mailbox.db is missing or empty and the log holds traffic: rebuild the delivery "
        "queues from the log (small packets not yet delivered are lost with the old file)",
    )
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="the passphrase of the broker's identity and log keys, in $VAR (if broker init sealed them)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection and decision")
    p.set_defaults(handler=serve)


def _window(text: str) -> int:
    """A clock window in seconds: at least a minute (clocks are never closer, and a node needs time to upload),
    at most a day (the window bounds the `at` the broker may choose, so what an audit can tell)."""
    try:
        seconds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 60 <= seconds <= 86_400:
        raise argparse.ArgumentTypeError(f"{seconds} s is not between 60 s and a day")
    return seconds


def settings_of(args: argparse.Namespace) -> Settings:
    """The daemon's settings from `broker serve`'s arguments."""
    return Settings(
        listen=parse_address(args.listen, listen=True),
        http=parse_address(args.http, listen=True) if args.http else None,
        checkpoint_interval=args.checkpoint_interval,
        window=args.window,
        serve_entries=args.serve_entries,
        rebuild_mailboxes=args.rebuild_mailboxes,
    )


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    home = BrokerHome.open(args.dir)
    serve_forever(home, settings_of(args), keyfiles.passphrase_from_env(args.passphrase_env))
    return 0
