"""`valise erase`: packets a member no longer wants to keep, removed from its node's inbox.

A node keeps every packet it receives, encrypted, until its operator erases it: retention is the member's rule
(a TLP:RED report kept 90 days, an import into the member's own platform), not the protocol's. Erasing removes
the packet's file and keeps a small row: the node still knows the packet, so a redelivery (the broker pushes
again what it has no acknowledgement of) is acknowledged again and never taken in a second time, and the log's
acknowledgement of it does not raise a "not in the inbox" alarm.

Run by the daemon when it runs (its store, under its lock), or by the CLI under the daemon's lock when it does not.
"""

from __future__ import annotations

from typing import Any

from valise.errors import UsageError
from valise.node.report import one
from valise.node.store import InboxRow, NodeStore

# An answer names at most this many erased packets (it must fit one control frame); `count` says how many in all.
LISTED = 1000


def select(store: NodeStore, ids: list[str], *, before: int | None, retracted: bool) -> list[InboxRow]:
    """The inbox rows an erase names: packet ids (unique prefixes, erased already or not), or filters."""
    if ids and (before is not None or retracted):
        raise UsageError("give packet ids, or --before / --retracted, not both")
    if not ids and before is None and not retracted:
        raise UsageError("say what to erase: packet ids, --before TIME, --retracted, or both of the last two")
    if ids:
        return [one(store.inbox_find(prefix.lower()), prefix, "inbox") for prefix in ids]
    return store.inbox_erasable(before=before, retracted=retracted)


def erase(store: NodeStore, rows: list[InboxRow], *, now: int, dry_run: bool) -> dict[str, Any]:
    """Erase `rows` (unless `dry_run`); the answer says which, and which were erased before."""
    held = [r for r in rows if r.erased is None]
    already = [r for r in rows if r.erased is not None]
    if not dry_run and held:
        store.inbox_erase([r.digest for r in held], now)
    return {
        "ok": True,
        "count": len(held),
        "bytes": sum(r.size for r in held),
        "ids": [r.packet_id.hex() for r in held[:LISTED]],
        "already": [r.packet_id.hex() for r in already[:LISTED]],
        "dry_run": dry_run,
    }
