"""Which of a member's identity keys a node checks its packets and notices against (pure: no I/O).

A member may move to new identity keys (a `member-rekey` record, specs/policy.md). What it signed before stays
valid where the log holds it: a packet sent before the rekey and delivered after, an acknowledgement or a
retraction logged before it and forwarded after. So a node never takes "some key this member once had" as good
enough (a thief holding the replaced key could then sign anything); it takes the current key, or a replaced key
only where the verified log shows that key was in force (specs/protocol.md, "Members that move to new keys").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from valise.crypto import sign
from valise.errors import SignatureError
from valise.packet.format import HEADER_DOMAIN, Head


def first_signer(keys: Sequence[bytes], check: Callable[[bytes], object]) -> bytes | None:
    """The first of `keys` under which `check` (a verification that raises SignatureError) passes."""
    for key in keys:
        try:
            check(key)
        except SignatureError:
            continue
        return key
    return None


def check_header(head: Head, key: bytes) -> None:
    """That `key` signed the packet's header (SignatureError, naming the sender, if not)."""
    sign.verify(key, HEADER_DOMAIN, head.header.raw, head.signature, what=f"packet header from {head.core.sender}")


def packet_signer(
    head: Head,
    keys: Sequence[bytes],
    *,
    in_inbox: Callable[[], bool],
    logged_at: Callable[[], int | None],
    key_at: Callable[[int], bytes | None],
) -> bytes:
    """The key of `keys` (the sender's, current first: PolicyState.identity_keys) that signed this packet's header,
    if the node may take it under that key; raises SignatureError otherwise.

    The current key always will do. A replaced one only if the verified log holds the packet (`logged_at`, from
    the node's record of packets addressed to it) where that key was in force, or if the inbox already took this
    very packet (`in_inbox`: a redelivery, checked when it was taken and only acknowledged again). Those two are
    asked only then: not for every delivery."""
    sender = head.core.sender
    what = f"packet header from {sender}"
    check = functools.partial(check_header, head)
    if not keys:
        raise SignatureError(f"{what}: {sender} is not a member in the verified log")
    try:
        check(keys[0])
        return keys[0]
    except SignatureError as exc:
        failure = exc
    replaced = first_signer(keys[1:], check)
    if replaced is None:
        raise failure
    if in_inbox():
        return replaced
    index = logged_at()
    if index is not None and key_at(index) == replaced:
        return replaced
    if index is None:
        where = "is not in the verified log"
    else:
        where = f"is logged at entry {index}, where another of its keys was in force"
    raise SignatureError(f"{what} is signed with an identity key {sender} has replaced, and the packet {where}")


__all__ = ["check_header", "first_signer", "packet_signer"]
