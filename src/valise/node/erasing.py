"""`valise erase`: packets a member no longer wants to keep, removed from its node's inbox.

A node keeps every packet it receives, encrypted, until its operator erases it: retention is the member's rule
(a TLP:RED report kept 90 days, an import into the member's own platform), not the protocol's. Erasing removes
the packet's file and keeps a small row: the node still knows the packet, so a redelivery (the broker pushes
again what it has no acknowledgement of) is acknowledged again and never taken in a second time, and the log's
acknowledgement of it does not raise a "not in the inbox" alarm.

Run by the daemon when it runs (its store, under its lock), or by the CLI under the daemon's lock when it does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from valise.errors import UsageError
from valise.node.report import inbox_one
from valise.node.store import InboxRow, NodeStore

# An answer names at most this many erased packets (it must fit one control frame); `count` says how many in all.
LISTED = 1000
# Packets erased per transaction: a large erase must not hold a running daemon's event loop for seconds.
CHUNK = 500


def select(
    store: NodeStore, ids: list[str], *, before: int | None, retracted: bool, sender: str | None = None
) -> list[InboxRow]:
    """The inbox rows an erase names: packet ids (unique prefixes, erased already or not), or filters; from
    `sender` only, if given."""
    if ids and (before is not None or retracted):
        raise UsageError("give packet ids, or --before / --retracted, not both")
    if not ids and before is None and not retracted:
        raise UsageError("say what to erase: packet ids, --before TIME, --retracted, or both of the last two")
    if ids:
        return [inbox_one(store.inbox_find(prefix, sender), prefix, sender) for prefix in ids]
    return store.inbox_erasable(before=before, retracted=retracted, sender=sender)


def plan(rows: list[InboxRow], *, dry_run: bool) -> tuple[dict[str, Any], list[bytes]]:
    """The answer to an erase of `rows`, and the digests of the packets to erase (none for a dry run)."""
    rows = list({r.digest: r for r in rows}.values())  # a packet named twice is one packet
    held = [r for r in rows if r.erased is None]
    already = [r for r in rows if r.erased is not None]
    answer = {
        "ok": True,
        "count": len(held),
        "bytes": sum(r.size for r in held),
        "ids": [r.packet_id.hex() for r in held[:LISTED]],
        "already": [r.packet_id.hex() for r in already[:LISTED]],
        "dry_run": dry_run,
    }
    return answer, [] if dry_run else [r.digest for r in held]


def chunks(digests: list[bytes]) -> Iterator[list[bytes]]:
    """The digests in batches of CHUNK: a running daemon lets its connection run between them."""
    for i in range(0, len(digests), CHUNK):
        yield digests[i : i + CHUNK]
