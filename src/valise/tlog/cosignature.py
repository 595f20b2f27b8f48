"""C2SP tlog-cosignature (https://c2sp.org/tlog-cosignature), Ed25519 `cosignature/v1`, type 0x04 (pure).

A witness's cosignature is an ordinary signed-note signature line whose key id uses type 0x04 and whose
signature bytes are `timestamp (uint64, big-endian) ‖ Ed25519 signature` over

    "cosignature/v1\\n" ‖ "time " ‖ <timestamp, ASCII decimal> ‖ "\\n" ‖ <checkpoint body>

It says: as of that time, this is the largest consistent checkpoint the witness has seen for the log. The
message does not name the witness, so (as the spec requires) one Ed25519 key serves one cosigner name only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from valise.crypto import sign
from valise.errors import NoteError, SignatureError
from valise.tlog import note
from valise.tlog.checkpoint import Checkpoint, parse_body

COSIGNATURE_V1 = 0x04
_MAX_TIMESTAMP = 2**63 - 1
_SIG_SIZE = 8 + sign.SIGNATURE_SIZE


def signed_message(timestamp: int, body: bytes) -> bytes:
    return b"cosignature/v1\ntime %d\n" % timestamp + body


def timestamp_of(sig: note.Signature) -> int:
    """The timestamp a cosignature line carries (checked for size and range)."""
    if len(sig.sig) != _SIG_SIZE:
        raise NoteError(f"cosignature by {sig.name} is {len(sig.sig)} bytes, expected {_SIG_SIZE}")
    ts = int.from_bytes(sig.sig[:8], "big")
    if ts > _MAX_TIMESTAMP:
        raise NoteError(f"cosignature by {sig.name} has a timestamp over 2^63 - 1")
    return ts


@dataclass(frozen=True, slots=True)
class CosignatureVerifier:
    """A witness's Ed25519 cosignature/v1 key; usable wherever a note.Verifier is."""

    name: str
    public: bytes
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        note.check_key_name(self.name)
        if len(self.public) != sign.PUBLIC_KEY_SIZE:
            raise NoteError(f"cosigner public key is {len(self.public)} bytes, expected {sign.PUBLIC_KEY_SIZE}")
        object.__setattr__(self, "key_id", note.key_id(self.name, COSIGNATURE_V1, self.public))

    def verify(self, text: bytes, sig: bytes) -> None:
        ts = timestamp_of(note.Signature(self.name, self.key_id, sig))
        parse_body(text.decode("utf-8"))  # a witness only ever cosigns checkpoints
        try:
            sign.verify_raw(self.public, signed_message(ts, text), sig[8:], what="cosignature")
        except SignatureError:
            raise NoteError(f"invalid cosignature for key {self.name}+{self.key_id.hex()}") from None

    def vkey(self) -> str:
        return note.format_vkey(self.name, COSIGNATURE_V1, self.public)


def parse_vkey(vkey: str) -> CosignatureVerifier:
    """A cosigner verifier from its vkey string (type 0x04)."""
    name, key_type, public = note.split_vkey(vkey)
    if key_type != COSIGNATURE_V1:
        raise NoteError(f"verifier key type 0x{key_type:02x} is not an Ed25519 cosignature/v1 key (0x04)")
    return CosignatureVerifier(name, public)


@dataclass(frozen=True, slots=True)
class Cosigner:
    """A witness's signing side: its name and Ed25519 key."""

    name: str
    key: sign.SigningKey
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        note.check_key_name(self.name)
        object.__setattr__(self, "key_id", note.key_id(self.name, COSIGNATURE_V1, self.key.public))

    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.name, self.key.public)

    def cosign(self, checkpoint: Checkpoint, now: int) -> note.Signature:
        """A cosignature line for `checkpoint` at time `now` (Unix seconds, passed in: the core reads no clock).

        The caller must already have checked the checkpoint's log signature and its consistency with every
        earlier checkpoint this witness has cosigned (checkpoint.check_newer): that check is what it attests.
        """
        if not 0 <= now <= _MAX_TIMESTAMP:
            raise NoteError(f"cosignature time {now} is not in [0, 2^63)")
        body = checkpoint.body().encode("utf-8")
        sig = self.key.sign_raw(signed_message(now, body))
        return note.Signature(self.name, self.key_id, now.to_bytes(8, "big") + sig)


def add_cosignatures(msg: bytes, cosignatures: list[note.Signature]) -> bytes:
    """Append cosignature lines to a signed checkpoint note (replacing none; duplicates are refused)."""
    parsed = note.parse_note(msg)
    return note.format_note(parsed.text, [*parsed.signatures, *cosignatures])
