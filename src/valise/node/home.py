"""A node's directory (an I/O edge).

Layout of `D` (created by `valise node init`):
- `config.json`    member id, identity directory, broker address, pinned log key (or none yet);
- `broker.pub`     the broker's public bundle, copied at init: its TLS certificate is pinned, its identity key
                   verifies receipts;
- `witness-policy` optional: a witness quorum policy (specs/audit.md, "Quorum"; `--witness-policy` at init or
                   `valise node set-policy`). With it, a checkpoint is used only once its cosignatures meet the
                   quorum (node/follower.py); its `log` line must be the pinned log key; read when the daemon starts;
- `node.db`, `outbox/`, `inbox/`   the durable store (node/store.py);
- `control.sock`   the control socket while the daemon runs; `node.lock` held by the running daemon.

The log key (`--log-key`, the `vkey` that `valise broker info` prints) is pinned at init and required: it is the
one root of trust a node needs. Entry 0 of the log (the genesis record) names the operator key, so the whole
directory, every member key included, is learned from the verified log, never from the broker's word.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from valise import identity, keyfiles
from valise.audit import quorum
from valise.errors import KeyFileError, NoteError, StoreError, UsageError
from valise.node import control
from valise.tlog import note

NODE_VERSION = 1


@dataclass(frozen=True, slots=True)
class NodeConfig:
    member_id: str
    identity_dir: Path
    broker_host: str
    broker_port: int
    log_vkey: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": NODE_VERSION,
                "member_id": self.member_id,
                "identity": str(self.identity_dir),
                "broker": f"{self.broker_host}:{self.broker_port}",
                "log_vkey": self.log_vkey,
            },
            indent=2,
        )


def parse_address(text: str, *, listen: bool = False) -> tuple[str, int]:
    """HOST:PORT; port 0 (let the system choose) only for an address to listen on."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if listen else 1) <= int(port) < 65536:
        raise UsageError(f"address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class NodeHome:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def broker_bundle_path(self) -> Path:
        return self.root / "broker.pub"

    @property
    def lock_path(self) -> Path:
        return self.root / "node.lock"

    @property
    def policy_path(self) -> Path:
        return self.root / "witness-policy"

    @classmethod
    def create(
        cls,
        root: Path,
        identity_dir: Path,
        broker: str,
        broker_pub: Path,
        log_vkey: str,
        witness_policy: str | None = None,
    ) -> NodeHome:
        home = cls(root)
        if home.config_path.exists():
            raise UsageError(f"{root} is already a node directory")
        control.check_socket_path(control.socket_path(root))  # refused now, not at the first `node run`
        member_id = keyfiles.find_member_id(identity_dir)
        keyfiles.load_bundle(identity_dir / f"{member_id}.pub")  # verifies it
        keyfiles.load_bundle(broker_pub)  # a broken or forged broker bundle is refused now, not at first connect
        host, port = parse_address(broker)
        given = log_vkey
        log_vkey = keyfiles.vkey_text(log_vkey)
        try:  # refused now, not at the first checkpoint as "not usable"
            note.parse_vkey(log_vkey)
        except NoteError as exc:
            if "+" not in given and not Path(given).exists():  # meant as a file, most likely
                raise UsageError(
                    f"--log-key: no file {given}, and it is not a log verifier key (name+id+key)",
                    hint="give the broker's log.vkey file or the vkey `valise broker info` prints",
                ) from None
            raise UsageError(
                f"--log-key is not a log verifier key: {exc.what}", hint="`valise broker info` gives it as vkey"
            ) from None
        if witness_policy is not None:
            check_policy(witness_policy, log_vkey)
        keyfiles.make_private_dir(root)
        shutil.copyfile(broker_pub, home.broker_bundle_path)
        if witness_policy is not None:
            keyfiles.write_public(home.policy_path, witness_policy.encode())
        config = NodeConfig(member_id, identity_dir.resolve(), host, port, log_vkey)
        keyfiles.write_public(home.config_path, config.to_json().encode() + b"\n")
        return home

    def load_identity(self, passphrase: bytes | None) -> identity.Identity:
        """The member's identity, from the directory the config names; a missing one is named with the way to
        point the node at it again (a new identity from `valise keygen` would be one the broker does not know)."""
        config = self.config()
        if not config.identity_dir.is_dir():
            raise KeyFileError(
                f"the node's identity directory {config.identity_dir} does not exist",
                hint=f"if {config.member_id}'s identity moved, point the node at it: valise node move --dir "
                f"{self.root} --identity DIR (not valise keygen: a new identity is one the broker does not know)",
            )
        me = keyfiles.load_identity(config.identity_dir, passphrase)
        if me.member_id != config.member_id:
            raise KeyFileError(f"{config.identity_dir} holds {me.member_id}'s identity, not {config.member_id}'s")
        return me

    def move_identity(self, identity_dir: Path) -> NodeConfig:
        """Point the node at its member's identity in a new place (the node or its keys moved)."""
        config = self.config()
        member_id = keyfiles.find_member_id(identity_dir)
        if member_id != config.member_id:
            raise UsageError(f"{identity_dir} holds {member_id}'s identity; this node is {config.member_id}'s")
        keyfiles.load_bundle(identity_dir / f"{member_id}.pub")  # verifies it
        config = NodeConfig(config.member_id, identity_dir.resolve(), config.broker_host, config.broker_port,
                            config.log_vkey)  # fmt: skip
        keyfiles.write_public(self.config_path, config.to_json().encode() + b"\n")
        return config

    def move_broker(self, broker: str | None, broker_pub: Path | None) -> NodeConfig:
        """Point the node at its broker's new address, or pin the broker's new bundle (a re-keyed broker). The log
        key stays: it is the node's trust anchor, and following another log needs a new node directory."""
        config = self.config()
        if broker is not None:
            host, port = parse_address(broker)
            config = NodeConfig(config.member_id, config.identity_dir, host, port, config.log_vkey)
        if broker_pub is not None:
            keyfiles.load_bundle(broker_pub)  # refused now if broken, as at init
            keyfiles.write_public(self.broker_bundle_path, broker_pub.read_bytes())
        keyfiles.write_public(self.config_path, config.to_json().encode() + b"\n")
        return config

    def set_policy(self, text: str | None) -> quorum.QuorumPolicy | None:
        """Store (or with None, remove) the witness quorum policy, after checking it against the pinned log key."""
        if text is None:
            self.policy_path.unlink(missing_ok=True)
            return None
        policy = check_policy(text, self.config().log_vkey)
        keyfiles.write_public(self.policy_path, text.encode())
        return policy

    def witness_policy(self) -> quorum.QuorumPolicy | None:
        """The stored quorum policy, parsed and checked again (None if the node has none)."""
        try:
            text = self.policy_path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.policy_path} is unreadable: {exc}") from None
        return check_policy(text, self.config().log_vkey)

    @classmethod
    def open(cls, root: Path) -> NodeHome:
        home = cls(root)
        if not home.config_path.is_file():
            raise StoreError(f"{root} is not a node directory", hint="create one with valise node init")
        if (root / "log.key").exists():  # only a broker directory has one (broker/home.py)
            raise UsageError(f"{root} is a broker directory, not a node directory", hint="give a node's --dir/--node")
        return home

    def config(self) -> NodeConfig:
        try:
            raw = json.loads(self.config_path.read_text())
            if raw.get("version") != NODE_VERSION:
                raise StoreError(f"{self.config_path} has unsupported version {raw.get('version')!r}")
            host, port = parse_address(raw["broker"])
            return NodeConfig(
                identity.check_member_id(raw["member_id"]), Path(raw["identity"]), host, port, raw["log_vkey"]
            )
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"{self.config_path} is unreadable: {exc}") from None

    def broker_bundle(self) -> identity.PublicBundle:
        return keyfiles.load_bundle(self.broker_bundle_path)


def check_policy(text: str, log_vkey: str) -> quorum.QuorumPolicy:
    """Parse a witness quorum policy for a node pinned to `log_vkey`: its `log` line must be that very key."""
    policy = quorum.parse(text)
    try:
        pinned = note.parse_vkey(log_vkey).vkey()
    except NoteError as exc:
        raise UsageError(f"the pinned log key is not usable: {exc.what}") from None
    if policy.log.vkey() != pinned:
        raise UsageError("the witness policy's 'log' line names another key than the node's pinned log key")
    return policy
