"""Directory and policy commands (an I/O edge over valise.policy).

The operator works on the broker directory: `valise broker member|group|rule ...` build a record signed by the
operator key, check it against the policy folded from the log, and append it. Members sign statements offline
(`valise policy grant|accept|revoke`, which only write a file), and the operator appends them with
`valise broker statement add`. `valise policy show|explain|matrix` read the policy as of the log's end.

Folding, checking and appending happen under an exclusive lock on the broker directory, so two operator
commands cannot both build on the same sequence number and leave the log with a record that does not replay.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from valise import keyfiles, labels
from valise import records as log_records
from valise.broker import policyfold
from valise.broker.home import BrokerHome
from valise.cli.main import group
from valise.crypto import sign
from valise.errors import Error, LabelError, StoreError, UsageError
from valise.genesis import Genesis
from valise.policy import PacketMeta, PolicyState, channels, decide, records
from valise.policy.decide import tlp_label
from valise.policy.state import Rule
from valise.store.sqlite import SqliteLog
from valise.tlog import cosignature
from valise.utctime import MAX_CALENDAR_TIME, utc

EXIT_DENIED = 3


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = group(sub, "broker", "create and administer a broker")
    _register_operator(broker)
    pol = group(sub, "policy", "sign sharing statements; show, explain and map the policy in force")
    _register_member(pol)
    _register_views(pol)


def _dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, type=Path, help="the broker directory")


def _operator(p: argparse.ArgumentParser, *, signs: bool = True) -> None:
    _dir(p)
    if signs:
        p.add_argument(
            "--operator-key", type=Path, metavar="FILE", help="the operator key, if not in the broker directory"
        )
        p.add_argument("--passphrase-env", metavar="VAR", help="the operator key's passphrase is in $VAR")
    p.add_argument("--json", action="store_true", help="print what was appended as JSON (record id, log index)")


def _register_operator(broker: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    member = broker.add_parser("member", help="admit, suspend, reinstate or remove members").add_subparsers(
        dest="member_command", metavar="SUBCOMMAND", required=True
    )
    p = member.add_parser("add", help="admit a member from its public bundle")
    _operator(p)
    p.add_argument("--bundle", required=True, type=Path, help="the member's public bundle (ID.pub)")
    p.add_argument("--kind", required=True, choices=records.MEMBER_KINDS)
    p.add_argument("--region", required=True, help="region name, e.g. europe")
    p.add_argument("--name", help="display name (default: the member id)")
    p.set_defaults(handler=member_add)
    for name, text in (
        ("suspend", "suspend a member (it can neither send nor receive; reinstate lifts it)"),
        ("remove", "remove a member for good (its statements stop counting; it cannot be reinstated)"),
    ):
        p = member.add_parser(name, help=text)
        _operator(p)
        p.add_argument("--id", required=True, dest="member_id")
        p.add_argument("--reason", required=True, help="why (recorded in the log)")
        p.set_defaults(handler=member_change, op=f"member-{name}")
    p = member.add_parser("reinstate", help="lift a suspension")
    _operator(p)
    p.add_argument("--id", required=True, dest="member_id")
    p.set_defaults(handler=member_change, op="member-reinstate")
    p = member.add_parser("rekey", help="move a member to new identity and TLS keys it signed over with its old key")
    _operator(p)
    p.add_argument("--request", required=True, type=Path, help="the member's ID.rekey (valise keygen --rotate)")
    p.set_defaults(handler=member_rekey)

    grp = broker.add_parser("group", help="regional desks and time-boxed operations").add_subparsers(
        dest="group_command", metavar="SUBCOMMAND", required=True
    )
    p = grp.add_parser("create", help="create a group (an operation when --start or --end is given)")
    _operator(p)
    p.add_argument("--name", required=True)
    p.add_argument("--start", type=parse_time, help="operation start (Unix seconds or ISO 8601, UTC)")
    p.add_argument("--end", type=parse_time, help="operation end, exclusive")
    p.set_defaults(handler=group_create)
    for name in ("add", "remove"):
        p = grp.add_parser(name, help=f"{name} a member {'to' if name == 'add' else 'from'} a group")
        _operator(p)
        p.add_argument("--name", required=True)
        p.add_argument("--id", required=True, dest="member_id")
        p.set_defaults(handler=group_change, op=f"group-{name}")

    rule = broker.add_parser("rule", help="operator rules (they only ever restrict; lift ends one)").add_subparsers(
        dest="rule_command", metavar="SUBCOMMAND", required=True
    )
    p = rule.add_parser("ban-category", help="refuse every packet with this category")
    _operator(p)
    p.add_argument("--category", required=True, help="the category to refuse, e.g. political")
    p.set_defaults(handler=add_rule, rule="ban-category", field="category")
    p = rule.add_parser("max-size", help="refuse packets larger than this many bytes")
    _operator(p)
    p.add_argument("--bytes", required=True, type=int, dest="size")
    p.set_defaults(handler=add_rule, rule="max-size", field="size")
    p = rule.add_parser("max-tlp", help="refuse packets above this TLP level")
    _operator(p)
    p.add_argument("--tlp", required=True, help="the highest TLP level allowed through, e.g. AMBER")
    p.set_defaults(handler=add_rule, rule="max-tlp", field="tlp")
    p = rule.add_parser("lift", help="stop applying a rule in force (members' consent still decides)")
    _operator(p)
    p.add_argument("--id", required=True, dest="rule_id", help="the rule's id or a unique prefix (policy show)")
    p.set_defaults(handler=lift_rule)

    stmt = broker.add_parser("statement", help="append members' signed statements").add_subparsers(
        dest="statement_command", metavar="SUBCOMMAND", required=True
    )
    p = stmt.add_parser("add", help="check and append statement files (all or none)")
    _operator(p, signs=False)
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(handler=statement_add)


def _statement_args(p: argparse.ArgumentParser, *, terms: bool = True) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--identity", type=Path, help="sign offline with your key directory (from valise keygen)")
    where.add_argument("--node", type=Path, help="have your running node sign it and send it to the broker")
    p.add_argument("--passphrase-env", metavar="VAR", help="the key file's passphrase is in $VAR")
    p.add_argument("--origin", help="with --identity: the broker's log origin (binds the statement to that log)")
    p.add_argument(
        "-o", "--out", "--output", dest="out", type=Path, help="with --identity: the statement file to write"
    )
    p.add_argument("--json", action="store_true", help="print the result (with --node: the broker's answer) as JSON")
    if terms:
        p.add_argument("--again", action="store_true", help="with --node: sign it even if an identical one is in force")
        p.add_argument("--tlp", required=True, help="the highest TLP level covered")
        p.add_argument("--category", type=_list, help="categories covered, comma-separated (default: any)")
        p.add_argument("--valid-from", type=parse_time, help="valid from (Unix seconds or ISO 8601, UTC)")
        p.add_argument("--until", type=parse_time, help="valid until, exclusive")


def _register_member(pol: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = pol.add_parser("grant", help="sign a grant: you agree to send to a member or group")
    _statement_args(p)
    p.add_argument("--to", required=True, help="a member id or group:NAME")
    p.add_argument("--max-size", type=int, help="largest packet covered, in bytes")
    p.set_defaults(handler=sign_grant)
    p = pol.add_parser("accept", help="sign an acceptance: you agree to receive from a member or group")
    _statement_args(p)
    p.add_argument("--from", required=True, dest="source", help="a member id or group:NAME")
    p.set_defaults(handler=sign_accept)
    p = pol.add_parser("revoke", help="sign the revocation of one of your statements")
    _statement_args(p, terms=False)
    p.add_argument("--statement", required=True, help="the statement id (64 hex digits, see policy show)")
    p.set_defaults(handler=sign_revoke)


def _view(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", type=Path, help="the broker directory")
    where.add_argument(
        "--node", type=Path, help="a member node's directory: the policy as its verified log shows it (no broker)"
    )
    p.add_argument("--verify", action="store_true", help="re-check every record's signature while folding the log")
    p.add_argument(
        "--log-size",
        type=int,
        metavar="N",
        help="with --dir: the policy of the log's first N entries, the one the auditor replays a relay logged at "
        "index N against (default: the whole log)",
    )


def _register_views(pol: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = pol.add_parser("show", help="members, groups, rules and every statement with its status")
    _view(p)
    p.add_argument("--at", type=parse_time, help="statuses at this time (default: now), of the policy --log-size says")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=show)
    p = pol.add_parser("explain", help="would a packet be relayed? per recipient, with reasons (exit 3 if not)")
    _view(p)
    p.add_argument("--from", required=True, dest="sender", help="the sending member's id")
    p.add_argument("--to", required=True, type=_list, help="recipients (ids or group:NAME), comma-separated")
    p.add_argument("--tlp", required=True, help="the packet's TLP level (CLEAR, GREEN, AMBER, AMBER+STRICT, RED)")
    p.add_argument("--category", type=_list, default=[], help="the packet's categories, comma-separated")
    p.add_argument("--operation", help="the time-boxed operation group the packet is for, if any")
    p.add_argument("--size", type=int, default=0, help="the packet's size in bytes")
    p.add_argument(
        "--at",
        type=parse_time,
        help="decide at this time (default: now): the times of statements, operations and rules, under the policy "
        "--log-size says, not the policy in force at that time (records logged since count unless --log-size)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=explain)
    p = pol.add_parser("matrix", help="the effective channels between all members")
    _view(p)
    p.add_argument("--at", type=parse_time, help="at this time (default: now), under the policy --log-size says")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=matrix)


# --- helpers ----------------------------------------------------------------------------------------------


def parse_time(text: str) -> int:
    """Unix seconds, or an ISO 8601 date or date-time (UTC unless it says otherwise).

    Digits alone are Unix seconds only from nine digits on (March 1973): eight are ISO 8601's basic date form
    (20261231), which a retention job read as 1970 would silently match nothing; fewer are neither."""
    if text.isdigit() and len(text) >= 9:
        seconds = int(text)
    else:
        try:
            value = dt.datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither Unix seconds nor an ISO 8601 time") from None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        seconds = int(value.timestamp())
    # Records, packets and stores hold times in 1970..9999 (a 64-bit store column ends before 2**63 anyway).
    if not 0 <= seconds <= MAX_CALENDAR_TIME:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time between 1970 and the year 9999")
    return seconds


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _iso(t: int | None) -> str | None:
    return None if t is None else utc(t)


@contextmanager
def _locked(home: BrokerHome) -> Iterator[None]:
    with open(home.policy_lock_path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_state(home: BrokerHome, store: SqliteLog, *, verify: bool = False, upto: int | None = None) -> PolicyState:
    """Fold the whole log into a PolicyState; the operator key comes from the genesis record (entry 0).

    The broker's own store holds only records whose signatures were checked before they were appended (here or
    by the daemon), so by default the fold skips the Ed25519 checks (half of its time) and reads only the entries
    the broker recorded as public, up to where it recorded them (broker/policyfold.py); `--verify` re-checks
    every signature of every entry, as an auditor does with a log it did not write.
    """
    cfg = home.config()
    size = store.size()
    if size == 0:
        raise StoreError(f"the log in {home.root} is empty", hint="was it created with valise broker init?")
    if upto is not None:
        if not 1 <= upto <= size:
            raise UsageError(f"--log-size {upto} is not within the log, which holds {size} entries")
        size = upto
    first = store.entries(0, 1)[0]
    state = PolicyState(cfg.origin, Genesis.parse(first, origin=cfg.origin).operator_key, verify_signatures=verify)
    index = policyfold.PublicIndex() if verify else policyfold.read_public_index(home.mailbox_path, store)
    if index.mismatch is not None:  # folded in full all the same; the broker will refuse to start on it
        print(f"valise: warning: {home.mailbox_path.name} does not match the log: {index.mismatch}", file=sys.stderr)

    def refused(i: int, exc: Error) -> None:  # the broker never appends one; an auditor's replay names it too
        print(f"valise: warning: log entry {i} has no policy effect: {exc.what}", file=sys.stderr)

    policyfold.fold(state, store, size, index, refused)
    return state


def _append(home: BrokerHome, build: Any) -> list[tuple[records.Record, int]]:
    """Under the lock: fold the log, let `build(state)` make entries, check them in order, append all at once.
    Returns each record with its log index."""
    home = BrokerHome.open(home.root)
    with _locked(home):
        store = SqliteLog.open(home.db_path)
        log = home.log_service(store)
        try:
            state = load_state(home, store)
            entries: list[bytes] = build(state)
            applied = []
            state.verify_signatures = True  # the new entries are checked in full
            for e in entries:
                rec = state.apply(e)  # raises, and nothing is appended, if any entry does not fit
                if rec is None:
                    raise UsageError("not a policy record")
                applied.append(rec)
            now = time.time()
            for e in entries:
                log.add(e, now)
            indexes = log.flush()
            if log.can_sign and _behind_mailboxes(home, store, indexes.start):
                # The mailboxes lack a batch the log holds: a broker that stopped between its two commits redoes it
                # when it starts, a running one whose storage failed once its store takes it; signed over now, the
                # batch would look like a mailbox.db older than its log (daemon.py).
                print(
                    "valise: not signing a checkpoint now: the broker's mailboxes have not taken in its last batch "
                    "(it stopped between its two commits, or its storage is failing: see `valise broker status`); "
                    "it signs once they have",
                    file=sys.stderr,
                )
            elif log.can_sign:
                # Exactly up to our records: a running broker may append a batch above them meanwhile, which
                # is its own to sign once its mailboxes have it.
                log.sign(indexes.stop)
            else:  # the log key is sealed: the running broker signs the new tree within its checkpoint interval
                print(
                    "valise: the log key is sealed: the running broker signs a checkpoint with these records "
                    "(if it is stopped, when it next starts)",
                    file=sys.stderr,
                )
        finally:
            log.store.close()
    return list(zip(applied, indexes, strict=True))


def _behind_mailboxes(home: BrokerHome, store: SqliteLog, upto: int) -> bool:
    """Whether log entries below `upto` hold traffic whose mailbox changes mailbox.db has not recorded."""
    mark = policyfold.read_public_index(home.mailbox_path, store).mark
    return any(log_records.is_traffic(e) for e in store.iter_entries(min(mark, upto), upto))


def _operator_key(args: argparse.Namespace, home: BrokerHome) -> sign.SigningKey:
    """Unlock the operator key once, before taking the policy lock (Argon2id takes a moment)."""
    return home.operator_key(args.operator_key, keyfiles.passphrase_from_env(args.passphrase_env))


def _operator_entry(
    args: argparse.Namespace, key: sign.SigningKey, state: PolicyState, tag: str, value: str, **fields: Any
) -> bytes:
    if key.public != state.operator_key:
        path = args.operator_key or BrokerHome(args.dir).operator_key_path
        raise StoreError(f"{path} is not the operator key named in the log's genesis record")
    make = records.dir_record if tag == "op" else records.rule_record
    return make(key, state.origin, state.operator_seq + 1, int(time.time()), value, **fields)


def _done(args: argparse.Namespace, appended: list[tuple[records.Record, int]], text: str) -> int:
    """Say what was appended: a sentence, or with --json an object a script can keep (ids and log indexes)."""
    ((rec, index),) = appended
    if args.json:
        print(json.dumps({"done": text, "record": rec.id.hex(), "type": rec.type, "kind": rec.kind, "index": index}))
    else:
        print(f"{text} (record {rec.id.hex()[:16]}…, log index {index})")
    return 0


# --- operator commands ------------------------------------------------------------------------------------


def member_add(args: argparse.Namespace) -> int:
    bundle = keyfiles.load_bundle(args.bundle)
    home = BrokerHome.open(args.dir)
    key = _operator_key(args, home)
    fields = {
        "id": bundle.member_id,
        "kind": args.kind,
        "name": args.name or bundle.member_id,
        "region": args.region,
        "bundle": bundle.raw,
    }

    def build(state: PolicyState) -> list[bytes]:
        # Ids are case-sensitive on the wire, but `fra` beside `FRA` invites a packet to the wrong bureau.
        alike = [m for m in state.members if m.lower() == bundle.member_id.lower() and m != bundle.member_id]
        if alike:
            raise UsageError(f"{bundle.member_id} differs from member {alike[0]} only by case: choose another id")
        return [_operator_entry(args, key, state, "op", "member-add", **fields)]

    appended = _append(home, build)
    return _done(args, appended, f"admitted {bundle.member_id} ({args.kind}, {args.region})")


def member_rekey(args: argparse.Namespace) -> int:
    home = BrokerHome.open(args.dir)
    try:
        if args.request.stat().st_size > records.REKEY_REQUEST_MAX:
            raise UsageError(f"{args.request} is larger than any rekey request ({records.REKEY_REQUEST_MAX} bytes)")
        request = records.parse_rekey_request(args.request.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read {args.request}: {exc.strerror}") from None
    origin = home.config().origin
    if request["origin"] != origin:
        raise UsageError(f"{args.request} hands over a membership in {request['origin']}, not in this log ({origin})")
    key = _operator_key(args, home)
    fields = {"id": request["id"], "bundle": request["bundle"], "rekey_sig": request["rekey_sig"]}
    # Folded before it is appended (_append): an old key's signature that does not verify is refused here.
    appended = _append(home, lambda s: [_operator_entry(args, key, s, "op", "member-rekey", **fields)])
    return _done(args, appended, f"moved {request['id']} to its new identity and TLS keys")


def member_change(args: argparse.Namespace) -> int:
    home = BrokerHome.open(args.dir)
    key = _operator_key(args, home)
    fields = {"id": args.member_id}
    if args.op != "member-reinstate":
        fields["reason"] = args.reason
    appended = _append(home, lambda s: [_operator_entry(args, key, s, "op", args.op, **fields)])
    verb = {"member-suspend": "suspended", "member-remove": "removed", "member-reinstate": "reinstated"}[args.op]
    return _done(args, appended, f"{verb} {args.member_id}")


def group_create(args: argparse.Namespace) -> int:
    home = BrokerHome.open(args.dir)
    key = _operator_key(args, home)
    kind = "operation" if args.start is not None or args.end is not None else "region"
    fields = {"name": args.name, "kind": kind, "start": args.start, "end": args.end}
    appended = _append(home, lambda s: [_operator_entry(args, key, s, "op", "group-create", **fields)])
    return _done(args, appended, f"created {kind} group {args.name}")


def group_change(args: argparse.Namespace) -> int:
    home = BrokerHome.open(args.dir)
    key = _operator_key(args, home)
    fields = {"name": args.name, "id": args.member_id}
    appended = _append(home, lambda s: [_operator_entry(args, key, s, "op", args.op, **fields)])
    verb = "added" if args.op == "group-add" else "removed"
    return _done(args, appended, f"{verb} {args.member_id} {'to' if verb == 'added' else 'from'} group {args.name}")


def add_rule(args: argparse.Namespace) -> int:
    home = BrokerHome.open(args.dir)
    key = _operator_key(args, home)
    value = getattr(args, args.field)

    def build(state: PolicyState) -> list[bytes]:
        # A second copy of a rule in force changes nothing now, and later makes lifting the first change nothing
        # either: the operator would believe a ban gone that still stands.
        if args.rule == "max-tlp" and labels.tlp_rank(str(value)) == labels.tlp_rank("RED"):
            raise UsageError("max-tlp RED restricts nothing: TLP:RED is the highest level")
        same = [r for r in state.rules if r.kind == args.rule and r.value == value]
        if same:
            raise UsageError(
                f"operator rule {same[0].id.hex()[:16]} ({args.rule} {value}) is already in force",
                hint="valise policy show lists the rules in force",
            )
        return [_operator_entry(args, key, state, "rule", args.rule, **{args.field: value})]

    appended = _append(home, build)
    _done(args, appended, f"operator rule {args.rule} {value}")
    if not args.json:  # a rule stops traffic at once; say how to undo a mistaken one
        lift = ["valise", "broker", "rule", "lift", "--dir", str(args.dir), "--id", appended[0][0].id.hex()[:16]]
        if args.operator_key is not None:
            lift += ["--operator-key", str(args.operator_key)]
        if args.passphrase_env is not None:
            lift += ["--passphrase-env", args.passphrase_env]
        print(f"in force from now on; to lift it: {shlex.join(lift)}")
    return 0


def lift_rule(args: argparse.Namespace) -> int:
    home = BrokerHome.open(args.dir)
    # The short form shown in denial reasons ends in "…"; an empty or tiny prefix (an unset shell variable, say)
    # must not quietly pick whichever rule happens to be the only one.
    prefix = args.rule_id.strip().rstrip("…").lower()
    if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        raise UsageError(f"rule id {args.rule_id!r}: give at least 8 hex digits of the id (valise policy show)")
    key = _operator_key(args, home)

    def build(state: PolicyState) -> list[bytes]:
        found = [r for r in state.rules if r.id.hex().startswith(prefix)]
        was = [(rid, at) for rid, at in state.lifted.items() if rid.hex().startswith(prefix)]
        if not found and len(was) == 1:
            raise UsageError(f"operator rule {was[0][0].hex()[:16]} was already lifted (log index {was[0][1]})")
        if len(found) != 1:
            known = ", ".join(f"{r.id.hex()[:16]} ({r.kind} {r.value})" for r in state.rules) or "none"
            what = "matches no rule in force" if not found else "matches several rules"
            raise UsageError(f"rule id {args.rule_id!r} {what}; rules in force: {known}")
        lifted.append(found[0])
        return [_operator_entry(args, key, state, "rule", "lift", lifts=found[0].id)]

    lifted: list[Rule] = []
    appended = _append(home, build)
    return _done(args, appended, f"lifted operator rule {lifted[0].id.hex()[:16]} ({lifted[0].kind} {lifted[0].value})")


def statement_add(args: argparse.Namespace) -> int:
    datas = []
    for path in args.files:
        try:
            if path.stat().st_size > records.MAX_ENTRY_SIZE:
                raise UsageError(f"{path} is larger than any statement ({records.MAX_ENTRY_SIZE} bytes)")
            datas.append(path.read_bytes())
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    for path, data in zip(args.files, datas, strict=True):
        rec = records.parse_policy(data)
        if rec.type != records.STMT:
            raise UsageError(f"{path} is a {rec.type} record, not a member statement")
    appended = _append(BrokerHome(args.dir), lambda s: datas)
    if args.json:
        added = [
            {"file": str(path), "record": rec.id.hex(), "kind": rec.kind, "author": rec.body["author"], "index": i}
            for path, (rec, i) in zip(args.files, appended, strict=True)
        ]
        print(json.dumps({"added": added}))
        return 0
    for path, (rec, i) in zip(args.files, appended, strict=True):
        print(f"added {rec.kind} {rec.id.hex()} by {rec.body['author']} ({path}, log index {i})")
    return 0


# --- member commands (offline) --------------------------------------------------------------------------


def _via_node(args: argparse.Namespace, spec: dict[str, Any]) -> int:
    """Let the member's node daemon sign the statement (it holds the unlocked key) and submit it to the broker."""
    from valise.cli.node import submit_statement  # the node CLI pulls in trio; only this path needs it

    reply = submit_statement(args.node, spec, again=bool(getattr(args, "again", False)))
    if args.json:
        print(json.dumps(reply))
    if not reply.get("ok"):
        print(f"valise: error: {reply.get('error')}", file=sys.stderr)
        return int(reply.get("code", 1))
    if not args.json:
        print(f"{spec['kind']} {reply.get('statement')} logged at index {reply.get('index')}")
        if still := reply.get("still_in_force"):
            print(f"note: still in force, allowing the same counterpart: {', '.join(still)}")
    return 0


def _write_statement(args: argparse.Namespace, make: Any) -> int:
    if args.origin is None or args.out is None:
        raise UsageError("signing offline with --identity needs --origin and -o FILE")
    ident = keyfiles.load_identity(args.identity, keyfiles.passphrase_from_env(args.passphrase_env))
    entry: bytes = make(ident)
    rec = records.parse_policy(entry)
    keyfiles.write_public(args.out, entry)
    if args.json:
        print(
            json.dumps({"kind": rec.kind, "statement": rec.id.hex(), "author": ident.member_id, "file": str(args.out)})
        )
    else:
        print(f"{rec.kind} {rec.id.hex()} by {ident.member_id} written to {args.out}")
    return 0


def _terms(args: argparse.Namespace) -> dict[str, Any]:
    try:
        tlp = labels.TLP.parse(args.tlp).label
        cats = list(labels.check_categories(args.category)) if args.category else None
    except LabelError as exc:
        raise UsageError(exc.what, hint=exc.hint) from None
    if args.until is not None and args.until <= int(time.time()):
        # Logged for good and never in force: almost certainly a mistyped year.
        raise UsageError(f"--until {_iso(args.until)} has passed: the statement would never be in force")
    return {"tlp": tlp, "categories": cats, "valid_from": args.valid_from, "valid_until": args.until}


def sign_grant(args: argparse.Namespace) -> int:
    terms = _terms(args)
    if args.node is not None:
        return _via_node(args, {"kind": "grant", "to": args.to, "max_size": args.max_size, **terms})
    return _write_statement(
        args,
        lambda i: records.grant(
            i.signing,
            origin=args.origin,
            author=i.member_id,
            created=int(time.time()),
            to=args.to,
            max_size=args.max_size,
            **terms,
        ),
    )


def sign_accept(args: argparse.Namespace) -> int:
    terms = _terms(args)
    if args.node is not None:
        return _via_node(args, {"kind": "accept", "from": args.source, **terms})
    return _write_statement(
        args,
        lambda i: records.accept(
            i.signing, origin=args.origin, author=i.member_id, created=int(time.time()), source=args.source, **terms
        ),
    )


def sign_revoke(args: argparse.Namespace) -> int:
    given = args.statement.strip().rstrip("…").lower()
    if args.node is not None:  # the node knows this member's statements: a unique prefix will do
        if len(given) < 8 or any(c not in "0123456789abcdef" for c in given):
            raise UsageError(f"statement id {args.statement[:80]!r}: give at least 8 hex digits (policy show)")
        return _via_node(args, {"kind": "revoke", "statement": given})
    try:
        sid = bytes.fromhex(given)
    except ValueError:
        sid = b""
    if len(sid) != 32:
        raise UsageError(
            f"statement id {args.statement[:80]!r} is not 64 hex digits",
            hint="signing offline, the whole id is needed (valise policy show); through --node a prefix will do",
        )
    return _write_statement(
        args,
        lambda i: records.revoke(
            i.signing, origin=args.origin, author=i.member_id, created=int(time.time()), statement=sid
        ),
    )


# --- views ------------------------------------------------------------------------------------------------


def _view_state(args: argparse.Namespace) -> PolicyState:
    if args.node is not None:
        from valise.node.report import offline_policy  # the node side; only this path needs it

        if args.verify:
            raise UsageError("--verify is for --dir: a node checked every record's signature as it followed the log")
        if args.log_size is not None:
            raise UsageError("--log-size is for --dir: a node keeps the policy as of its verified log only")

        return offline_policy(args.node)
    return _read_state(args.dir, args.verify, args.log_size)


def _read_state(directory: Path, verify: bool, upto: int | None = None) -> PolicyState:
    home = BrokerHome.open(directory)
    store = SqliteLog.open(home.db_path)
    try:
        return load_state(home, store, verify=verify, upto=upto)
    finally:
        store.close()


def describe(state: PolicyState, now: int) -> dict[str, Any]:
    """The policy as plain JSON values (`policy show --json`)."""
    stmts = []
    for s in sorted(state.statements.values(), key=lambda s: s.position):
        if s.kind == records.REVOKE:
            stmts.append({"id": s.id.hex(), "kind": s.kind, "author": s.author, "revokes": s.counterpart,
                          "position": s.position, "status": "applied"})  # fmt: skip
            continue
        stmts.append(
            {
                "id": s.id.hex(),
                "kind": s.kind,
                "author": s.author,
                "counterpart": s.counterpart,
                "tlp": s.tlp,
                "categories": None if s.categories is None else sorted(s.categories),
                "valid_from": _iso(s.valid_from),
                "valid_until": _iso(s.valid_until),
                "max_size": s.max_size,
                "created": _iso(s.created),
                "position": s.position,
                "status": state.status(s, now),
            }
        )
    return {
        "origin": state.origin,
        "log_size": state.size,
        "at": _iso(now),
        "members": [
            {
                "id": m.id,
                "kind": m.kind,
                "name": m.name,
                "region": m.region,
                "status": m.status,
                "reason": m.reason,
                "groups": list(state.groups_of.get(m.id, ())),
                "sign_key": m.sign_key.hex(),
                "enc_key": m.enc_key.hex(),
                # What a quorum policy's `witness` line (audit.md) or `audit --witness` needs for this member.
                "witness_key": cosignature.CosignatureVerifier(m.id, m.sign_key).vkey(),
                # Identity keys a member-rekey replaced, oldest first: each signed this member's entries up to and
                # including `until` (the rekey's position), which nodes and auditors check by position.
                "replaced_keys": [{"key": k.hex(), "until": at} for at, k in state.retired_keys.get(m.id, ())],
            }
            for m in sorted(state.members.values(), key=lambda m: m.id)
        ],
        "groups": [
            {
                "name": g.name,
                "kind": g.kind,
                "start": _iso(g.start),
                "end": _iso(g.end),
                "running": g.running(now),
                "members": sorted(g.members),
            }
            for g in sorted(state.groups.values(), key=lambda g: g.name)
        ],
        "rules": [{"id": r.id.hex(), "kind": r.kind, "value": r.value, "position": r.position} for r in state.rules],
        "lifted_rules": [{"id": rid.hex(), "lifted_at": at} for rid, at in state.lifted.items()],
        "statements": stmts,
    }


def show(args: argparse.Namespace) -> int:
    now = args.at if args.at is not None else int(time.time())
    facts = describe(_view_state(args), now)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"policy of {facts['origin']} at {facts['at']} (log size {facts['log_size']})")
    print(f"members ({len(facts['members'])}):")
    for m in facts["members"]:
        status = m["status"] + (f" ({m['reason']})" if m["reason"] else "")
        groups = ", ".join(m["groups"]) or "-"
        print(f"  {m['id']:<12} {m['kind']:<8} {m['region']:<20} {status:<12} groups: {groups}  {m['name']}")
        for old in m["replaced_keys"]:
            print(f"  {'':<12} identity key {old['key'][:16]}… replaced at log entry {old['until']}")
    print("witness keys (a quorum policy's `witness NAME KEY` lines; `valise audit --witness KEY`):")
    for m in facts["members"]:
        if m["status"] == "active":
            print(f"  witness {m['id']} {m['witness_key']}")
    print(f"groups ({len(facts['groups'])}):")
    for g in facts["groups"]:
        window = f" {g['start'] or '…'} to {g['end'] or '…'}{'' if g['running'] else ' (not running)'}"
        print(
            f"  {g['name']:<20} {g['kind']:<9}{window if g['kind'] == 'operation' else ''}: {', '.join(g['members'])}"
        )
    lifted = f"; {len(facts['lifted_rules'])} lifted" if facts["lifted_rules"] else ""
    print(f"rules in force ({len(facts['rules'])}{lifted}):")
    for r in facts["rules"]:
        print(f"  {r['id'][:16]}  {r['kind']} {r['value']}")
    print(f"statements ({len(facts['statements'])}):")
    for s in facts["statements"]:
        if s["kind"] == records.REVOKE:
            print(f"  {s['id']}  revoke  by {s['author']} of {s['revokes'][:16]}…")
            continue
        arrow = "->" if s["kind"] == records.GRANT else "<-"
        cats = ",".join(s["categories"]) if s["categories"] else "any"
        window = f" from {s['valid_from']}" if s["valid_from"] else ""
        window += f" until {s['valid_until']}" if s["valid_until"] else ""
        size = f" max {s['max_size']} bytes" if s["max_size"] else ""
        print(
            f"  {s['id']}  {s['kind']:<6} {s['author']} {arrow} {s['counterpart']}  up to {s['tlp']}, {cats}"
            f"{window}{size}  [{s['status']}]"
        )
    return 0


def explain(args: argparse.Namespace) -> int:
    now = args.at if args.at is not None else int(time.time())
    # A mistyped label is the asker's mistake, not the policy's answer: exit 2, as `send` and `seal` do, not a
    # denial (exit 3) that reads like one.
    try:
        tlp = labels.TLP.parse(args.tlp).label
        for category in args.category:
            labels.check_category(category)
    except LabelError as exc:
        raise UsageError(exc.what) from None
    state = _view_state(args)
    to: list[str] = []
    for name in args.to:  # group:NAME stands for its members, as `send` reads it
        if name.startswith(records.GROUP_PREFIX):
            group = state.groups.get(name[len(records.GROUP_PREFIX) :])
            if group is None:
                raise UsageError(f"there is no group {name[len(records.GROUP_PREFIX) :]!r} in the directory")
            to += [m for m in sorted(group.members) if m != args.sender and m not in to]
        elif name not in to:
            to.append(name)
    meta = PacketMeta(args.sender, tuple(to), tlp, tuple(sorted(set(args.category))), args.operation, args.size)
    decision = decide(state, meta, now)
    if args.json:
        out = {
            "allowed": decision.allowed,
            "at": _iso(now),
            "log_size": state.size,
            "verdicts": [
                {
                    "to": v.recipient,
                    "allowed": v.allowed,
                    "reason": v.reason,
                    "grant": v.grant.hex() if v.grant else None,
                    "accept": v.accept.hex() if v.accept else None,
                }
                for v in decision.verdicts
            ],
        }
        print(json.dumps(out, indent=2))
    else:
        for v in decision.verdicts:
            print(f"{args.sender} -> {v.recipient}: {'allow' if v.allowed else 'DENY'}: {v.reason}")
    return 0 if decision.allowed else EXIT_DENIED


def matrix(args: argparse.Namespace) -> int:
    now = args.at if args.at is not None else int(time.time())
    state = _view_state(args)
    chans = channels(state, now)
    if args.json:
        out = [
            {
                "from": c.sender,
                "to": c.recipient,
                "tlp": tlp_label(c.rank),
                "categories": None if c.categories is None else sorted(c.categories),
                "terms": [
                    {
                        "tlp": tlp_label(t.rank),
                        "categories": None if t.categories is None else sorted(t.categories),
                        "grant": t.grant.id.hex(),
                        "accept": t.accept.id.hex(),
                    }
                    for t in c.terms
                ],
            }
            for c in chans
        ]
        print(json.dumps({"at": _iso(now), "log_size": state.size, "channels": out}, indent=2))
        return 0
    print(f"{len(chans)} channels at {_iso(now)} (highest TLP and the categories allowed; explain gives exact answers)")
    for c in chans:
        cats = "any category" if c.categories is None else ", ".join(sorted(c.categories))
        print(f"  {c.sender} -> {c.recipient}  up to {tlp_label(c.rank)}: {cats}")
    return 0
