"""The broker's directory (an I/O edge): where its keys, configuration and store live.

Layout of `D` (created by `valise broker init --dir D --origin NAME`):
- `config.json`       origin of the log, the broker's member id, format version;
- `identity/`         the broker's own member identity (as made by `valise keygen`): its TLS certificate is
                      what nodes pin, and its desk may be a named recipient like any member; sealed under a
                      passphrase if `broker init --passphrase-env` was given one (so is `log.key`), which
                      `broker serve --passphrase-env` then needs;
- `operator.key`      the operator's Ed25519 key (mode 0600; sealed under a passphrase if `broker init` was given
                      one), which signs directory records and operator rules. The running broker never reads it:
                      it may be moved off the machine, and operator commands told where it is (`--operator-key`);
- `log.key`           the log's Ed25519 key (mode 0600), which signs checkpoints (a C2SP signed-note key);
- `log.vkey`          its public half as a note verifier key (what nodes and auditors pin), so that reading the
                      log never needs the private key;
- `broker.db`         the SQLite store: the log, its hashes and checkpoints;
- `mailbox.db`, `spool/`  the delivery queues and packet bodies (broker/mailbox.py, broker/spool.py);
- `policy.lock`       serialises writers of policy records;
- `serve.lock`        held by the running broker: one per directory;
- `checkpoint.cosigned`  the latest checkpoint with its cosignatures, for `valise log export`.

Three keys with three jobs: the operator key can be kept offline (and under a passphrase) without stopping the
log, and a compromised log key cannot forge admissions. When the log key is sealed, only the running broker
signs checkpoints: operator commands append their records and leave the signature to it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valise import encoding, identity, keyfiles
from valise.crypto import sign
from valise.errors import EncodingError, KeyFileError, NoteError, StoreError, UsageError
from valise.logservice import LogService
from valise.store import sqlfile
from valise.store.base import LogStorage
from valise.tlog import note

HOME_VERSION = 1
SEED_FILE_MAX = 1024


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    origin: str
    broker_id: str


def write_seed_file(path: Path, kind: str, seed: bytes, passphrase: bytes | None = None) -> None:
    """A key seed, mode 0600; with a passphrase, sealed as members' key files are (Argon2id, then SecretBox)."""
    if passphrase is None:
        keyfiles.write_private(path, encoding.pack({"v": 1, "kind": kind, "seed": seed}))
    else:
        keyfiles.write_private(path, keyfiles.seal_secrets({"kind": kind, "seed": seed}, passphrase))


def _member_key_file(plain: bytes) -> str | None:
    """The member id, if `plain` holds a member's identity secrets (keyfiles.save_identity), not a seed."""
    try:
        m = encoding.decode(plain, what="key file", max_size=SEED_FILE_MAX)
    except EncodingError:
        return None
    member = m.get("id") if isinstance(m, dict) and "sign_seed" in m else None
    return member if isinstance(member, str) else None


def read_seed_file(path: Path, kind: str, passphrase: bytes | None = None) -> sign.SigningKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        hint = "kept elsewhere? give its file with --operator-key FILE" if kind == "operator" else None
        raise KeyFileError(f"cannot read {kind} key {path}: {exc.strerror}", hint=hint) from None
    if os.stat(path).st_mode & 0o077:
        raise KeyFileError(f"{path} is readable by others", hint=f"chmod 600 {path}")
    if len(data) > SEED_FILE_MAX:
        raise KeyFileError(f"{path} is {len(data)} bytes, too large for a {kind} key")
    plain = data
    try:
        if keyfiles.is_sealed(data):
            plain = keyfiles.open_sealed(data, passphrase, what=f"{kind} key {path}")
            m = encoding.unpack_map(
                plain, what=f"{kind} key", max_size=SEED_FILE_MAX, fields={"kind": str, "seed": bytes}
            )
        else:
            m = encoding.unpack_map(
                data, what=f"{kind} key", max_size=SEED_FILE_MAX, fields={"v": int, "kind": str, "seed": bytes}
            )
            if passphrase is not None:  # the person believes the key is protected: say it is not
                keyfiles.log.warning(
                    "valise: warning: %s key %s is not encrypted; the passphrase given is not used", kind, path
                )
    except EncodingError as exc:
        if (member := _member_key_file(plain)) is not None:  # a mix-up of files, not damage: say which file it is
            raise KeyFileError(f"{path} is {member}'s identity key, not the {kind} key") from None
        raise KeyFileError(f"{path} is damaged: {exc.what}") from None
    if m["kind"] != kind or len(m["seed"]) != 32:
        raise KeyFileError(f"{path} is not a {kind} key")
    return sign.SigningKey(m["seed"])


def check_origin(origin: str) -> str:
    """A log origin (C2SP tlog-checkpoint): non-empty printable ASCII without spaces or '+', ≤ 128 chars."""
    if not origin or len(origin) > 128 or any(not ("!" <= c <= "~") or c == "+" for c in origin):
        raise UsageError(
            f"origin {origin!r} is not valid", hint="use printable ASCII without spaces or '+', e.g. valise.example/log"
        )
    return origin


class BrokerHome:
    """Paths and keys of one broker directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def identity_dir(self) -> Path:
        return self.root / "identity"

    @property
    def operator_key_path(self) -> Path:
        return self.root / "operator.key"

    @property
    def log_key_path(self) -> Path:
        return self.root / "log.key"

    @property
    def log_vkey_path(self) -> Path:
        return self.root / "log.vkey"

    @property
    def db_path(self) -> Path:
        return self.root / "broker.db"

    @property
    def cosigned_path(self) -> Path:
        """The latest checkpoint with its witnesses' cosignatures, as the running broker publishes it (the store
        keeps the log's signature only): what `valise log export` writes when it is of the latest tree."""
        return self.root / "checkpoint.cosigned"

    @property
    def mailbox_path(self) -> Path:
        """The delivery queues, and who may read each log entry (broker/mailbox.py)."""
        return self.root / "mailbox.db"

    @property
    def serve_lock_path(self) -> Path:
        """flock()ed by the running broker (`valise broker serve`): one per directory."""
        return self.root / "serve.lock"

    @property
    def policy_lock_path(self) -> Path:
        """flock()ed by whoever appends policy records (operator commands, the daemon for member statements), so
        that each checks its record against the log as it will stand when the record lands."""
        return self.root / "policy.lock"

    @classmethod
    def create(
        cls,
        root: Path,
        origin: str,
        broker_id: str,
        random: identity.Random,
        now: int,
        operator_passphrase: bytes | None = None,
        passphrase: bytes | None = None,
    ) -> BrokerHome:
        """Create the directory, the broker identity, the operator and log keys: the operator key sealed with
        `operator_passphrase` if given, the identity and the log key with `passphrase`. Refuses to overwrite."""
        check_origin(origin)
        if "://" in origin:  # C2SP: an origin is a schema-less URL
            raise UsageError(f"origin {origin!r} has a scheme", hint="leave it out, e.g. valise.example/log")
        identity.check_member_id(broker_id)
        home = cls(root)
        if home.config_path.exists():
            raise UsageError(f"{root} is already a broker directory")
        keyfiles.make_private_dir(root)
        keyfiles.save_identity(home.identity_dir, identity.generate(broker_id, random, now), passphrase)
        write_seed_file(home.operator_key_path, "operator", random(32), operator_passphrase)
        log_seed = random(32)
        write_seed_file(home.log_key_path, "log", log_seed, passphrase)
        vkey = note.Ed25519Signer(origin, sign.SigningKey(log_seed)).verifier().vkey()
        keyfiles.write_public(home.log_vkey_path, vkey.encode() + b"\n")
        keyfiles.write_public(
            home.config_path,
            json.dumps({"version": HOME_VERSION, "origin": origin, "broker_id": broker_id}, indent=2).encode() + b"\n",
        )
        return home

    @classmethod
    def open(cls, root: Path) -> BrokerHome:
        home = cls(root)
        if not home.config_path.is_file():
            raise StoreError(f"{root} is not a broker directory", hint="create one with valise broker init")
        if not home.log_key_path.exists() and (root / "broker.pub").exists():  # a node's pinned broker bundle
            raise UsageError(f"{root} is a node directory, not a broker directory", hint="give the broker's --dir")
        if sqlfile.is_blank(home.db_path):  # `broker init` made it: SQLite would make a new, empty log in its place
            raise StoreError(
                f"{home.db_path} is missing or empty: the broker's log is lost",
                hint="restore broker.db, with mailbox.db, from a backup of the broker directory",
            )
        return home

    def config(self) -> BrokerConfig:
        try:
            raw = json.loads(self.config_path.read_text())
            if raw.get("version") != HOME_VERSION:
                raise StoreError(f"{self.config_path} has unsupported version {raw.get('version')!r}")
            return BrokerConfig(
                origin=check_origin(raw["origin"]), broker_id=identity.check_member_id(raw["broker_id"])
            )
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"{self.config_path} is unreadable: {exc}") from None

    def operator_key(self, path: Path | None = None, passphrase: bytes | None = None) -> sign.SigningKey:
        """The operator key, from `path` if it is kept elsewhere (offline, say) or else from the directory."""
        return read_seed_file(path or self.operator_key_path, "operator", passphrase)

    def log_key(self, passphrase: bytes | None = None) -> sign.SigningKey:
        return read_seed_file(self.log_key_path, "log", passphrase)

    def log_key_sealed(self) -> bool:
        """Whether the log key is under a passphrase (then only `broker serve`, which is given it, signs)."""
        try:
            return keyfiles.is_sealed(self.log_key_path.read_bytes())
        except OSError as exc:
            raise KeyFileError(f"cannot read log key {self.log_key_path}: {exc.strerror}") from None

    def log_verifier(self) -> note.Ed25519Verifier:
        """The log's public key, from `log.vkey`; from the log key itself in a directory made before that file."""
        origin = self.config().origin
        try:
            text = self.log_vkey_path.read_text()
        except FileNotFoundError:
            return note.Ed25519Signer(origin, self.log_key()).verifier()
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.log_vkey_path} is unreadable: {exc}") from None
        try:
            verifier = note.parse_vkey(text.strip())
        except NoteError as exc:
            raise StoreError(f"{self.log_vkey_path} is damaged: {exc.what}") from None
        if verifier.name != origin:
            raise StoreError(f"{self.log_vkey_path} names log {verifier.name!r}, not this broker's {origin!r}")
        return verifier

    def log_service(
        self, store: LogStorage, passphrase: bytes | None = None, *, signing: bool = False, **cadence: Any
    ) -> LogService:
        """The log over `store`: able to sign when the log key is not sealed or `passphrase` opens it, else (unless
        `signing` is asked for) able to append and read only: the running broker, given the passphrase, signs."""
        verifier = self.log_verifier()
        if passphrase is None and not signing and self.log_key_sealed():
            return LogService(store, self.config().origin, None, verifier=verifier, **cadence)
        key = self.log_key(passphrase)
        if key.public != verifier.public:
            raise StoreError(f"{self.log_key_path} is not the key of {self.log_vkey_path}")
        return LogService(store, self.config().origin, key, **cadence)

    def broker_identity(self, passphrase: bytes | None = None) -> identity.Identity:
        return keyfiles.load_identity(self.identity_dir, passphrase)

    def broker_bundle(self) -> identity.PublicBundle:
        """The broker's public bundle (never needs its private keys)."""
        return keyfiles.load_bundle(self.broker_bundle_path)

    @property
    def broker_bundle_path(self) -> Path:
        return self.identity_dir / f"{self.config().broker_id}.pub"
