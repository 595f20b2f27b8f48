"""`valise demo`: a broker and four members as real daemons on 127.0.0.1, driven through the real CLI.

Everything here is what a person would type: `valise keygen`, `broker init`, `broker member add`, `policy grant`,
`broker serve`, `node init`, `node run`, `send`, `inbox`, `read`, `retract`, `status`, then an audit of the log
read back over HTTP (tlog-tiles). The daemons are separate processes; the demo talks to them only through their
sockets. It exits 0 only if every step verified.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from valise.errors import Error

ORIGIN = "demo.valise/log"
MEMBERS = {  # id: (kind, region, display name)
    "FRA": ("country", "europe", "France national bureau"),
    "DEU": ("country", "europe", "Germany national bureau"),
    "NGA": ("country", "africa", "Nigeria national bureau"),
    "ACME": ("partner", "europe", "ACME Threat Research (private partner)"),
}
START_TIMEOUT = 30.0


def stix_bundle(name: str, pattern: str) -> bytes:
    """A small STIX 2.1 bundle with one indicator (ids are fixed so the demo reads the same every time)."""
    return json.dumps(
        {
            "type": "bundle",
            "id": f"bundle--{name}",
            "objects": [
                {
                    "type": "indicator",
                    "spec_version": "2.1",
                    "id": f"indicator--{name}",
                    "created": "2026-11-25T00:00:00.000Z",
                    "modified": "2026-11-25T00:00:00.000Z",
                    "name": name,
                    "pattern": pattern,
                    "pattern_type": "stix",
                    "valid_from": "2026-11-25T00:00:00Z",
                }
            ],
        },
        indent=1,
    ).encode()


class DemoFailure(Error):
    """A step of the demo did not verify."""


@dataclass
class Demo:
    root: Path
    say: Callable[[str], None]
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    step_no: int = 0
    sends: int = 0

    # --- plumbing ----------------------------------------------------------------------------------------

    def step(self, title: str) -> None:
        self.step_no += 1
        self.say(f"\n[{self.step_no}] {title}")

    def valise(self, *args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "valise", *args], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode not in ok:
            raise DemoFailure(f"`valise {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return proc

    def json_of(self, *args: str, ok: tuple[int, ...] = (0,)) -> Any:
        out = self.valise(*args, ok=ok).stdout.strip().splitlines()
        return json.loads(out[-1])

    def start(self, name: str, *args: str, ready: Callable[[str], bool] | None = None) -> str:
        """Start a daemon; return its first line of output (read until `ready` accepts a line)."""
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - the daemon writes to it until stopped
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "valise", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.procs[name] = proc
        if ready is None:
            return ""
        deadline = time.monotonic() + START_TIMEOUT
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if ready(line):
                return line
        raise DemoFailure(f"{name} did not start (see {self.root / f'{name}.log'})")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        raise DemoFailure(f"timed out waiting for {what}")

    # --- the story -----------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        keys, broker = self.root / "keys", self.root / "broker"
        self.step("Identities: each member makes its own keys (identity, encryption, TLS)")
        for member in MEMBERS:
            self.valise("keygen", "--id", member, "--out", str(keys / member))
            self.say(f"    {member}: {keys / member / (member + '.pub')}")

        self.step("The operator creates the broker and its transparency log, and admits the members")
        info = self.json_of("broker", "init", "--dir", str(broker), "--origin", ORIGIN, "--json")
        vkey = info["vkey"]
        self.say(f"    log origin {ORIGIN}; checkpoint key (pinned by nodes and auditors):\n    {vkey}")
        for member, (kind, region, name) in MEMBERS.items():
            self.valise(
                "broker",
                "member",
                "add",
                "--dir",
                str(broker),
                "--bundle",
                str(keys / member / f"{member}.pub"),
                "--kind",
                kind,
                "--region",
                region,
                "--name",
                name,
            )
            self.say(f"    admitted {member} ({kind}, {region})")
        self.valise("broker", "group", "create", "--dir", str(broker), "--name", "europe")
        for member in ("FRA", "DEU", "ACME"):
            self.valise("broker", "group", "add", "--dir", str(broker), "--name", "europe", "--id", member)
        self.valise("broker", "rule", "ban-category", "--dir", str(broker), "--category", "political")
        self.say("    group 'europe' = FRA, DEU, ACME; operator rule: category 'political' is banned")

        self.step("Members sign their own sharing agreements (the broker can only enforce them)")
        statements = [
            ("FRA", "grant", "--to", "group:europe", "AMBER", "malware,phishing"),
            ("DEU", "accept", "--from", "FRA", "AMBER", "malware,phishing"),
            ("ACME", "accept", "--from", "FRA", "AMBER", "malware"),
            ("FRA", "grant", "--to", "NGA", "GREEN", ""),
            ("DEU", "grant", "--to", "NGA", "AMBER", "malware"),
            ("FRA", "grant", "--to", "DEU", "AMBER", "political"),
            ("DEU", "accept", "--from", "FRA", "AMBER", "political"),
        ]
        files = []
        for n, (author, verb, flag, party, tlp, cats) in enumerate(statements):
            out = self.root / "statements" / f"{n:02d}-{author}-{verb}.stmt"
            out.parent.mkdir(exist_ok=True)
            extra = ["--category", cats] if cats else []
            self.valise(
                "policy",
                verb,
                "--identity",
                str(keys / author),
                "--origin",
                ORIGIN,
                flag,
                party,
                "--tlp",
                tlp,
                *extra,
                "-o",
                str(out),
            )
            files.append(str(out))
            self.say(
                f"    {author} {verb}s {party.replace('group:', 'group ')} up to TLP:{tlp} ({cats or 'any category'})"
            )
        self.valise("broker", "statement", "add", "--dir", str(broker), *files)
        self.say("    NGA signs nothing for DEU: that pair does not consent")

        self.step("The broker and the four member nodes start as daemons on 127.0.0.1")
        line = self.start(
            "broker",
            "broker",
            "serve",
            "--dir",
            str(broker),
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--serve-entries",  # the demo's auditor reads the entries over HTTP; loopback only
            "--checkpoint-interval",
            "0.5",
            ready=lambda s: "listening on" in s,
        )
        addr = line.split("listening on ")[1].split(",")[0].strip()
        http = line.split("http://")[1].strip().rstrip("/") if "http://" in line else ""
        self.say(f"    broker at {addr}, log tiles at http://{http}/")
        nodes = {m: self.root / m for m in MEMBERS}
        for member, d in nodes.items():
            self.valise(
                "node",
                "init",
                "--dir",
                str(d),
                "--identity",
                str(keys / member),
                "--broker",
                addr,
                "--broker-pub",
                info["broker_pub"],
                "--log-key",
                vkey,
            )
            self.start(f"node-{member}", "node", "run", "--dir", str(d))
        for member, d in nodes.items():
            self.wait_for(f"{member} to connect", functools.partial(self.connected, d))
        self.say("    every node connected over mutual TLS and verified the log from its pinned key")
        reply = self.json_of(
            "policy", "accept", "--node", str(nodes["NGA"]), "--from", "FRA", "--tlp", "GREEN", "--json"
        )
        self.say(
            f"    NGA's node signs 'NGA accepts FRA up to TLP:GREEN' and sends it: logged at index {reply['index']}"
        )

        self.step("Sending STIX 2.1 bundles")
        sent, denied = [], []
        bundle = self.root / "phishing-campaign.json"
        bundle.write_bytes(stix_bundle("phishing-campaign", "[url:value = 'http://login-bank.example/']"))
        r = self.send(nodes["FRA"], "group:europe", "AMBER", "phishing", bundle)
        sent.append(r)
        self.say(f"    FRA -> group europe (DEU, ACME), AMBER phishing: {self.outcome(r)}")
        if r.get("ok"):
            raise DemoFailure("ACME accepted only 'malware' from FRA: a phishing packet to it must be denied")
        denied.append({"from": "FRA", **r})
        botnet = self.root / "botnet-c2.json"
        botnet.write_bytes(stix_bundle("botnet-c2", "[ipv4-addr:value = '203.0.113.7']"))
        r = self.send(nodes["FRA"], "DEU,ACME", "AMBER", "malware", botnet)
        sent.append(r)
        self.say(f"    FRA -> DEU, ACME, AMBER malware: {self.outcome(r)}")
        r = self.send(nodes["FRA"], "NGA", "GREEN", "malware", botnet)
        sent.append(r)
        self.say(f"    FRA -> NGA, GREEN malware: {self.outcome(r)}")
        r = self.send(nodes["DEU"], "NGA", "AMBER", "malware", botnet)
        self.say(f"    DEU -> NGA, AMBER malware: {self.outcome(r)}")
        denied.append({"from": "DEU", **r})
        r = self.send(nodes["FRA"], "DEU", "AMBER", "political", bundle)
        self.say(f"    FRA -> DEU, AMBER political: {self.outcome(r)}")
        denied.append({"from": "FRA", **r})
        mistake = self.send(nodes["FRA"], "DEU", "AMBER", "phishing", bundle)
        sent.append(mistake)
        self.say(f"    FRA -> DEU, AMBER phishing (sent by mistake): {self.outcome(mistake)}")
        relayed = [s for s in sent if s.get("state") == "receipted"]
        if len(relayed) != 3 or len(denied) != 3 or any(d.get("ok") for d in denied):
            raise DemoFailure("the relays and denials are not the expected ones")

        self.step("Recipients receive, verify and acknowledge; senders get the signed acknowledgements")
        expect = {"DEU": 2, "ACME": 1, "NGA": 1}
        for member, n in expect.items():
            self.wait_for(f"{member}'s inbox", functools.partial(self.holds, nodes[member], n))
        for member in expect:
            for item in self.inbox(nodes[member]):
                self.say(
                    f"    {member} holds {item['id'][:12]}… from {item['from']}, TLP:{item['labels'].get('tlp')}"
                    f" {','.join(item['labels'].get('categories', []))} (acknowledged: {item['acked']})"
                )
        retracted = self.json_of(
            "retract", "--node", str(nodes["FRA"]), mistake["id"], "--reason", "sent to the wrong desk", "--json"
        )
        if retracted.get("id") != mistake["id"]:
            raise DemoFailure(f"the broker logged the retraction of {retracted.get('id')}, not {mistake['id']}")
        self.say(f"    FRA retracts {mistake['id'][:12]}… (log index {retracted['index']}); DEU is told to discard it")
        self.wait_for(
            "the retraction to reach DEU",
            lambda: any(i["id"] == mistake["id"] and i["state"] == "retracted" for i in self.inbox(nodes["DEU"])),
        )
        item = next(i for i in self.inbox(nodes["NGA"]))
        out = self.root / "NGA-received.json"
        self.valise("read", "--node", str(nodes["NGA"]), item["id"], "-o", str(out))
        if out.read_bytes() != botnet.read_bytes():
            raise DemoFailure("NGA decrypted something else than FRA sent")
        self.say(f"    NGA decrypts {item['id'][:12]}…: byte for byte what FRA sealed")
        self.wait_for("acknowledgements at FRA", lambda: self.acks(nodes["FRA"]) >= 3, timeout=30)

        rotation, after_move = self.rotate(nodes, keys, broker, item["id"], botnet)
        relayed.append(after_move)

        self.step("The log: checkpoint signed by the broker, cosigned by the member nodes as witnesses")

        def cosigned() -> bool:
            cp = self.fetch(http, "/checkpoint").decode()
            return cp.count("\n— ") >= 2

        self.wait_for("cosignatures", cosigned, timeout=20)
        checkpoint = self.fetch(http, "/checkpoint").decode()
        for line in checkpoint.splitlines():
            self.say(f"    {line}")
        statuses = {m: self.status(d) for m, d in nodes.items()}
        alarms = [a for s in statuses.values() for a in s.get("alarms", [])]
        if alarms:
            raise DemoFailure(f"a node raised an alarm: {alarms[0]}")

        self.step("Audit: read the log back over HTTP and check every signature and proof")
        audit = self.audit(http, vkey)
        self.say(f"    {audit['summary']}")
        if not audit["ok"]:
            raise DemoFailure(f"the audit found problems: {audit.get('findings')}")

        self.summary = {
            "ok": True,
            "dir": str(self.root),
            "sent": self.sends,
            "relayed": len(relayed),
            "delivered": {m: len(self.inbox(nodes[m])) for m in expect},
            "acknowledged": self.acks(nodes["FRA"]),
            "denied": [
                {"from": d["from"], "to": d.get("to"), "reasons": d.get("reasons") or d.get("error")} for d in denied
            ],
            "retracted": 1,
            "rotation": rotation,
            "log_size": int(checkpoint.splitlines()[1]),
            "checkpoint": checkpoint,
            "audit": audit,
            "broker": addr,
            "http": f"http://{http}/",
            # With --dir the state stays; these run it again where it stopped (the nodes know the broker's port).
            "restart": [
                f"valise broker serve --dir {shlex.quote(str(broker))} --listen {addr} --http {http} --serve-entries &",
                *(f"valise node run --dir {shlex.quote(str(d))} &" for d in nodes.values()),
            ],
        }
        return self.summary

    def rotate(
        self, nodes: dict[str, Path], keys: Path, broker: Path, earlier: str, payload: Path
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """NGA suspects its keys were stolen and moves to new ones; what it received and sent before stays valid.
        Returns what the summary says of it, and the reply to the packet FRA sends NGA after the move."""
        self.step("A member moves to new keys (a suspected compromise); nothing it received or sent is lost")
        node = nodes["NGA"]
        self.procs["node-NGA"].send_signal(signal.SIGTERM)
        self.procs["node-NGA"].wait(timeout=15)
        new = keys / "NGA-2"
        made = self.json_of("keygen", "--rotate", str(keys / "NGA"), "--origin", ORIGIN, "--out", str(new), "--json")
        request = Path(made["request"]).name
        self.say(f"    NGA makes new identity, encryption and TLS keys; its old key signs the hand-over, {request}")
        logged = self.json_of("broker", "member", "rekey", "--dir", str(broker), "--request", made["request"], "--json")
        self.say(f"    the operator logs it at index {logged['index']}: the broker now refuses NGA's old certificate")
        self.valise("node", "move", "--dir", str(node), "--identity", str(new))
        self.start("node-NGA-2", "node", "run", "--dir", str(node))
        self.wait_for("NGA to connect with its new keys", functools.partial(self.connected, node))
        before = self.root / "NGA-received-before.json"
        read = self.valise("read", "--node", str(node), earlier, "-o", str(before))
        if before.read_bytes() != payload.read_bytes() or "replaced" not in read.stderr:
            raise DemoFailure("NGA could not read, or was not warned about, what was sealed to its replaced key")
        self.say(f"    NGA still reads {earlier[:12]}…, sealed to its old key (and is warned that a thief could too)")
        # FRA seals to NGA's new key once FRA's verified log shows the rekey.
        self.wait_for("FRA's node to see NGA's new keys", lambda: self.log_size(nodes["FRA"]) > logged["index"])
        r = self.send(nodes["FRA"], "NGA", "GREEN", "malware", payload)
        if r.get("state") != "receipted":
            raise DemoFailure(f"FRA's packet to NGA after the move was not relayed: {self.outcome(r)}")
        self.wait_for("NGA's inbox", functools.partial(self.holds, node, 2))
        after = self.root / "NGA-received-after.json"
        read = self.valise("read", "--node", str(node), r["id"], "-o", str(after))
        if after.read_bytes() != payload.read_bytes() or "replaced" in read.stderr:
            raise DemoFailure("NGA could not read what FRA sealed to its new key")
        self.say(f"    FRA -> NGA after the move: {self.outcome(r)}; sealed to NGA's new key, read without warning")
        return {"member": "NGA", "rekey_index": logged["index"], "read_before": True, "relayed_after": r["id"]}, r

    # --- helpers over the CLI ------------------------------------------------------------------------------------

    def status(self, node: Path) -> dict[str, Any]:
        proc = self.valise("status", "--node", str(node), "--json", ok=(0, 1, 3))  # 3: not running (yet)
        try:
            return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return {}

    def log_size(self, node: Path) -> int:
        return int(self.status(node).get("log", {}).get("size", 0))

    def connected(self, node: Path) -> bool:
        return bool(self.status(node).get("connected"))

    def holds(self, node: Path, n: int) -> bool:
        return len(self.inbox(node)) >= n

    def inbox(self, node: Path) -> list[dict[str, Any]]:
        items = self.json_of("inbox", "--node", str(node), "--json")
        return list(items if isinstance(items, list) else items.get("items", []))

    def acks(self, node: Path) -> int:
        return int(self.status(node).get("acknowledgements", 0))

    def send(self, node: Path, to: str, tlp: str, cats: str, payload: Path) -> dict[str, Any]:
        self.sends += 1
        args = ["send", "--node", str(node), "--to", to, "--tlp", tlp, "--category", cats, "--wait", "20", "--json"]
        return dict(self.json_of(*args, str(payload), ok=(0, 3)))

    @staticmethod
    def outcome(reply: dict[str, Any]) -> str:
        if reply.get("state") == "receipted":
            return f"relayed, receipt for log index {reply['index']}"
        reasons = reply.get("reasons")
        if reasons:
            return "DENIED — " + "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        return str(reply.get("error") or reply.get("state"))

    @staticmethod
    def fetch(http: str, path: str) -> bytes:
        with urllib.request.urlopen(f"http://{http}{path}", timeout=10) as resp:
            return bytes(resp.read())

    def audit(self, http: str, vkey: str) -> dict[str, Any]:
        proc = self.valise("audit", "verify", "--log", f"http://{http}", "--broker-key", vkey, "--json", ok=(0, 4, 5))
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        findings = result.get("findings", [])
        summary = result.get("summary", {})
        text = (
            f"{summary.get('entries', '?')} entries, {summary.get('packets', '?')} packets, "
            f"{summary.get('acks', '?')} acknowledgements: "
            + ("every signature, proof and policy decision verified" if not findings else f"{len(findings)} finding(s)")
        )
        return {"ok": proc.returncode == 0 and not findings, "summary": text, "findings": findings}


def run(directory: Path | None, as_json: bool) -> int:
    keep = directory is not None
    root = directory if directory is not None else Path(tempfile.mkdtemp(prefix="valise-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise DemoFailure(f"{root} is not empty", hint="give a new or empty --dir")

    def say(text: str) -> None:
        if not as_json:
            print(text, flush=True)

    demo = Demo(root, say)
    say("valise demo: a neutral broker relays end-to-end encrypted intelligence between members that do not")
    say("trust each other, enforces only what they signed, and logs every relay in a witnessed Merkle log.")
    try:
        summary = demo.run()
    except Error as exc:
        summary = {"ok": False, "error": str(exc), "dir": str(root)}
    finally:
        demo.stop_all()
    if summary["ok"] and not keep:
        shutil.rmtree(root, ignore_errors=True)
        for gone in ("dir", "restart"):  # nothing is left there to look at or restart
            summary.pop(gone, None)
    if as_json:
        print(json.dumps(summary))
    elif summary["ok"]:
        say(f"\nEverything verified. State kept in {root}" if keep else "\nEverything verified.")
        if keep:
            say(
                "To look around: valise policy show --dir "
                + str(root / "broker")
                + "; valise status --node "
                + str(root / "FRA")
            )
            say("To run it again where it stopped:")
            for command in summary["restart"]:
                say(f"    {command}")
    else:
        say(f"\nDEMO FAILED: {summary['error']}\n(state kept in {root})")
    return 0 if summary["ok"] else 1
