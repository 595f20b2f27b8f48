"""Error codes carried by `error` frames (specs/wire.md, "Error codes").

A code is 1-64 characters of [a-z0-9-], starting with a letter or digit. The first group is raised by the state
machine itself (a protocol violation, always fatal); the second is for the daemons (answers to one request,
or a reason to close). Receivers MUST treat an unknown code like `internal`: new codes may be added.
"""

from __future__ import annotations

import re

CODE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")

# --- protocol violations (raised by valise.wire; fatal) --------------------------------------------------------
EXPECTED_HELLO = "expected-hello"  # the client's first frame is not `hello`
EXPECTED_WELCOME = "expected-welcome"  # the server's first frame is neither `welcome` nor `error`
UNSUPPORTED_VERSION = "unsupported-version"  # no version in common, or `welcome` chose one not offered
FRAME_TOO_LARGE = "frame-too-large"  # a length prefix over the receiver's limit
BAD_FRAME = "bad-frame"  # a zero length prefix
TRUNCATED = "truncated"  # the stream ended inside a frame
BAD_ENCODING = "bad-encoding"  # the payload is not canonical msgpack, or not a map with a text `t`
UNKNOWN_TYPE = "unknown-type"  # `t` names no message type
BAD_FIELD = "bad-field"  # a field is missing, extra, of the wrong type or out of range
UNEXPECTED_FRAME = "unexpected-frame"  # a valid message that the grammar does not allow here
DUPLICATE_REQUEST = "duplicate-request"  # a request id already in use
TOO_MANY_REQUESTS = "too-many-requests"  # over the peer's `requests` limit, or too many unanswered pings
LIMIT_EXCEEDED = "limit-exceeded"  # a chunk over `chunk`, a declared size over `packet`
LENGTH_MISMATCH = "length-mismatch"  # chunk bytes do not add up to the declared size
FLOW_CONTROL = "flow-control"  # chunk data over the window, credit over MAX_WINDOW, pushes over `pushes`
NOT_ALLOWED = "not-allowed"  # the client's role may not send (or be sent) this message

PROTOCOL_CODES = frozenset(
    {
        EXPECTED_HELLO,
        EXPECTED_WELCOME,
        UNSUPPORTED_VERSION,
        FRAME_TOO_LARGE,
        BAD_FRAME,
        TRUNCATED,
        BAD_ENCODING,
        UNKNOWN_TYPE,
        BAD_FIELD,
        UNEXPECTED_FRAME,
        DUPLICATE_REQUEST,
        TOO_MANY_REQUESTS,
        LIMIT_EXCEEDED,
        LENGTH_MISMATCH,
        FLOW_CONTROL,
        NOT_ALLOWED,
    }
)

# --- application codes (sent by the daemons) -------------------------------------------------------------------
INTERNAL = "internal"  # the sender failed; retrying later may work
SHUTTING_DOWN = "shutting-down"  # graceful stop; reconnect later
REPLACED = "replaced"  # a newer connection of the same member took over this one
TIMEOUT = "timeout"  # the peer was too slow (handshake, pong, credit)
UNAUTHENTICATED = "unauthenticated"  # `hello.member` is not the member whose certificate the TLS peer showed
UNKNOWN_MEMBER = "unknown-member"  # the member is not in the directory
SUSPENDED = "suspended"  # the member is suspended by the operator
BAD_PACKET = "bad-packet"  # the packet head does not parse or does not match `size`
SENDER_MISMATCH = "sender-mismatch"  # the header's `from` is not the authenticated peer
BAD_SIGNATURE = "bad-signature"  # a signature (header, statement, notice) does not verify
STALE = "stale"  # `created` outside the broker's window, or `expires` already past
REPLAY = "replay"  # the same (from, packet id) with a different header
HASH_MISMATCH = "hash-mismatch"  # the ciphertext does not match the signed length or hash
CANCELLED = "cancelled"  # the answer to a `submit-cancel`
NOT_FOUND = "not-found"  # an index or size the log does not have
REFUSED = "refused"  # a statement or retraction failed its checks (the message says which)
CONFLICT = "conflict"  # a witness holds a checkpoint that the request does not extend
