"""`valise seal`, `valise open`, `valise inspect`: packets offline (sneakernet, scripting), like age.

This is an I/O edge: it reads the clock and the OS randomness and hands them to the pure packet core. Seal
needs a seekable output (the header is rewritten once the ciphertext hash is known) and the payload size up
front, so stdin input and stdout output are spooled through a temporary file. Open writes to a temporary file
next to the output and renames it only once the whole packet verified; to stdout it streams (only chunks
that authenticated are written, but a failure later means the output is incomplete: the exit code says so).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from valise import identity, keyfiles, packet
from valise.errors import UsageError
from valise.labels import Labels
from valise.utctime import utc


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("seal", help="seal a payload into a signed, encrypted packet")
    p.add_argument("--identity", required=True, type=Path, help="directory of the sender's identity")
    p.add_argument("--to", required=True, help="comma-separated public bundle files of the recipients")
    p.add_argument("--tlp", required=True, help="CLEAR, GREEN, AMBER, AMBER+STRICT or RED")
    p.add_argument("--category", default="", help="comma-separated categories (lower-case words)")
    p.add_argument("--operation", help="operation name")
    p.add_argument("--content-type", help="media type (default: STIX 2.1 if the payload is a bundle, else bytes)")
    p.add_argument("--expires", help="expiry, ISO 8601 with a time zone (default: 30 days)")
    p.add_argument("--passphrase-env", metavar="VAR", help="passphrase of the identity is in $VAR")
    p.add_argument("input", help="payload file, or - for stdin")
    p.add_argument("-o", "--output", required=True, help="packet file, or - for stdout")
    p.add_argument("--json", action="store_true", help="print what was sealed as JSON (not with -o -)")
    p.set_defaults(handler=seal)

    p = sub.add_parser("open", help="verify and decrypt a packet addressed to you")
    p.add_argument("--identity", required=True, type=Path, help="directory of your identity")
    p.add_argument("--from", required=True, dest="sender", type=Path, help="public bundle of the sender")
    p.add_argument("--passphrase-env", metavar="VAR", help="passphrase of the identity is in $VAR")
    p.add_argument("--json", action="store_true", help="print the labels as JSON")
    p.add_argument("input", help="packet file, or - for stdin")
    p.add_argument("-o", "--output", required=True, help="payload file, or - for stdout")
    p.set_defaults(handler=open_)

    p = sub.add_parser("inspect", help="show what a broker sees of a packet (and verify it with --from)")
    p.add_argument("--from", dest="sender", type=Path, help="public bundle of the sender, to verify the signature")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("input", help="packet file, or - for stdin")
    p.set_defaults(handler=inspect)


def parse_expires(text: str) -> int:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--expires {text!r} is not an ISO 8601 time", hint="e.g. 2026-10-01T00:00:00Z") from None
    if when.tzinfo is None:
        raise UsageError(f"--expires {text!r} has no time zone", hint="add Z or an offset such as +02:00")
    return int(when.timestamp())


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@contextmanager
def _input(name: str) -> Iterator[BinaryIO]:
    if name == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(name, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None
    with f:
        yield f


@contextmanager
def _seekable(src: BinaryIO) -> Iterator[BinaryIO]:
    """`src`, or a spooled copy if it is a pipe: seal needs the payload size before the first chunk, and open checks
    the ciphertext's hash before its first chunk."""
    if src.seekable():
        yield src
        return
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(src, spool, 1 << 20)
        spool.seek(0)
        yield spool


@contextmanager
def _output(name: str) -> Iterator[BinaryIO]:
    """A seekable file that becomes `name` (renamed into place) or goes to stdout, only if the body succeeds."""
    if name == "-":
        with tempfile.TemporaryFile() as tmp:
            yield tmp
            tmp.seek(0)
            shutil.copyfileobj(tmp, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
        return
    target = Path(name)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(f"cannot write {name}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w+b") as tmp:
            yield tmp
        os.replace(tmp_name, target)
    except BaseException:
        os.unlink(tmp_name)
        raise


def _identity(args: argparse.Namespace) -> identity.Identity:
    return keyfiles.load_identity(args.identity, keyfiles.passphrase_from_env(args.passphrase_env))


def seal(args: argparse.Namespace) -> int:
    recipients = [keyfiles.load_bundle(Path(p)) for p in _split(args.to)]
    if not recipients:
        raise UsageError("--to names no recipient")
    if args.json and args.output == "-":
        raise UsageError("--json and -o - would both write to stdout: write the packet to a file")
    expires = parse_expires(args.expires) if args.expires else None
    me = _identity(args)
    with _input(args.input) as given, _seekable(given) as src, _output(args.output) as out:
        result = packet.seal(
            src,
            out,
            sender=me,
            recipients=recipients,
            tlp=args.tlp,
            now=int(time.time()),
            random=os.urandom,
            expires=expires,
            categories=_split(args.category),
            operation=args.operation,
            content_type=args.content_type,
        )
    to = sorted(r.member_id for r in recipients)
    if args.json:
        print(json.dumps({"id": result.packet_id.hex(), "size": result.size, "to": to, "output": args.output}))
        return 0
    print(f"sealed packet {result.packet_id.hex()} ({result.size} bytes) to {', '.join(to)}", file=sys.stderr)
    return 0


def _describe(labels: Labels, sender: str, to: tuple[str, ...]) -> str:
    parts = [f"from {sender} to {', '.join(to)}", f"TLP:{labels.tlp.label}"]
    if labels.categories:
        parts.append(f"categories {', '.join(labels.categories)}")
    if labels.operation:
        parts.append(f"operation {labels.operation}")
    parts.append(f"content type {labels.content_type}")
    return "; ".join(parts)


def open_(args: argparse.Namespace) -> int:
    sender = keyfiles.load_bundle(args.sender)
    me = _identity(args)
    # A pipe's ciphertext is spooled (ciphertext, never plaintext, goes to the temporary file): open then checks
    # the signed hash of the whole ciphertext before it writes any plaintext, to stdout too.
    with _input(args.input) as given, _seekable(given) as src:
        if args.output == "-":
            result = packet.open(src, sys.stdout.buffer, me=me, sender=sender, now=int(time.time()))
            sys.stdout.buffer.flush()
        else:
            with _output(args.output) as out:
                result = packet.open(src, out, me=me, sender=sender, now=int(time.time()))
    if args.json:  # on stdout, unless the payload is there
        print(json.dumps(result.to_json(), sort_keys=True), file=sys.stderr if args.output == "-" else sys.stdout)
    else:
        print(_describe(result.labels, result.sender, result.recipients), file=sys.stderr)
    for warning in result.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def inspect(args: argparse.Namespace) -> int:
    sender = keyfiles.load_bundle(args.sender) if args.sender else None
    with _input(args.input) as src:
        result = packet.inspect(src, sender=sender)
    info = result.to_json()
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    print(_describe(result.labels, result.sender, result.recipients))
    print(f"packet id      {info['packet_id']}")
    print(f"header digest  {info['header_digest']}")
    print(f"created        {_iso(result.created)}")
    print(f"expires        {_iso(result.expires)}")
    print(
        f"sizes          packet {result.packet_size}, header {result.header_size}, ciphertext {result.ciphertext_size}"
    )
    print(f"stanza types   {', '.join(result.stanza_types)}")
    print(f"signature      {'verified' if sender else 'NOT verified (pass --from SENDER.pub)'}")
    return 0


def _iso(ts: int) -> str:
    return utc(ts)
