"""Key files at rest (an I/O edge; the formats are in specs/packet.md, "Key files").

A key directory holds, for member ID:
- `ID.key`      private keys, canonical msgpack, mode 0600; sealed with XSalsa20-Poly1305 (secretbox) under a
                key derived by Argon2id from a passphrase when one is given;
- `ID.pub`      the public bundle others import;
- `ID.tls.crt`  the TLS certificate (PEM) and `ID.tls.key` its private key (PKCS#8 PEM, mode 0600, encrypted
                with the same passphrase when one is given), in the forms the `ssl` module loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils
from cryptography.hazmat.primitives import serialization

from valise import encoding
from valise.errors import EncodingError, Error, KeyFileError, PassphraseError, UsageError
from valise.identity import Identity, PublicBundle, check_member_id

KEYFILE_VERSION = 1
KEYFILE_MAX_SIZE = 16384
# Argon2id cost: libsodium's "moderate" profile (3 passes, 256 MiB), about half a second here. Key files are
# opened once per daemon start or CLI call, and a stolen file must resist offline guessing.
ARGON2_OPS = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
ARGON2_MEM = nacl.pwhash.argon2id.MEMLIMIT_MODERATE

log = logging.getLogger("valise.keys")


def passphrase_from_env(var: str | None) -> bytes | None:
    """Read a passphrase from environment variable `var` (never from the command line, where `ps` sees it)."""
    if var is None:
        return None
    value = os.environ.get(var)
    if value is None:
        raise PassphraseError(f"environment variable {var} is not set", hint="export it, or leave out --passphrase-env")
    if not value:
        raise PassphraseError(f"environment variable {var} is empty")
    return value.encode()


def write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the start (never world-readable, even for an instant)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def make_private_dir(path: Path) -> None:
    """Create `path` (and its parents) readable by its owner only: a node's or broker's directory holds who sent
    what to whom (mailboxes, inboxes, the full log) even where the packets themselves stay encrypted."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:  # named by the file asked for, not by our scratch file beside it (callers catch OSError)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def seal_secrets(secrets: dict[str, Any], passphrase: bytes | None) -> bytes:
    plain = encoding.pack(secrets)
    if passphrase is None:
        return encoding.pack({"v": KEYFILE_VERSION, "kdf": "none", "data": plain})
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    key = nacl.pwhash.argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase, salt, ARGON2_OPS, ARGON2_MEM)
    box = nacl.secret.SecretBox(key).encrypt(plain)
    return encoding.pack(
        {
            "v": KEYFILE_VERSION,
            "kdf": "argon2id",
            "salt": salt,
            "ops": ARGON2_OPS,
            "mem": ARGON2_MEM,
            "data": bytes(box),
        }
    )


def open_secrets(data: bytes, passphrase: bytes | None, *, what: str) -> dict[str, Any]:
    """The secrets of a member's key file (checked field by field)."""
    fields: dict[str, type | tuple[type, ...]] = {
        "id": str, "sign_seed": bytes, "enc_private": bytes, "tls_private": bytes, "bundle": bytes,
    }  # fmt: skip
    try:
        value = encoding.unpack(open_sealed(data, passphrase, what=what), what=what, max_size=KEYFILE_MAX_SIZE)
        if isinstance(value, dict) and "enc_previous" in value:  # encryption keys moved from (keygen --rotate)
            fields["enc_previous"] = list
        return encoding.check_map(value, what=what, fields=fields)
    except EncodingError as exc:
        raise KeyFileError(f"{what} is damaged: {exc.what}") from None


def is_encrypted(directory: Path) -> bool:
    """Whether the identity in `directory` is under a passphrase (so its daemon needs --passphrase-env)."""
    try:
        data = (directory / f"{find_member_id(directory)}.key").read_bytes()
        head = encoding.unpack(data, what="key file", max_size=KEYFILE_MAX_SIZE)
    except (Error, OSError):
        return False
    return isinstance(head, dict) and head.get("kdf") not in (None, "none")


def is_sealed(data: bytes) -> bool:
    """Whether `data` looks like the output of `seal_secrets` (a map with a `kdf`), protected or not."""
    try:
        head = encoding.unpack(data, what="key file", max_size=KEYFILE_MAX_SIZE)
    except EncodingError:
        return False
    return isinstance(head, dict) and "kdf" in head


def open_sealed(data: bytes, passphrase: bytes | None, *, what: str) -> bytes:
    """The plaintext `seal_secrets` sealed: Argon2id and SecretBox when a passphrase protects it."""
    try:
        head = encoding.unpack(data, what=what, max_size=KEYFILE_MAX_SIZE)
        if not isinstance(head, dict) or head.get("v") != KEYFILE_VERSION:
            raise KeyFileError(f"{what} is not a version {KEYFILE_VERSION} valise key file")
        kdf = head.get("kdf")
        if kdf == "none":
            head = encoding.check_map(head, what=what, fields={"v": int, "kdf": str, "data": bytes})
            plain = head["data"]
            if passphrase is not None:  # harmless, but the person believes the key is protected: say it is not
                log.warning("valise: warning: %s is not encrypted; the passphrase given is not used", what)
        elif kdf == "argon2id":
            head = encoding.check_map(
                head, what=what, fields={"v": int, "kdf": str, "salt": bytes, "ops": int, "mem": int, "data": bytes}
            )
            if passphrase is None:
                raise PassphraseError(f"{what} is encrypted", hint="pass --passphrase-env VAR")
            # Bound the work a crafted file can demand before we spend it (at most libsodium's "sensitive" level,
            # about a second and 1 GiB), and refuse what libsodium would reject with an error of its own.
            argon = nacl.pwhash.argon2id
            if not (
                argon.OPSLIMIT_MIN <= head["ops"] <= argon.OPSLIMIT_SENSITIVE
                and argon.MEMLIMIT_MIN <= head["mem"] <= argon.MEMLIMIT_SENSITIVE
                and len(head["salt"]) == argon.SALTBYTES
            ):
                raise KeyFileError(
                    f"{what} asks for unreasonable key-derivation parameters (ops {head['ops']}, mem {head['mem']})"
                )
            try:
                key = argon.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase, head["salt"], head["ops"], head["mem"])
            except (ValueError, RuntimeError) as exc:  # nacl's own ValueError is one of these
                raise KeyFileError(f"{what}: key derivation failed: {exc}") from None
            try:
                plain = nacl.secret.SecretBox(key).decrypt(head["data"])
            except nacl.exceptions.CryptoError:
                raise PassphraseError(f"the passphrase does not open {what}") from None
        else:
            raise KeyFileError(f"{what} uses unknown key protection {kdf!r}")
        return bytes(plain)
    except EncodingError as exc:
        raise KeyFileError(f"{what} is damaged: {exc.what}") from None


def save_identity(directory: Path, identity: Identity, passphrase: bytes | None) -> Path:
    """Write the identity's files into `directory`; refuse to overwrite an existing identity."""
    sealed = seal_secrets(identity.secrets(), passphrase)
    if len(sealed) > KEYFILE_MAX_SIZE:  # refused before anything is written: a file loading refuses is useless
        raise UsageError(
            f"the key file would be {len(sealed)} bytes, over the limit of {KEYFILE_MAX_SIZE}: it keeps "
            f"{len(identity.enc_previous)} replaced encryption keys",
            hint="rotate with --keep-encryption-key, or start from a directory that keeps fewer replaced keys",
        )
    directory.mkdir(parents=True, exist_ok=True)
    mid = identity.member_id
    key_path = directory / f"{mid}.key"
    if key_path.exists():
        raise UsageError(f"{key_path.name} already exists in {directory}", hint="choose another --out directory")
    # One identity per directory: a second one (a mistyped --out, say) would make every command and the node
    # daemon that use this directory refuse it as ambiguous, taking a working member down at its next restart.
    held = sorted(p.name[: -len(".key")] for p in directory.glob("*.key") if not p.name.endswith(".tls.key"))
    if held:
        raise UsageError(
            f"{directory} already holds identity {', '.join(held)}", hint="give a new directory for each identity"
        )
    tls_key = identity.tls_private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption(),
    )
    write_private(key_path, sealed)
    write_private(directory / f"{mid}.tls.key", tls_key)
    write_public(directory / f"{mid}.tls.crt", identity.tls_cert_pem)
    write_public(directory / f"{mid}.pub", identity.bundle.raw)
    return directory / f"{mid}.pub"


def find_member_id(directory: Path) -> str:
    """The member id of the one identity stored in `directory`."""
    if directory.is_file():
        raise KeyFileError(f"{directory} is a file: give the identity directory that holds it ({directory.parent})")
    if not directory.is_dir():
        raise KeyFileError(f"identity directory {directory} does not exist", hint="create one with valise keygen")
    ids = sorted(p.name[: -len(".key")] for p in directory.glob("*.key") if not p.name.endswith(".tls.key"))
    if not ids:
        raise KeyFileError(f"no identity (*.key) in {directory}", hint="create one with valise keygen")
    if len(ids) > 1:
        raise KeyFileError(f"several identities in {directory}: {', '.join(ids)}", hint="keep one per directory")
    return ids[0]


def load_identity(directory: Path, passphrase: bytes | None = None) -> Identity:
    """Load and check the identity in `directory` (permissions, passphrase, keys against bundle)."""
    member_id = check_member_id(find_member_id(directory))
    path = directory / f"{member_id}.key"
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path} is readable by others (mode {stat.S_IMODE(mode):o})", hint=f"chmod 600 {path}")
    data = path.read_bytes()
    secrets = open_secrets(data, passphrase, what=f"key file {path.name}")
    if secrets["id"] != member_id:
        raise KeyFileError(f"key file {path.name} holds the keys of {secrets['id']!r}")
    return Identity.from_secrets(secrets)


VKEY_FILE_MAX = 1024  # a note verifier key is at most 1024 characters (tlog/note.py)


def vkey_text(value: str) -> str:
    """A verifier key given on the command line: the key itself, or the path of a file holding it (such as a
    broker's `log.vkey`). A vkey always has a '+'; a path without one that is a file is read, at most 1 KiB."""
    path = Path(value)
    if "+" not in value and path.is_file():
        try:
            with path.open("rb") as f:
                data = f.read(VKEY_FILE_MAX + 2)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        if len(data) > VKEY_FILE_MAX + 1:
            raise UsageError(f"{path} is too large for a verifier key (over {VKEY_FILE_MAX} bytes)")
        text = data.strip()
        # Never quoted back: the file given by mistake may be a private key (log.key sits beside log.vkey).
        if not text or not all(0x21 <= b <= 0x7E for b in text) or b"+" not in text:
            raise UsageError(
                f"{path} does not hold a verifier key (one line of name+id+key text)",
                hint="give the broker's log.vkey, or the vkey `valise broker info` prints",
            )
        return text.decode("ascii")
    return value.strip()


def load_bundle(path: Path) -> PublicBundle:
    """Read and verify a public bundle file."""
    try:
        data = path.read_bytes() if path.stat().st_size <= KEYFILE_MAX_SIZE else None
    except OSError as exc:
        raise KeyFileError(f"cannot read public bundle {path}: {exc.strerror}") from None
    if data is None:
        raise KeyFileError(f"{path} is too large to be a public bundle")
    if is_sealed(data):  # someone is about to hand out a secret
        raise KeyFileError(
            f"{path} is a private key file, not a public bundle: never hand it out",
            hint="the public bundle is the ID.pub file beside it",
        )
    return PublicBundle.from_bytes(data)
