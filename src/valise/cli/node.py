"""`valise node init|run|set-policy`, and the member's commands that go through the running node: `valise send`,
`inbox`, `read`, `erase`, `retract`, `status`, `receipt export` (and `submit_statement` for `valise policy ... --node`).

The daemon holds the unlocked identity; these commands only talk to its control socket (mode 0600), so they
never need the passphrase. Exit codes: 0 done (or queued while the broker is unreachable), 1 an error,
2 a usage error, 3 the broker denied the packet (the reason per recipient is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import trio

from valise import keyfiles
from valise.cli.main import group
from valise.cli.packet import parse_expires
from valise.cli.policy import parse_time
from valise.cli.text import shown
from valise.daemonlock import DaemonLock
from valise.errors import Error, UsageError
from valise.node import control, erasing, report
from valise.node.home import NodeHome
from valise.node.store import NodeStore
from valise.packet.opening import REPLACED_KEY_WARNING

DEFAULT_WAIT = 10
# Two senders may use the same packet id (the broker refuses only a sender's own id twice): the sender tells them
# apart where more digits cannot.
FROM_HELP = "the sender's member id, when packets from two senders share the id"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = group(sub, "node", "run a member node (outbox, inbox, witness) next to the broker")
    p = node.add_parser("init", help="create a node directory pinned to a broker and its log key")
    p.add_argument("--dir", required=True, type=Path, help="the node directory to create")
    p.add_argument("--identity", required=True, type=Path, help="directory of the member's identity (valise keygen)")
    p.add_argument("--broker", required=True, help="the broker's HOST:PORT")
    p.add_argument("--broker-pub", required=True, type=Path, help="the broker's public bundle (valise broker info)")
    p.add_argument(
        "--log-key",
        required=True,
        help="the log's verifier key: the vkey of valise broker info, or the broker's log.vkey file",
    )
    p.add_argument(
        "--witness-policy",
        type=Path,
        metavar="FILE",
        help="a witness quorum policy (specs/audit.md): use only checkpoints whose cosignatures meet it",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=init)

    p = node.add_parser(
        "move", help="point a stopped node at its broker's new address or re-pinned bundle, or its moved identity"
    )
    p.add_argument("--dir", required=True, type=Path, help="the node directory")
    p.add_argument("--broker", help="the broker's new HOST:PORT")
    p.add_argument("--broker-pub", type=Path, help="the broker's new public bundle (it was re-keyed)")
    p.add_argument("--identity", type=Path, help="the member's identity directory, where it is now")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=move)

    p = node.add_parser("set-policy", help="set (or remove) the node's witness quorum policy; read at daemon start")
    p.add_argument("--dir", required=True, type=Path, help="the node directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("file", nargs="?", type=Path, help="the quorum policy file")
    which.add_argument("--remove", action="store_true", help="remove the policy: use every verified checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=set_policy)

    p = node.add_parser("run", help="run the node daemon in the foreground (SIGINT/SIGTERM stop it)")
    p.add_argument("--dir", required=True, type=Path, help="the node directory")
    p.add_argument("--passphrase-env", metavar="VAR", help="the identity's passphrase is in $VAR")
    p.add_argument("-v", "--verbose", action="store_true", help="log every packet and checkpoint")
    p.set_defaults(handler=run)

    p = sub.add_parser("send", help="seal a file for members and send it through the node")
    p.add_argument("--node", required=True, type=Path, help="the node directory")
    p.add_argument("--to", required=True, help="comma-separated member ids and group:NAME")
    p.add_argument("--tlp", required=True, help="CLEAR, GREEN, AMBER, AMBER+STRICT or RED")
    p.add_argument("--category", default="", help="comma-separated categories")
    p.add_argument("--operation", help="operation name")
    p.add_argument("--content-type", help="media type (default: STIX 2.1 if the payload is a bundle, else bytes)")
    p.add_argument("--expires", help="expiry, ISO 8601 with a time zone (default: 30 days)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--wait", type=int, default=DEFAULT_WAIT, metavar="SECONDS", help="wait this long for the answer")
    how.add_argument("--no-wait", action="store_true", help="queue and return at once")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.add_argument("input", help="payload file, or - for stdin")
    p.set_defaults(handler=send)

    p = sub.add_parser("inbox", help="list the packets the node received")
    p.add_argument("--node", required=True, type=Path, help="the node directory")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=inbox)

    p = sub.add_parser("outbox", help="list the packets this member sent: receipt, denial, acknowledgements")
    p.add_argument("--node", required=True, type=Path, help="the node directory")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(handler=outbox)

    p = sub.add_parser("read", help="verify and decrypt a received packet")
    p.add_argument("--node", required=True, type=Path, help="the node directory")
    p.add_argument("id", help="packet id (or a unique prefix of at least 4 hex digits)")
    p.add_argument("--from", dest="sender", metavar="MEMBER", help=FROM_HELP)
    p.add_argument("-o", "--output", required=True, help="payload file, or - for stdout")
    p.add_argument("--json", action="store_true", help="print the packet's labels as JSON")
    p.add_argument("--force", action="store_true", help="read it even if its sender retracted it")
    p.add_argument(
        "--passphrase-env", metavar="VAR", help="with the daemon stopped: the member key's passphrase is in $VAR"
    )
    p.set_defaults(handler=read)

    p = sub.add_parser(
        "erase",
        help="erase received packets from the inbox (their files; the node still knows them, never takes them again)",
        description="Erase received packets from the node's inbox: by id, or all received before a time, or all "
        "retracted by their senders (or both filters). The packet files go; a small record stays, so that the "
        "node acknowledges a redelivery again instead of taking it in a second time.",
    )
    p.add_argument("--node", required=True, type=Path, help="the node directory")
    p.add_argument("ids", nargs="*", metavar="ID", help="packet ids (or unique prefixes of at least 4 hex digits)")
    p.add_argument(
        "--before", type=parse_time, metavar="TIME", help="those received before TIME (ISO 8601, UTC by default)"
    )
    p.add_argument("--retracted", action="store_true", help="those their senders retracted")
    p.add_argument("--from", dest="sender", metavar="MEMBER", help="only packets from MEMBER; " + FROM_HELP)
    p.add_argument("--dry-run", action="store_true", help="say what would be erased, erase nothing")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(handler=erase)

    p = sub.add_parser("retract", help="retract a packet this member sent (recipients are told to discard it)")
    p.add_argument("--node", required=True, type=Path, help="the node directory")
    p.add_argument("id", help="packet id (or a unique prefix)")
    p.add_argument("--reason", default="", help="why (≤ 512 bytes, logged)")
    p.add_argument("--json", action="store_true", help="print the broker's answer (packet id, log index) as JSON")
    p.set_defaults(handler=retract)

    receipt = group(sub, "receipt", "offline proofs that the packets this member sent are in the log")
    p = receipt.add_parser("export", help="write a proof bundle (C2SP tlog-proof) that a sent packet was logged")
    p.add_argument("--node", required=True, type=Path, help="the node directory")
    p.add_argument("id", help="packet id (or a unique prefix of at least 4 hex digits)")
    p.add_argument("-o", "--output", required=True, type=Path, help="the bundle file to write")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=export_receipt)

    p = sub.add_parser(
        "status",
        help="the node's connection, verified log, outbox, inbox and alarms (exit 3: the daemon is not running)",
    )
    p.add_argument("--node", required=True, type=Path, help="the node directory")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=status)


# --- talking to the daemon --------------------------------------------------------------------------------------


async def call(
    node_dir: Path,
    request: dict[str, Any],
    source: BinaryIO | None = None,
    sink: Callable[[bytes], object] | None = None,
) -> dict[str, Any]:
    """Send one request (and a payload) to the node daemon; feed streamed data to `sink`; return the reply."""
    NodeHome.open(node_dir)
    stream = await _send_request(node_dir, request)
    async with stream:
        if source is not None:
            # If the daemon refused early it stops reading; its reply still says why.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await control.send_data(stream, source)
        reader = control.MessageReader(stream)
        while True:
            msg = await reader.next()
            if msg is None:
                raise Error("the node daemon closed the control connection without an answer")
            if msg.get("op") == "data" and sink is not None and isinstance(msg.get("data"), bytes):
                sink(msg["data"])
                continue
            return msg


BUSY_WAIT = 30.0  # seconds a client keeps trying while the daemon's accept queue is full


async def _send_request(node_dir: Path, request: dict[str, Any]) -> trio.SocketStream:
    """Connect to the daemon and send `request`. When many clients connect at once (scripts running `send` in
    parallel) past the socket's accept queue, a non-blocking connect to a Unix socket seems to succeed and the
    first write fails with ENOTCONN: the daemon never saw the request, so it is sent again on a new connection."""
    path = control.socket_path(node_dir)
    deadline = trio.current_time() + BUSY_WAIT
    pause = 0.01
    while True:
        try:
            stream = await control.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):  # no socket, or one no process listens on any more
            raise NotRunning(node_dir) from None
        except OSError as exc:  # a daemon may well be running: say what stopped us, never "not running"
            raise Error(f"cannot reach the node daemon in {node_dir}: {exc.strerror or exc}") from None
        try:
            await control.send_msg(stream, request)
            return stream
        except trio.BrokenResourceError as exc:
            await stream.aclose()
            never_connected = isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOTCONN
            if not never_connected:
                raise Error(f"the node daemon in {node_dir} closed the control connection: {exc}") from None
            if trio.current_time() > deadline:
                raise Error(
                    f"the node daemon in {node_dir} took no new connection for {BUSY_WAIT:g} s",
                    hint="too many clients at once? try again",
                ) from None
        await trio.sleep(pause)
        pause = min(pause * 2, 0.5)


NOT_RUNNING = 3  # `status`'s exit code when the daemon is not running


class NotRunning(Error):
    def __init__(self, node_dir: Path) -> None:
        super().__init__(
            f"the node daemon is not running in {node_dir}", hint=f"start it: valise node run --dir {node_dir}"
        )


def request(node_dir: Path, req: dict[str, Any], source: BinaryIO | None = None, sink: Any = None) -> dict[str, Any]:
    return trio.run(call, node_dir, req, source, sink)


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise _ReplyError(str(reply.get("error", "failed")), int(reply.get("code", 1)))
    return reply


class _ReplyError(Error):
    def __init__(self, what: str, code: int) -> None:
        super().__init__(what)
        self.exit_code = code


def submit_statement(node_dir: Path, statement: bytes | dict[str, Any], *, again: bool = False) -> dict[str, Any]:
    """Send a member statement through the node: signed bytes as they are, or a description the daemon signs
    ({"kind": "grant", "to": ..., "tlp": ..., ...} as in policy.records). `again`: even if an identical one is
    in force. Returns {"ok", "index", "statement"} or {"ok": False, "error", "code"}."""
    req: dict[str, Any] = {"op": "statement", "again": again}
    if isinstance(statement, bytes):
        req["statement"] = statement
    else:
        req["build"] = statement
    return request(node_dir, req)


# --- commands ---------------------------------------------------------------------------------------------------


def _read_policy(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the witness policy {path}: {exc}") from None


def move(args: argparse.Namespace) -> int:
    if args.broker is None and args.broker_pub is None and args.identity is None:
        raise UsageError("give --broker HOST:PORT, --broker-pub FILE, --identity DIR, or several")
    home = NodeHome.open(args.dir)
    with DaemonLock(home.lock_path, "node daemon"):  # a running daemon would go on with the old settings
        cfg = home.config()
        if args.identity is not None:
            cfg = home.move_identity(args.identity)
        if args.broker is not None or args.broker_pub is not None:
            cfg = home.move_broker(args.broker, args.broker_pub)
    facts = {"dir": str(args.dir), "broker": f"{cfg.broker_host}:{cfg.broker_port}", "identity": str(cfg.identity_dir)}
    if args.json:
        print(json.dumps(facts | ({"broker_pub": str(home.broker_bundle_path)} if args.broker_pub else {})))
    else:
        pinned = f", broker bundle pinned from {args.broker_pub}" if args.broker_pub else ""
        ident = f", identity in {cfg.identity_dir}" if args.identity else ""
        print(
            f"node {args.dir} now connects to {facts['broker']}{pinned}{ident}; "
            f"start it: valise node run --dir {args.dir}"
        )
    return 0


def init(args: argparse.Namespace) -> int:
    text = _read_policy(args.witness_policy) if args.witness_policy else None
    home = NodeHome.create(args.dir, args.identity, args.broker, args.broker_pub, args.log_key, text)
    cfg = home.config()
    policy = home.witness_policy()
    facts = {
        "dir": str(args.dir),
        "member": cfg.member_id,
        "broker": f"{cfg.broker_host}:{cfg.broker_port}",
        "quorum": policy.quorum if policy else None,
    }
    if args.json:
        print(json.dumps(facts))
    else:
        print(f"node directory {args.dir} for {cfg.member_id}, broker {facts['broker']}")
        if policy is not None:
            print(f"  witness quorum: {policy.quorum} ({len(policy.witnesses)} witness keys)")
        unlock = " --passphrase-env VAR" if keyfiles.is_encrypted(args.identity) else ""
        print(f"  start it with: valise node run --dir {args.dir}{unlock}")
    return 0


def set_policy(args: argparse.Namespace) -> int:
    home = NodeHome.open(args.dir)
    policy = home.set_policy(None if args.remove else _read_policy(args.file))
    running = control.socket_path(args.dir).exists()
    if args.json:
        quorum = None if policy is None else {"quorum": policy.quorum, "witnesses": sorted(policy.witnesses)}
        print(json.dumps({"dir": str(args.dir), "policy": quorum, "restart_needed": running}))
        return 0
    if policy is None:
        print(f"{args.dir}: no witness policy; every verified checkpoint is used")
    else:
        print(f"{args.dir}: witness quorum {policy.quorum} ({len(policy.witnesses)} witness keys)")
    if running:
        print("  the node daemon reads it when it starts: restart it", file=sys.stderr)
    return 0


def export_receipt(args: argparse.Namespace) -> int:
    reply = _check(request(args.node, {"op": "export-receipt", "id": args.id}))
    bundle, entry = reply["bundle"], reply["entry"]
    target: Path = args.output
    keyfiles.write_public(target, bundle)
    entry_file = None
    if not reply["carried"]:  # over the bundle's 4096-byte extra data: the verifier needs it beside the bundle
        entry_file = target.with_name(target.name + ".entry")
        keyfiles.write_public(entry_file, entry)
    facts = {
        "id": reply["id"],
        "index": reply["index"],
        "checkpoint_size": reply["checkpoint_size"],
        "cosigners": reply["cosigners"],
        "unchecked_cosigners": reply.get("unchecked_cosigners", []),
        "bundle": str(target),
        "entry": str(entry_file) if entry_file else None,
    }
    if args.json:
        print(json.dumps(facts))
        return 0
    cosigned = f", cosigned by {', '.join(reply['cosigners'])}" if reply["cosigners"] else ""
    if unchecked := reply.get("unchecked_cosigners"):
        cosigned += f" (and by {', '.join(unchecked)}, whose keys this node does not pin: not checked)"
    print(f"packet {reply['id']} is log entry {reply['index']} of the checkpoint of size {reply['checkpoint_size']}")
    print(f"proof bundle written to {target}{cosigned}")
    extra = f" --entry {entry_file}" if entry_file else ""
    print(f"  verify it anywhere: valise audit proof {target} --broker-key '{reply['vkey']}'{extra}")
    return 0


def run(args: argparse.Namespace) -> int:
    from valise.node.daemon import run_node

    home = NodeHome.open(args.dir)
    passphrase = keyfiles.passphrase_from_env(args.passphrase_env)
    me = home.load_identity(passphrase)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    trio.run(run_node, home, me, passphrase)
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def send(args: argparse.Namespace) -> int:
    wait = 0 if args.no_wait else args.wait
    if wait < 0:
        raise UsageError("--wait must not be negative")
    req: dict[str, Any] = {
        "op": "send",
        "to": _split(args.to),
        "tlp": args.tlp,
        "categories": _split(args.category),
        "operation": args.operation,
        "content_type": args.content_type,
        "expires": parse_expires(args.expires) if args.expires else None,
        "wait": wait,
    }
    with _payload(args.input) as src:
        req["size"] = os.fstat(src.fileno()).st_size - src.tell()
        reply = request(args.node, req, src)
    if args.json:
        print(json.dumps(reply))  # the packet id is in it: one JSON value on stdout, nothing else
    elif "id" in reply:
        print(reply["id"])
    if not reply.get("ok"):
        for to, reason in sorted((reply.get("reasons") or {}).items()):
            print(f"denied for {shown(to)}: {shown(reason)}", file=sys.stderr)
        if not reply.get("reasons"):
            print(f"valise: {shown(reply.get('error'))}", file=sys.stderr)
        return int(reply.get("code", 1))
    if not args.json:
        if reply.get("state") == "receipted":
            print(f"relayed: log index {reply.get('index')}")
        elif reply.get("stopping"):
            print("queued; the node daemon is stopping: it sends the packet when it runs again")
        elif not reply.get("connected"):
            why = reply.get("last_error")
            print(f"queued, not connected to the broker ({shown(why)})" if why else "queued, broker unreachable")
        else:
            print("queued, no answer from the broker yet")
    return 0


class _payload:
    """The payload as a regular file (stdin is spooled: the size must be known before sealing starts)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._f: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        if self.name == "-":
            spool = tempfile.TemporaryFile()
            while chunk := sys.stdin.buffer.read(1 << 20):
                spool.write(chunk)
            spool.seek(0)
            self._f = spool
        else:
            try:
                self._f = open(self.name, "rb")
            except OSError as exc:
                raise UsageError(f"cannot read {self.name}: {exc.strerror}") from None
        return self._f

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()


def _listing(node: Path, op: str, offline: Callable[[NodeHome], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The daemon's listing `op`, page by page; with the daemon stopped, what it stored (said on stderr)."""
    try:
        return _from_daemon(node, op)
    except NotRunning as exc:
        print(f"valise: {exc.what}; listing what it stored ({exc.hint})", file=sys.stderr)
        return offline(NodeHome.open(node))


def _show_listing(items: list[dict[str, Any]], as_json: bool, what: str, line: Callable[[dict[str, Any]], str]) -> int:
    if as_json:
        print(json.dumps(items))
        return 0
    if not items:
        print(f"{what} is empty")
    for it in items:
        print(line(it))
    return 0


def inbox(args: argparse.Namespace) -> int:
    return _show_listing(_listing(args.node, "inbox", report.offline_inbox), args.json, "inbox", _received_line)


def _received_line(it: dict[str, Any]) -> str:
    labels = it["labels"]
    cats = shown(",".join(labels.get("categories") or []) or "-")
    tlp = shown(labels.get("tlp"))
    return f"{it['id']}  from {shown(it['from']):<10} TLP:{tlp}  {cats}  {it['size']} bytes  {it['state']}"


def _from_daemon(node: Path, op: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after: int | None = 0
    while after is not None:  # page by page: the daemon answers within one control frame
        reply = _check(request(node, {"op": op, "after": after}))
        items += reply["items"]
        if reply["next"] is not None and reply["next"] <= after:
            raise Error(f"the node's {op} listing does not advance past {after}")
        after = reply["next"]
    return items


def outbox(args: argparse.Namespace) -> int:
    return _show_listing(_listing(args.node, "outbox", report.offline_outbox), args.json, "outbox", _sent_line)


def _sent_line(it: dict[str, Any]) -> str:
    return f"{it['id']}  to {','.join(it['to'])}  {it['size']} bytes  {_sent_state(it)}"


def _sent_state(it: dict[str, Any]) -> str:
    """What became of a sent packet, in a few words a person can act on."""
    state = it["state"]
    if state == "receipted":
        acked = f"; acknowledged by {', '.join(it['acked_by'])}" if it["acked_by"] else "; not acknowledged yet"
        return f"relayed (log index {it['index']}){acked}"
    if state == "queued":
        why = f", last: {shown(str(it['last_error']))}" if it.get("last_error") else ""
        return f"queued ({it['attempts']} attempt(s){why})"
    if "cancelled" in it:
        return f"cancelled before it was sent: {shown(it['cancelled'])}"
    if "refused" in it:
        refused = it["refused"]
        return f"refused by the broker ({shown(str(refused.get('code')))}): {shown(str(refused.get('message')))}"
    if "reasons" in it:
        return "denied: " + "; ".join(f"{shown(k)}: {shown(v)}" for k, v in sorted(it["reasons"].items()))
    return str(state)


def read(args: argparse.Namespace) -> int:
    ask = {"op": "read", "id": args.id, "force": args.force, "from": args.sender}

    def fetch(sink: BinaryIO) -> dict[str, Any]:
        try:
            return _check(request(args.node, ask, sink=sink.write))
        except NotRunning:
            # What was received stays readable with the daemon down (a crash, an upgrade): decrypted here, with
            # the key unlocked here, and not marked read, as the store is not written to.
            passphrase = keyfiles.passphrase_from_env(args.passphrase_env)
            home = NodeHome.open(args.node)
            return report.offline_read(home, args.id.lower(), passphrase, sink, force=args.force, sender=args.sender)

    if args.output == "-":
        reply = fetch(sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        target = Path(args.output)
        if target.is_dir():  # found out before the daemon decrypts anything, not after
            raise UsageError(f"cannot write {target}: it is a directory", hint="give a file name")
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.", suffix=".tmp")
        except OSError as exc:
            raise UsageError(f"cannot write {target}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                reply = fetch(out)
            os.replace(tmp, target)  # only a packet that verified in full becomes the output
        except OSError as exc:
            os.unlink(tmp)
            raise UsageError(f"cannot write {target}: {exc.strerror}") from None
        except BaseException:
            os.unlink(tmp)
            raise
    if args.json:
        print(json.dumps(reply["packet"]), file=sys.stderr if args.output == "-" else sys.stdout)
    if reply["packet"].get("sealed_to_replaced_key"):
        print(f"warning: {REPLACED_KEY_WARNING}", file=sys.stderr)
    if reply.get("offline"):
        print("note: read with the node daemon stopped; it is not marked as read", file=sys.stderr)
    if reply.get("state") == "retracted":
        print(f"note: the sender retracted this packet: {shown(reply.get('retraction'))}", file=sys.stderr)
    if reply.get("sender_removed") is not None:
        why = shown(reply["sender_removed"])
        print(f"note: the sender has since been removed from the directory ({why})", file=sys.stderr)
    return 0


def erase(args: argparse.Namespace) -> int:
    ask = {"op": "erase", "ids": args.ids, "before": args.before, "retracted": args.retracted, "from": args.sender}
    ask["dry_run"] = args.dry_run
    try:
        reply = _check(request(args.node, ask))
    except NotRunning:
        home = NodeHome.open(args.node)
        with DaemonLock(home.lock_path, "node daemon", holder="valise erase"):  # not while the daemon starts
            # A dry run only reads: nothing is migrated, swept or finished in the store.
            store = NodeStore.open_readonly(home.root) if args.dry_run else NodeStore.open(home.root)
            try:
                rows = erasing.select(store, args.ids, before=args.before, retracted=args.retracted, sender=args.sender)
                reply, digests = erasing.plan(rows, dry_run=args.dry_run)
                if digests:
                    store.inbox_erase(digests, int(time.time()))
            finally:
                store.close()
    if args.json:
        print(json.dumps({k: reply[k] for k in ("count", "bytes", "ids", "already", "dry_run")}))
        return 0
    verb = "would erase" if args.dry_run else "erased"
    print(f"{verb} {reply['count']} packet(s), {reply['bytes']} bytes")
    for pid in reply["ids"]:
        print(f"  {pid}")
    if reply["count"] > len(reply["ids"]):
        print(f"  … and {reply['count'] - len(reply['ids'])} more")
    for pid in reply["already"]:
        print(f"  {pid}  erased before")
    return 0


def retract(args: argparse.Namespace) -> int:
    reply = _check(request(args.node, {"op": "retract", "id": args.id, "reason": args.reason}))
    cancelled = bool(reply.get("cancelled"))
    if args.json:
        index, already = reply.get("index"), bool(reply.get("already"))
        print(json.dumps({"id": reply["id"], "index": index, "already": already, "cancelled": cancelled}))
        return 0
    if cancelled:
        print(f"cancelled {reply['id']}: it was still queued, never sent, and now will not be")
    elif reply.get("already"):
        print(f"already retracted {reply['id']}: log index {reply['index']}")
    else:
        print(f"retracted {reply['id']}: log index {reply['index']}")
    return 0


def status(args: argparse.Namespace) -> int:
    """Exit 0 with the running daemon's answer; 3 if the daemon is not running (what it stored is shown)."""
    try:
        reply = _check(request(args.node, {"op": "status"}))
    except NotRunning as exc:
        reply = report.offline_status(NodeHome.open(args.node))
        reply["hint"] = exc.hint
    reply.pop("ok", None)
    code = 0 if reply["running"] else NOT_RUNNING
    if args.json:
        print(json.dumps(reply))
        return code
    lg = reply["log"]
    print(f"member     {reply['member']}")
    if not reply["running"]:
        print(f"daemon     not running ({reply['hint']}); below is what it stored")
        state = "not connected"
    elif reply["connected"]:
        state = "connected"
    else:
        state = f"not connected ({shown(reply.get('last_error') or 'connecting')})"
    print(f"broker     {reply['broker_id'] or '?'} at {reply['broker']}: {state}")
    if "error" in lg:
        print(f"log        {shown(lg['error'])}")
    else:
        print(f"log        {lg['origin']} size {lg['size']} root {lg['root'][:16]}… ({lg['members']} members)")
    trusted = reply["trusted"]
    if trusted is not None and trusted["quorum"] is not None:
        print(f"trusted    size {trusted['size']} root {trusted['root'][:16]}… (witness quorum {trusted['quorum']})")
        if trusted["awaiting"]:
            print(
                f"           awaiting quorum for size {lg['size']}: "
                + shown(trusted["detail"] or "no cosigned checkpoint yet")
            )
    print(f"outbox     {_counts(reply['outbox'])}; {reply['acknowledgements']} signed acknowledgement(s) received")
    erased = reply.get("inbox_erased") or 0
    print(f"inbox      {_counts(reply['inbox'])}" + (f" ({erased} erased)" if erased else ""))
    if reply.get("held"):
        print(f"held       {reply['held']} delivery(ies) waiting for the verified log to show their sender")
    alarms = reply["alarms"]
    total = reply.get("alarms_total", len(alarms))
    latest = f" (the latest {len(alarms)} below)" if total > len(alarms) else ""
    print(f"alarms     {total or 'none'}{latest}")
    for a in alarms:
        print(f"  ALARM {a['kind']}: {shown(a['message'])}")
    return code


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "empty"
