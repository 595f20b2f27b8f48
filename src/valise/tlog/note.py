"""C2SP signed notes (https://c2sp.org/signed-note), Ed25519 type 0x01 (pure: no I/O).

A note is UTF-8 text ending in a newline, a blank line, then signature lines
"— <key name> <base64(key id(4) ‖ signature)>\\n". Parsing is strict (specs/log.md, "Signed notes"): the size and
the number of signature lines are capped before anything is decoded or verified, base64 must be canonical, and
one key (name + key id) may sign a note at most once. Verification follows the spec: lines from unknown keys are
ignored, a known key's bad signature rejects the whole note, and a note no known key verifies is rejected.

Verifier keys ("vkeys") are `name+hexkeyid+base64(type ‖ public key)`; signer keys are
`PRIVATE+KEY+name+hexkeyid+base64(type ‖ seed)`, as in golang.org/x/mod/sumdb/note.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from valise.crypto import sign
from valise.errors import NoteError, SignatureError

ED25519 = 0x01
# 64 KiB is ~400 Ed25519 signature lines, far above MAX_SIGNATURES; checkpoints are under 1 KiB of text.
MAX_NOTE_SIZE = 65536
# golang.org/x/mod/sumdb/note's limit; the spec asks verifiers to accept at least 16.
MAX_SIGNATURES = 100
KEY_ID_SIZE = 4

_SIG_PREFIX = "— "
_PRIVATE_PREFIX = "PRIVATE+KEY+"


def key_id(name: str, key_type: int, public: bytes) -> bytes:
    """SHA-256(name ‖ 0x0A ‖ type ‖ public key)[:4], the signed-note key id rule."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([key_type]) + public).digest()[:KEY_ID_SIZE]


def check_key_name(name: str) -> str:
    """A key name is non-empty text with no Unicode space, no '+', and no control character."""
    if not name:
        raise NoteError("key name is empty")
    for ch in name:
        if ch.isspace() or ch == "+" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise NoteError(f"key name {name[:80]!r} contains {ch!r}", hint="no spaces, '+' or control characters")
    return name


def b64decode_strict(text: str, what: str) -> bytes:
    """Standard base64 with padding, in its one canonical form (no stray bits, no whitespace)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise NoteError(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise NoteError(f"{what} is not canonical base64")
    return raw


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature line: the signer's key name and id, and the signature bytes after the key id."""

    name: str
    key_id: bytes
    sig: bytes

    def line(self) -> str:
        return f"{_SIG_PREFIX}{self.name} {b64(self.key_id + self.sig)}\n"


class Verifier(Protocol):
    """A key a note may be verified with; `verify` raises NoteError when the signature is bad."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def verify(self, text: bytes, sig: bytes) -> None: ...


class Signer(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def sign(self, text: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Ed25519Verifier:
    """A signed-note Ed25519 (type 0x01) verifier key."""

    name: str
    public: bytes
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        if len(self.public) != sign.PUBLIC_KEY_SIZE:
            raise NoteError(f"Ed25519 public key is {len(self.public)} bytes, expected {sign.PUBLIC_KEY_SIZE}")
        object.__setattr__(self, "key_id", key_id(self.name, ED25519, self.public))

    def verify(self, text: bytes, sig: bytes) -> None:
        try:
            sign.verify_raw(self.public, text, sig, what="note signature")
        except SignatureError:
            raise NoteError(f"invalid signature for key {self.name}+{self.key_id.hex()}") from None

    def vkey(self) -> str:
        return format_vkey(self.name, ED25519, self.public)


@dataclass(frozen=True, slots=True)
class Ed25519Signer:
    """A signed-note Ed25519 signer: a key name and a valise SigningKey."""

    name: str
    key: sign.SigningKey
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        object.__setattr__(self, "key_id", key_id(self.name, ED25519, self.key.public))

    def sign(self, text: bytes) -> bytes:
        return self.key.sign_raw(text)

    def verifier(self) -> Ed25519Verifier:
        return Ed25519Verifier(self.name, self.key.public)

    def skey(self) -> str:
        return f"{_PRIVATE_PREFIX}{self.name}+{self.key_id.hex()}+{b64(bytes([ED25519]) + self.key.seed)}"


# --- key strings ---------------------------------------------------------------------------------------


def format_vkey(name: str, key_type: int, public: bytes) -> str:
    return f"{check_key_name(name)}+{key_id(name, key_type, public).hex()}+{b64(bytes([key_type]) + public)}"


def split_vkey(vkey: str) -> tuple[str, int, bytes]:
    """Parse `name+hexkeyid+base64(type ‖ key)` and check the key id; return (name, type, key material)."""
    if len(vkey) > 1024:
        raise NoteError("verifier key is over 1024 characters")
    parts = vkey.split("+", 2)  # base64 may contain "+"
    if len(parts) != 3:
        raise NoteError("verifier key is not name+keyid+key")
    name, hex_id, key64 = parts
    check_key_name(name)
    if len(hex_id) != 2 * KEY_ID_SIZE or hex_id != hex_id.lower():
        raise NoteError(f"verifier key id {hex_id[:16]!r} is not 8 lowercase hex digits")
    try:
        claimed = bytes.fromhex(hex_id)
    except ValueError:
        raise NoteError(f"verifier key id {hex_id!r} is not 8 lowercase hex digits") from None
    raw = b64decode_strict(key64, "verifier key")
    if len(raw) < 2:
        raise NoteError("verifier key has no key material")
    if key_id(name, raw[0], raw[1:]) != claimed:
        raise NoteError(f"verifier key id {hex_id} does not match the key")
    return name, raw[0], raw[1:]


def parse_vkey(vkey: str) -> Ed25519Verifier:
    """An Ed25519 (type 0x01) verifier from its vkey string."""
    name, key_type, public = split_vkey(vkey)
    if key_type != ED25519:
        raise NoteError(f"verifier key type 0x{key_type:02x} is not Ed25519 (0x01)")
    return Ed25519Verifier(name, public)


def parse_skey(skey: str) -> Ed25519Signer:
    """An Ed25519 signer from `PRIVATE+KEY+name+hexkeyid+base64(0x01 ‖ seed)`; the key id must match."""
    if not skey.startswith(_PRIVATE_PREFIX):
        raise NoteError("signer key does not start with PRIVATE+KEY+")
    parts = skey[len(_PRIVATE_PREFIX) :].split("+", 2)  # base64 may contain "+"
    if len(parts) != 3:
        raise NoteError("signer key is not PRIVATE+KEY+name+keyid+key")
    name, hex_id, key64 = parts
    raw = b64decode_strict(key64, "signer key")
    if len(raw) != 33 or raw[0] != ED25519:
        raise NoteError("signer key is not type 0x01 followed by a 32-byte Ed25519 seed")
    signer = Ed25519Signer(name, sign.SigningKey(raw[1:]))
    if signer.key_id.hex() != hex_id:
        raise NoteError(f"signer key id {hex_id[:16]!r} does not match the key")
    return signer


# --- notes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Note:
    """A parsed note: its text and signatures. After `open_note`, `verified` holds the known keys' signatures."""

    text: str
    verified: tuple[Signature, ...]
    unverified: tuple[Signature, ...]

    @property
    def signatures(self) -> tuple[Signature, ...]:
        return self.verified + self.unverified


def check_text(text: str) -> bytes:
    """The UTF-8 bytes of a note text: ends in a newline, no control characters but newline, under the cap."""
    if not text.endswith("\n"):
        raise NoteError("note text does not end in a newline")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        raise NoteError("note text is not valid Unicode") from None
    if len(raw) > MAX_NOTE_SIZE:
        raise NoteError(f"note text is {len(raw)} bytes, over the limit of {MAX_NOTE_SIZE}")
    _check_controls(text, "note text")
    return raw


def _check_controls(text: str, what: str) -> None:
    for i, ch in enumerate(text):
        if ord(ch) < 0x20 and ch != "\n":
            raise NoteError(f"{what} contains control character {ch!r} at {i}")


def format_note(text: str, signatures: Iterable[Signature]) -> bytes:
    """Serialise a note (no verification); refuses a text or signature set `parse_note` would refuse."""
    check_text(text)
    sigs = list(signatures)
    if not sigs:
        raise NoteError("a note needs at least one signature")
    out = (text + "\n" + "".join(s.line() for s in sigs)).encode("utf-8")
    parse_note(out)  # one definition of "well-formed": whatever we write, we can read
    return out


def sign_note(text: str, signers: Sequence[Signer], existing: Iterable[Signature] = ()) -> bytes:
    """Sign `text` with each signer, after any `existing` signatures (e.g. the log's, before cosigners')."""
    raw = check_text(text)
    return format_note(text, [*existing, *(Signature(s.name, s.key_id, s.sign(raw)) for s in signers)])


def parse_note(msg: bytes) -> Note:
    """Split a note into text and signature lines, strictly, without verifying anything."""
    if len(msg) > MAX_NOTE_SIZE:
        raise NoteError(f"note is {len(msg)} bytes, over the limit of {MAX_NOTE_SIZE}")
    if msg.count(b"\n") > MAX_NOTE_SIZE // 2:  # cheap early out before decoding
        raise NoteError("note has too many lines")
    try:
        whole = msg.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError("note is not valid UTF-8") from None
    _check_controls(whole, "note")
    split = whole.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    text, block = whole[: split + 1], whole[split + 2 :]
    if not block.endswith("\n"):
        raise NoteError("note signatures do not end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has {len(lines)} signature lines, over the limit of {MAX_SIGNATURES}")
    sigs: list[Signature] = []
    seen: set[tuple[str, bytes]] = set()
    for n, line in enumerate(lines, 1):
        if not line.startswith(_SIG_PREFIX):
            raise NoteError(f"note signature line {n} does not start with '— '")
        name, space, sig64 = line[len(_SIG_PREFIX) :].partition(" ")
        if not space or not sig64:
            raise NoteError(f"note signature line {n} is not '— <name> <signature>'")
        check_key_name(name)
        raw = b64decode_strict(sig64, f"note signature line {n}")
        if len(raw) <= KEY_ID_SIZE:
            raise NoteError(f"note signature line {n} is too short")
        sig = Signature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])
        if (sig.name, sig.key_id) in seen:
            raise NoteError(f"note is signed twice by key {name}+{sig.key_id.hex()}")
        seen.add((sig.name, sig.key_id))
        sigs.append(sig)
    return Note(text, (), tuple(sigs))


def open_note(msg: bytes, verifiers: Sequence[Verifier]) -> Note:
    """Parse `msg` and verify it: every signature by a known key must hold, and at least one must exist."""
    note = parse_note(msg)
    known = {(v.name, bytes(v.key_id)): v for v in verifiers}
    text = note.text.encode("utf-8")
    verified: list[Signature] = []
    unverified: list[Signature] = []
    for sig in note.unverified:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            unverified.append(sig)  # the spec: signatures from unknown keys are ignored
            continue
        v.verify(text, sig.sig)
        verified.append(sig)
    if not verified:
        # Say whose signatures it carries and which keys were expected: a node or auditor pinned to another log
        # (or another broker's key) must be able to see that at once.
        signed = ", ".join(f"{s.name}+{s.key_id.hex()}" for s in unverified[:4]) or "none"
        expected = ", ".join(f"{v.name}+{bytes(v.key_id).hex()}" for v in verifiers[:4]) or "none"
        raise NoteError(
            f"note has no verifiable signatures: it is signed by {signed}; the keys trusted here are {expected}",
            hint="is the signer's verifier key configured (the right --log-key or --broker-key)?",
        )
    return Note(note.text, tuple(verified), tuple(unverified))
