"""What `valise status` and `valise inbox` report, from a running daemon or from its directory when it is not
running (the daemon's store opened read-only): the same answer either way, with `running` saying which.

A stopped daemon is when its owner most needs to see its alarms (a fork, a broken receipt) and what waits in its
outbox; making `status` depend on the daemon would hide exactly that.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from valise import identity, packet
from valise.crypto import sign
from valise.errors import Error, StoreError, UsageError
from valise.identity import PublicBundle
from valise.node import signers
from valise.node.follower import Follower
from valise.node.home import NodeConfig, NodeHome
from valise.node.store import InboxRow, NodeStore, OutboxRow
from valise.packet.format import HEADER_DOMAIN, Head
from valise.policy import PolicyState
from valise.utctime import utc

STATUS_ALARMS = 50  # the latest alarms `status` shows (with the total)


@dataclass(frozen=True, slots=True)
class Live:
    """What only a running daemon knows: its connection and what it holds in memory."""

    connected: bool
    last_error: str | None
    quorum_wait: str | None
    held: int


def status(
    config: NodeConfig, store: NodeStore, follower: Follower | str, quorum: str | None, live: Live | None
) -> dict[str, Any]:
    """The status answer. `follower` is the verified log, or why it could not be rebuilt (offline only: the store's
    outbox, inbox and alarms are still worth showing, most of all then)."""
    outbox = Counter(r.state for r in store.outbox_all())
    held, erased = store.inbox_counts()
    return {
        "ok": True,
        "member": config.member_id,
        "running": live is not None,
        "broker": f"{config.broker_host}:{config.broker_port}",
        "connected": live is not None and live.connected,
        "last_error": live.last_error if live else None,
        **_log(follower, quorum, live),
        "outbox": dict(outbox),
        # Deliveries that wait, unacknowledged, for the verified log to show their sender (a new member).
        "held": live.held if live else 0,
        "acknowledgements": store.ack_count(),
        "inbox": held,  # held packets by state
        "inbox_erased": erased,
        # The latest alarms, and how many there are in all (a broker can raise them without end; the answer
        # must stay within one control frame).
        "alarms": [
            {"at": a.at, "kind": a.kind, "message": a.message, "evidence": a.evidence.hex() if a.evidence else None}
            for a in store.alarms(latest=STATUS_ALARMS)
        ],
        "alarms_total": store.alarm_count(),
    }


def _log(follower: Follower | str, quorum: str | None, live: Live | None) -> dict[str, Any]:
    if isinstance(follower, str):
        return {"broker_id": None, "log": {"error": follower}, "trusted": None}
    return {
        "broker_id": follower.broker,
        "log": {
            "origin": follower.origin,
            "size": follower.size,
            "root": follower.root.hex(),
            "members": len(follower.policy.members) if follower.policy else 0,
        },
        # What the node uses (keys, directory, receipts): the last checkpoint that met the witness quorum, or
        # with no policy, the verified one. "awaiting" while verified entries wait for a quorum.
        "trusted": {
            "size": follower.trusted_size,
            "root": follower.trusted_root.hex(),
            "quorum": quorum,
            "awaiting": follower.awaiting,
            "detail": live.quorum_wait if live and follower.awaiting else None,
        },
    }


def inbox_item(row: InboxRow) -> dict[str, Any]:
    return {
        "id": row.packet_id.hex(),
        "digest": row.digest.hex(),
        "from": row.sender,
        "received": row.received,
        "size": row.size,
        "labels": row.labels,
        "state": row.state,
        "acked": row.acked,
        "retraction": row.retraction,
    }


def outbox_item(row: OutboxRow, acked_by: list[str]) -> dict[str, Any]:
    """One sent (or queued) packet as `valise outbox` lists it: what became of it, and who acknowledged it."""
    outcome = json.loads(row.outcome) if row.outcome else None
    item: dict[str, Any] = {
        "id": row.packet_id.hex(),
        "to": row.recipients,
        "created": row.created,
        "expires": row.expires,
        "size": row.size,
        "state": row.state,
        "index": row.log_index,
        "in_log": row.in_log == 1,  # a verified checkpoint shows the receipt's entry
        "acked_by": sorted(acked_by),
    }
    if row.in_log == -1:  # the verified log holds another entry where the receipt promised this one (an alarm)
        item["receipt_broken"] = True
    if row.state == "queued":
        item["attempts"] = row.attempts
        if isinstance(outcome, dict) and "error" in outcome:
            item["last_error"] = outcome["error"]
    elif row.state == "denied" and isinstance(outcome, dict):
        if isinstance(outcome.get("cancelled"), str):
            item["cancelled"] = outcome["cancelled"]
        elif isinstance(outcome.get("error"), dict):
            item["refused"] = outcome["error"]
        else:
            item["reasons"] = {str(k): str(v) for k, v in outcome.items()}
    return item


def outbox_items(store: NodeStore, after: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
    return [
        (pos, outbox_item(row, list(store.acks_for(row.packet_id)))) for pos, row in store.outbox_page(after, limit)
    ]


def offline_outbox(home: NodeHome) -> list[dict[str, Any]]:
    store = NodeStore.open_readonly(home.root)
    try:
        return [item for _, item in outbox_items(store, 0, 2**62)]
    finally:
        store.close()


def offline_status(home: NodeHome) -> dict[str, Any]:
    """`status` read from the directory of a daemon that is not running (nothing is written)."""
    store = NodeStore.open_readonly(home.root)
    try:
        config = home.config()
        follower: Follower | str
        policy = None
        with store.snapshot():  # every table as of one moment, should a daemon start meanwhile
            try:
                policy = home.witness_policy()
                follower = _restore(home, store)
            except Error as exc:  # the daemon would refuse to start too; its alarms and queues still tell why
                follower = f"the verified log cannot be rebuilt: {exc.what}"
            return status(config, store, follower, policy.quorum if policy else None, None)
    finally:
        store.close()


def offline_policy(root: Path) -> PolicyState:
    """The policy as this node's verified (trusted) log shows it, from its store, read-only: what a member operator
    asks `policy show|explain|matrix --node` about, with no access to the broker's directory. The daemon may be
    running or not: a running one commits each checkpoint's changes in one transaction, read here in one too."""
    home = NodeHome.open(root)
    store = NodeStore.open_readonly(home.root)
    try:
        with store.snapshot():  # the kept records, the pending ones and the state as one checkpoint left them
            follower = _restore(home, store)
    finally:
        store.close()
    if follower.policy is None:
        raise StoreError(f"the node in {root} has not verified any of the log yet", hint="let its daemon run")
    return follower.policy


def offline_read(
    home: NodeHome,
    prefix: str,
    passphrase: bytes | None,
    sink: BinaryIO,
    *,
    force: bool,
    sender: str | None = None,
) -> dict[str, Any]:
    """`read` with the daemon stopped: the packet is decrypted from the inbox as the daemon would, with the
    member's key unlocked here and the sender's keys from the verified log; nothing is written to the store (the
    packet is not marked read). Same answer as the daemon's, with "offline": true."""
    store = NodeStore.open_readonly(home.root)
    try:
        with store.snapshot():
            rows = store.inbox_find(prefix, sender)
            follower = _restore(home, store)
    finally:
        store.close()
    row = inbox_one(rows, prefix, sender)
    check_readable(row, force=force)
    signer = signer_bundle(follower.policy, row, lambda: inbox_head(store, row))
    me = home.load_identity(passphrase)
    with store.open_inbox_packet(row.digest) as src:
        opened = open_received(src, sink, me=me, sender=signer)
    return {"ok": True, "packet": opened.to_json(), "state": row.state, "retraction": row.retraction, "offline": True}


def open_received(src: BinaryIO, sink: BinaryIO, *, me: identity.Identity, sender: PublicBundle) -> packet.Opened:
    """Open a packet of the inbox without its time checks: the broker checked `created` against its window and
    `expires` when it took the packet, and the node `expires` when it took the delivery. `expires` bounds a
    delivery, not how long its recipient may read it: the inbox keeps a packet until its operator erases it, and
    a report read a month after it came must open as it did on the day. Nor may a clock change that: a packet
    the broker took from a sender 400 s fast is dated in the future by this node's clock, and opening it "as of
    its arrival" refused it for good, after the node had acknowledged it. Every other check is the same."""
    return packet.open(src, sink, me=me, sender=sender, now=None)


def one(rows: list[Any], prefix: str, where: str) -> Any:
    """The one row a packet id prefix names (`read`, `retract`, `receipt export`), or a usage error saying why not."""
    if len(prefix) < 4:
        raise UsageError("give at least 4 hex digits of the packet id")
    if not rows:
        raise UsageError(f"no packet {prefix} in the {where}")
    if len(rows) > 1:
        raise UsageError(f"{len(rows)} packets in the {where} start with {prefix}", hint="give more digits")
    return rows[0]


def inbox_one(rows: list[InboxRow], prefix: str, sender: str | None = None) -> InboxRow:
    """The inbox row a packet id prefix names: a packet still held before erased ones, which `inbox` no longer
    lists and which should not make a prefix ambiguous.

    A packet is its sender's and its id: the broker refuses an id its sender used before, not one another member
    used. So two senders' packets can share an id (a hostile member can copy one it received, to make the other
    unnameable), and more digits cannot tell them apart: the sender can (`--from`)."""
    rows = [r for r in rows if r.erased is None] or rows
    if len(rows) > 1 and len({r.packet_id for r in rows}) == 1:
        senders = ", ".join(sorted({r.sender for r in rows}))
        raise UsageError(
            f"{len(rows)} packets in the inbox have the id {rows[0].packet_id.hex()}, from {senders}",
            hint="say whose with --from MEMBER",
        )
    row: InboxRow = one(rows, prefix, "inbox" if sender is None else f"inbox from {sender}")
    return row


def check_readable(row: InboxRow, *, force: bool) -> None:
    """Its sender asked every recipient to discard a retracted packet: a script piping `read` into its intake must
    not take it in as if nothing had happened. A person who needs it (to see what was withdrawn) says so."""
    if row.erased is not None:
        raise UsageError(
            f"packet {row.packet_id.hex()} from {row.sender} was erased from this inbox at {utc(row.erased)}",
            hint="an erased packet's file is gone; only its sender can send it again",
        )
    if row.state == "retracted" and not force:
        raise UsageError(
            f"packet {row.packet_id.hex()} was retracted by its sender: {row.retraction or 'no reason given'}",
            hint="its sender asked recipients to discard it; pass --force to read it anyway",
        )


def member_bundle(policy: PolicyState | None, member_id: str, *, removed_too: bool = False) -> PublicBundle | None:
    """A member's keys as of the verified log (the encryption key may have rotated since its bundle). A removed
    member's only with `removed_too`: nobody sends to one, but what it sent before is still read."""
    member = policy.members.get(member_id) if policy else None
    if member is None or (member.status == "removed" and not removed_too):
        return None
    bundle = identity.PublicBundle.from_bytes(member.bundle)
    return replace(bundle, sign_key=member.sign_key, enc_key=member.enc_key)


def signer_bundle(policy: PolicyState | None, row: InboxRow, read_head: Callable[[], Head]) -> PublicBundle:
    """The sender's keys to open an inbox packet with: its identity key is the one the header verified under when
    the packet was taken, which the sender may have replaced since (a rekey after sending). A row from a store made
    before nodes kept that key was taken under the key current then, which may be replaced by now: the first of
    the sender's keys that signed its header (`read_head` reads it; the packet was checked when it was taken)."""
    sender = member_bundle(policy, row.sender, removed_too=True)
    if sender is None:
        raise UsageError(f"sender {row.sender} is not in the verified directory")
    if row.sign_key is not None:
        return replace(sender, sign_key=row.sign_key)
    assert policy is not None  # the sender is a member in it
    head = read_head()

    def check(key: bytes) -> None:
        sign.verify(key, HEADER_DOMAIN, head.header.raw, head.signature, what="inbox packet header")

    key = signers.first_signer(policy.identity_keys(row.sender), check)
    return sender if key is None else replace(sender, sign_key=key)  # none: opening says what is wrong


def inbox_head(store: NodeStore, row: InboxRow) -> Head:
    with store.open_inbox_packet(row.digest) as f:
        return packet.read_head(f)


def _restore(home: NodeHome, store: NodeStore) -> Follower:
    """The verified log as the daemon left it in `store` (as NodeDaemon rebuilds it when it starts)."""
    config, broker = home.config(), home.broker_bundle()
    state, kept = store.follower_load()
    return Follower.restore(
        config.log_vkey, config.member_id, broker.member_id, state, kept, broker.sign_key,
        quorum=home.witness_policy(), pending=store.follower_pending(),
    )  # fmt: skip


def offline_inbox(home: NodeHome) -> list[dict[str, Any]]:
    store = NodeStore.open_readonly(home.root)
    try:
        return [inbox_item(row) for row in store.inbox_all() if row.erased is None]
    finally:
        store.close()
