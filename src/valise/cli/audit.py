"""`valise audit verify|monitor|proof`: the auditor's commands (an I/O edge over valise.audit).

Exit codes (specs/audit.md, "Exit codes"): 0 the log verified with no finding; 4 findings (listed); 5 alarm: the
checkpoint was refused (not the log's signature, quorum not met, backwards, inconsistent, split view); 1 the
audit could not run (unreachable source, missing tile); 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from valise import keyfiles, records
from valise.audit import proof as audit_proof
from valise.audit import quorum, state
from valise.audit.source import open_source
from valise.audit.verify import AuditState, CheckpointRefused, Report, audit
from valise.cli.main import group
from valise.errors import NoteError, UsageError
from valise.tlog import cosignature, note, proofbundle
from valise.utctime import utc

EXIT_FINDINGS = 4
EXIT_ALARM = CheckpointRefused.exit_code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = group(sub, "audit", "verify the broker's log offline: tree, signatures, policy replay, witnesses")

    def trust_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker-key", required=True, help="the log's verifier key (vkey), or a file holding it")
        p.add_argument("--witness", action="append", default=[], metavar="VKEY", help="a trusted witness vkey")
        p.add_argument("--quorum", type=int, default=None, help="how many --witness must cosign (default: all)")
        p.add_argument("--policy", type=Path, help="a quorum policy file (instead of --witness/--quorum)")

    p = g.add_parser("verify", help="verify a log: checkpoint, tree, every entry, policy replay")
    p.add_argument("--log", required=True, help="URL of a tlog-tiles server, or an exported directory")
    trust_options(p)
    p.add_argument("--state", type=Path, help="resume from (and save to) this state file")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes checking signatures")
    p.add_argument("--window", type=int, default=600, help="the broker's allowed clock window, seconds")
    p.add_argument("--tree-only", action="store_true", help="check the checkpoint and the tree, not the entries")
    p.add_argument(
        "--witness-keys", action="store_true",
        help="also list each active member's witness key as the verified log shows it, as quorum policy lines",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=verify_cmd)

    p = g.add_parser("monitor", help="follow a live log: consistency of each checkpoint, then its new entries")
    p.add_argument("--log", required=True, help="URL of a tlog-tiles server (or a directory)")
    trust_options(p)
    p.add_argument("--state", type=Path, required=True, help="the monitor's state file (written atomically)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between checkpoint fetches")
    p.add_argument("--once", action="store_true", help="check one checkpoint and exit")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes checking signatures")
    p.add_argument("--window", type=int, default=600, help="the broker's allowed clock window, seconds")
    p.add_argument("--json", action="store_true", help="one JSON line per checkpoint and per alarm")
    p.set_defaults(handler=monitor_cmd)

    p = g.add_parser("proof", help="verify an offline proof bundle (C2SP tlog-proof) that an entry is in the log")
    p.add_argument("file", type=Path, help="the proof bundle")
    trust_options(p)
    p.add_argument("--entry", type=Path, help="the entry bytes, if the bundle does not carry them")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=proof_cmd)


def trust(args: argparse.Namespace) -> quorum.QuorumPolicy:
    try:
        log = note.parse_vkey(keyfiles.vkey_text(args.broker_key))
    except NoteError as exc:
        if "+" not in args.broker_key and not Path(args.broker_key).exists():  # meant as a file: say it is not there
            raise UsageError(f"--broker-key: no file {args.broker_key}, and it is not a vkey (name+id+key)") from None
        raise UsageError(f"--broker-key: {exc.what}") from None
    if args.policy is not None:
        if args.witness or args.quorum is not None:
            raise UsageError("give either --policy or --witness/--quorum, not both")
        try:
            policy = quorum.parse(args.policy.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read {args.policy}: {exc.strerror}") from None
        if policy.log.vkey() != log.vkey():
            raise UsageError("the quorum policy names another log key than --broker-key")
        return policy
    try:
        witnesses = [cosignature.parse_vkey(keyfiles.vkey_text(w)) for w in args.witness]
    except NoteError as exc:
        raise UsageError(f"--witness: {exc.what}") from None
    k = len(witnesses) if args.quorum is None else args.quorum
    return quorum.QuorumPolicy.simple(log, witnesses, k)


class Bar:
    """A progress bar on stderr, only when it is a terminal (no dependency, redrawn at most 10 times a second)."""

    def __init__(self, out: TextIO, enabled: bool) -> None:
        self.out = out
        self.enabled = enabled and out.isatty()
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-6)
        filled = 30 * done // max(total, 1)
        self.out.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {done}/{total} entries, {rate:,.0f}/s ")
        self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()


def _executor(jobs: int) -> Executor | None:
    return ProcessPoolExecutor(jobs) if jobs > 1 else None


def _print_report(report: Report, as_json: bool, *, tree_only: bool = False) -> None:
    if as_json:
        print(json.dumps(report.to_json(), sort_keys=True))
        return
    cp = report.checkpoint
    print(f"log {cp.origin}: checkpoint of {cp.size} entries, root {cp.root.hex()}")
    print(f"cosigned by: {', '.join(report.cosigners) or 'no trusted witness'}")
    if unchecked := report.unchecked_cosigners:
        print(
            f"  not checked: cosignatures by {', '.join(unchecked)} (trust their keys with --witness or --policy; "
            "--witness-keys lists the members' keys as the log shows them, as does valise policy show)"
        )
    tree = "tied to the signed root" if report.tree_verified else "NOT tied to the signed root"
    if report.start == cp.size:
        print(f"no new entries since the held checkpoint; {tree}" if cp.size else f"an empty log; {tree}")
    elif tree_only:
        print(f"tree of {cp.size} entries: {tree}; entries not checked (--tree-only)")
        return
    else:
        print(f"verified entries {report.start}..{cp.size - 1}: {tree}")
    for f in report.findings:
        print(f.line())
    s = report.summary
    print(
        f"summary: {_n(s['entries'], 'entry', 'entries')}, {_n(s['members'], 'member')} "
        f"({s['active_members']} active), {_n(s['packets'], 'packet')}, {_n(s['acks'], 'acknowledgement')}, "
        f"{s['unacknowledged_past_expiry']} unacknowledged past expiry, {_n(s['retractions'], 'retraction')}, "
        f"{_n(s['purges'], 'purge')}, {_n(s['findings'], 'finding')}"
    )


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


def _alarm(exc: CheckpointRefused, state_path: Path | None, as_json: bool) -> int:
    kept = None
    if exc.evidence is not None and state_path is not None:
        kept = state.keep_evidence(state_path, exc.evidence, exc.held)
    if as_json:
        print(json.dumps({"alarm": exc.what, "evidence": None if kept is None else str(kept)}, sort_keys=True))
    else:
        print(f"ALARM: {exc.what}", file=sys.stderr)
        if kept is not None:
            print(f"evidence kept in {kept}", file=sys.stderr)
    return EXIT_ALARM


def verify_cmd(args: argparse.Namespace) -> int:
    policy = trust(args)
    source = open_source(args.log)
    held = state.load(args.state, policy.log) if args.state else None
    bar = Bar(sys.stderr, not args.json)
    executor = _executor(args.jobs)
    try:
        report = audit(
            source,
            policy,
            now=int(time.time()),
            state=held,
            window=args.window,
            executor=executor,
            progress=bar,
            tree_only=args.tree_only,
        )
    except CheckpointRefused as exc:
        bar.close()
        return _alarm(exc, args.state, args.json)
    finally:
        if executor is not None:
            executor.shutdown()
    bar.close()
    if args.state is not None and report.state is not None:
        state.save(args.state, report.state)
    keys = _witness_keys(report) if args.witness_keys else None
    if keys is not None and args.json:
        print(json.dumps({**report.to_json(), "witness_keys": keys}, sort_keys=True))
    else:
        _print_report(report, args.json, tree_only=args.tree_only)
        for member_id, vkey in (keys or {}).items():
            print(f"witness {member_id} {vkey}")
    return 0 if report.clean else EXIT_FINDINGS


def _witness_keys(report: Report) -> dict[str, str]:
    """Each active member's witness key (its identity key, as cosignature/v1) from the directory this audit
    replayed: what an auditor with only public material pins to check cosignatures on its next run. They come
    from the log under audit, so they say who the log claims its members are, as `policy show` does."""
    if report.state is None:
        raise UsageError("--witness-keys needs the entries verified (not --tree-only, and a tree that matched)")
    members = report.state.replay.policy.members.values()
    return {m.id: cosignature.CosignatureVerifier(m.id, m.sign_key).vkey() for m in members if m.status == "active"}


def monitor_cmd(args: argparse.Namespace) -> int:
    if not 0 < args.interval <= 86400:
        raise UsageError(f"--interval {args.interval:g} is not a number of seconds between 0 and 86400")
    policy = trust(args)
    source = open_source(args.log)
    held: AuditState | None = state.load(args.state, policy.log)
    executor = _executor(args.jobs)
    try:
        while True:
            try:
                report = audit(source, policy, now=int(time.time()), state=held, window=args.window, executor=executor)
            except CheckpointRefused as exc:
                return _alarm(exc, args.state, args.json)
            if report.state is not None:
                state.save(args.state, report.state)
                held = report.state
            _emit(report, args.json)
            if report.new_findings or report.state is None:
                return EXIT_FINDINGS
            if args.once:
                return 0
            time.sleep(args.interval)
    finally:
        if executor is not None:
            executor.shutdown()


def _emit(report: Report, as_json: bool) -> None:
    cp = report.checkpoint
    line: dict[str, Any] = {
        "size": cp.size,
        "root": cp.root.hex(),
        "new_entries": cp.size - report.start,
        "cosigners": report.cosigners,
        "tree_verified": report.tree_verified,
        "findings": [f.to_json() for f in report.new_findings],
    }
    if as_json:
        print(json.dumps(line, sort_keys=True), flush=True)
        return
    print(f"checkpoint {cp.size} ({cp.size - report.start} new entries) verified", flush=True)
    for f in report.new_findings:
        print(f"ALARM: {f.line()}", file=sys.stderr, flush=True)


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{path} is over {limit} bytes: too large for a{'n' if what[0] in 'aeiou' else ''} {what}")
    return data


def proof_cmd(args: argparse.Namespace) -> int:
    policy = trust(args)
    # Read no more than a bundle or an entry can hold: the file may be anything (a 3 GB file, /dev/zero).
    data = _read_capped(args.file, proofbundle.MAX_BUNDLE_SIZE, "proof bundle")
    entry = _read_capped(args.entry, records.ENTRY_MAX, "entry") if args.entry else None
    proven = audit_proof.verify_proof(data, policy, entry)
    info = proven.describe()
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(f"entry {proven.index} is in the log (checkpoint of {proven.size} entries, root {proven.root.hex()})")
        for k, v in info.items():
            if k not in ("index", "checkpoint_size", "root", "unchecked_cosigners"):
                print(f"  {k}: {_shown_value(k, v)}")
        if proven.unchecked_cosigners:
            print(
                f"  not checked: cosignatures by {', '.join(proven.unchecked_cosigners)} (trust their keys with "
                "--witness or --policy)"
            )
    return 0


def _shown_value(key: str, value: object) -> str:
    """A value for a person: lists joined, Unix times as UTC dates (the JSON keeps the raw values)."""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, int) and key in ("at", "created", "expires", "received") and value > 10**9:
        return utc(value)
    return str(value)
