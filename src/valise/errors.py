"""One error tree for valise.

Every error says what was wrong and, where it helps, what to do about it. The CLI turns any `Error` into a
one-line message on stderr and the class's `exit_code`; it never shows a traceback for a user's mistake.
Errors raised while checking untrusted input name the input and the rule it broke, never echo large inputs.

Add a subclass where callers (or tests) need to tell a failure apart from its siblings; otherwise reuse one.
"""

from __future__ import annotations


class Error(Exception):
    """Root of every error valise raises on purpose."""

    exit_code = 1

    def __init__(self, what: str, *, hint: str | None = None) -> None:
        self.what = what
        self.hint = hint
        super().__init__(f"{what} ({hint})" if hint else what)


class UsageError(Error):
    """The command line or the arguments of a call do not make sense."""

    exit_code = 2


class LimitError(Error):
    """An input is larger (or more numerous) than a hard limit allows; checked before crypto and allocation."""


class EncodingError(Error):
    """Bytes are not valid canonical msgpack (or text is not in its one canonical form)."""


# --- identities and keys -------------------------------------------------------------------------------


class IdentityError(Error):
    """A member id, key file or public bundle is unusable."""


class MemberIdError(IdentityError):
    """A member id is not 1-64 characters of [A-Za-z0-9._-]."""


class KeyFileError(IdentityError):
    """A private key file is missing, unreadable, has loose permissions or cannot be decrypted."""


class PassphraseError(KeyFileError):
    """The passphrase is missing or does not open the key file."""


class BundleError(IdentityError):
    """A public bundle is malformed, or its self-signature does not verify."""


class SignatureError(Error):
    """A signature does not verify under the key it claims."""


# --- packets -------------------------------------------------------------------------------------------


class PacketError(Error):
    """A packet is malformed or fails a check; subclasses say which."""


class PacketFormatError(PacketError):
    """The packet's framing or header is malformed (bad msgpack, unknown version, wrong field types)."""


class PacketSignatureError(PacketError, SignatureError):
    """The header signature does not verify under the sender's identity key."""


class NotARecipientError(PacketError):
    """The opening identity is not among the packet's recipients, or its stanza does not open."""


class StanzaError(PacketError):
    """The recipient stanzas do not match the header's `to`, or a stanza fails to decrypt."""


class PayloadError(PacketError):
    """The encrypted payload was modified, truncated, reordered or extended."""


class ExpiredError(PacketError):
    """The packet's `expires` time has passed, or `created` lies too far in the future."""


class PacketVersionError(PacketFormatError):
    """The packet's magic or version is not one this implementation reads."""


class PacketLimitError(PacketFormatError, LimitError):
    """A packet's header, recipient count or ciphertext is over a hard limit (checked before any crypto)."""


class SenderMismatchError(PacketSignatureError):
    """The packet names a different sender than the bundle it is being checked against."""


class TruncatedError(PayloadError):
    """The packet ends before its header or ciphertext does."""


class TrailingDataError(PayloadError):
    """Bytes follow the end of the packet's ciphertext."""


class LabelError(Error):
    """A label (TLP level, category, operation name or content type) is not valid."""


# --- transparency log ----------------------------------------------------------------------------------


class ProofError(Error):
    """A Merkle inclusion or consistency proof does not hold."""


class NoteError(Error):
    """A signed note or checkpoint is malformed, or carries no valid signature from a trusted key."""


class CheckpointError(NoteError):
    """A checkpoint's body is malformed, or it is inconsistent with (or older than) one already seen."""


class TileError(ProofError):
    """A tlog-tiles path, tile or entry bundle is malformed, or does not match the tree it claims to be part of."""


class StoreError(Error):
    """The durable store is missing, corrupt, or refused an operation."""

    def __init__(self, what: str, *, hint: str | None = None, cause: str | None = None) -> None:
        super().__init__(what, hint=hint)
        self.cause = cause  # what failed ("database or disk is full"), without this machine's paths: for peers

    @property
    def told(self) -> str:
        """What a peer is told: the cause, not the store's path on this machine."""
        return f"storage failed: {self.cause}" if self.cause else "storage failed"


class CheckpointSuperseded(StoreError):
    """A checkpoint was not saved because another writer saved a larger one meanwhile."""


class StoreMoved(StoreError):
    """An append that had to land at a given index found another writer's entries there; nothing was appended."""

    def __init__(self, expected: int, size: int) -> None:
        super().__init__(f"the log has {size} entries, not the {expected} this append was decided against")
        self.size = size


class AccessError(Error):
    """What was asked for exists but is not served to this caller (entry bundles on a public address)."""


# --- policy --------------------------------------------------------------------------------------------


class PolicyError(Error):
    """A directory record or policy statement is malformed, mis-signed, or does not apply."""


class StatementError(PolicyError):
    """A statement is malformed, signed by the wrong key, replayed, or speaks for another member."""


class StatementSignatureError(StatementError):
    """A statement's signature does not verify under its author's identity key."""


# --- wire and daemons ----------------------------------------------------------------------------------


class WireError(Error):
    """A peer sent bytes that break the wire protocol (bad frame, over a limit, out of order)."""


class ProtocolError(WireError):
    """A wire-protocol rule was broken; `code` is the machine-readable code for the `error` frame (specs/wire.md)."""

    def __init__(self, what: str, *, code: str = "protocol-error", hint: str | None = None) -> None:
        self.code = code
        super().__init__(what, hint=hint)


class LocalProtocolError(ProtocolError):
    """This side tried to send something the wire protocol forbids, or fed the state machine wrongly (a bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the wire protocol: send it an `error` frame with `code`, then close the connection."""


class FrameTooLarge(RemoteProtocolError, LimitError):
    """A frame's length prefix is over the limit; refused from the prefix alone, before the body is buffered."""

    def __init__(self, what: str, *, hint: str | None = None) -> None:
        super().__init__(what, code="frame-too-large", hint=hint)


class RemoteError(Error):
    """The other side answered with an error frame; `code` is its machine-readable code."""

    def __init__(self, code: str, what: str, *, hint: str | None = None) -> None:
        self.code = code
        super().__init__(what, hint=hint)


class DeniedError(Error):
    """The broker refused to relay a packet; the message gives the reason per recipient."""

    exit_code = 3


# --- audit ---------------------------------------------------------------------------------------------


class AuditAlarm(CheckpointError):
    """A checkpoint an auditor must refuse: not signed by the log, quorum not met, older than, or inconsistent with
    (a fork of) one already verified. The exit code tells scripts this is an alarm, not a usage problem."""

    exit_code = 5
