"""A packet that waited in the outbox past the broker's time window, sealed afresh (specs/protocol.md, Nodes).

The broker takes a packet only within its window (±600 s by default) of the packet's `created`, the time it was
sealed: a packet queued while the broker was unreachable for longer is refused as `stale`, long before its
`expires`, though the outbox promised to send it until then. A sealed packet cannot be re-dated by re-signing
(`created` is the payload's associated data), and the node does not keep the plaintext. It keeps the packet's
content key K instead, sealed to this member's own encryption key, in a file beside the packet (never in node.db:
NodeStore._keep) for as long as the packet is queued; on a
`stale` refusal it seals the packet afresh (packet.reseal: same id, recipients, labels and expiry, dated now) and
sends that. A `stale` answer means the broker holds no packet under this digest (a resubmission of a logged one
is answered with its receipt before any time check), so the two can never both be logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from cryptography.exceptions import InvalidTag

from valise import identity, packet
from valise.broker.relay import DEFAULT_WINDOW
from valise.crypto import hpke
from valise.errors import Error, StoreError
from valise.node import report
from valise.node.store import NodeStore, OutboxRow, writing
from valise.utctime import utc
from valise.wire import codes
from valise.wire import events as ev

if TYPE_CHECKING:
    from valise.node.daemon import NodeDaemon

log = logging.getLogger("valise.node")

# Sealed afresh only if the packet was sealed this long before the refusal, by this node's clock: a refusal of a
# packet sealed moments ago means the two clocks are further apart than the window, which sealing again cannot
# mend (and must not loop on). Half the broker's default window.
RESEAL_AFTER = 300
# Nor if it expires within this: it would expire on the way.
RESEAL_MARGIN = 60
# An upload that took this long may have been refused for its own length (the broker checks the window again when
# an upload ends): sealed afresh, it would take as long again. The broker's default window, less a minute; the
# node cannot know another.
UPLOAD_LIMIT = DEFAULT_WINDOW - 60
# Sealed afresh at most this many times per packet and daemon run: a node and a broker whose clocks are a little
# less than the window apart, with a slow upload on top, would otherwise go round for as long as the packet lives.
MAX_RESEALS = 3

_KEPT_INFO = b"valise/v1 outbox content key\x00"


def keep_key(me: identity.Identity, packet_id: bytes, key: bytes, random: Callable[[int], bytes]) -> bytes:
    """K sealed to this member's own encryption key (HPKE, as a stanza is), bound to the packet id."""
    return hpke.seal(me.bundle.enc_key, _KEPT_INFO + packet_id, key, random(32))


def kept_key(me: identity.Identity, packet_id: bytes, kept: bytes) -> bytes | None:
    """K back, under this member's encryption key or one it moved from since; None if none opens it."""
    for private in (me.enc_private, *me.enc_previous):
        try:
            return hpke.open_(private, _KEPT_INFO + packet_id, kept)
        except (InvalidTag, ValueError):
            continue
    return None


def wanted(store: NodeStore, row: OutboxRow, answer: ev.Message, sent_at: int, now: int, reseals: int) -> bool:
    """Whether the broker's answer to `row`, whose upload began at `sent_at`, calls for sealing it afresh (it was
    sealed `reseals` times already in this run): the packet is older than the window allows, and its upload was
    not itself too slow (see UPLOAD_LIMIT: a review saw a 6 MiB packet on a slow link sealed and sent seven
    times). The packet's age counts, not only its wait before the upload: one that waited 250 s and took 400 s
    to upload goes through once sealed afresh."""
    return (
        isinstance(answer, ev.ErrorMessage)
        and answer.code == codes.STALE
        and reseals < MAX_RESEALS
        and now - sent_at < UPLOAD_LIMIT
        and now - row.created > RESEAL_AFTER
        and row.expires - now > RESEAL_MARGIN
        and store.outbox_kept_key(row) is not None
    )


def explained(answer: ev.Message, sent_at: int, now: int, reseals: int) -> ev.Message:
    """A final `stale` refusal with what sealing afresh could not mend said: otherwise it reads as a clock problem
    in every case."""
    if not isinstance(answer, ev.ErrorMessage) or answer.code != codes.STALE:
        return answer
    if now - sent_at >= UPLOAD_LIMIT:
        why = (
            f"its upload took {now - sent_at} s, longer than the broker's time window ({DEFAULT_WINDOW} s by "
            "default) allows: a packet this large needs a faster link to the broker"
        )
    elif reseals >= MAX_RESEALS:
        why = (
            f"sealed afresh {reseals} times and refused each time: are this node's clock and the broker's further "
            "apart than the broker's time window?"
        )
    else:
        return answer
    return ev.ErrorMessage(answer.rid, answer.code, f"{answer.message} ({why})")


async def reseal(daemon: NodeDaemon, row: OutboxRow, answer: ev.ErrorMessage) -> None:
    """Seal `row`'s packet afresh and put it in place, due now; or, if it cannot be, record the refusal as final
    with why. A store failure is raised (it ends the connection, as any other)."""
    pid = row.packet_id.hex()
    kept = daemon.store.outbox_kept_key(row)
    key = None if kept is None else kept_key(daemon.identity, row.packet_id, kept)
    # The recipients' keys as the verified log shows them now: one that moved to new keys meanwhile gets it under them.
    found = {m: report.member_bundle(daemon.follower.policy, m) for m in row.recipients}
    bundles = [b for b in found.values() if b is not None]
    missing = ", ".join(m for m, b in found.items() if b is None)
    if key is None or missing:
        why = "its kept content key does not open" if key is None else f"not in the verified directory: {missing}"
        daemon.store.outbox_failed(row.packet_id, answer.code, f"{answer.message}; cannot seal it afresh: {why}")
        daemon.settled()
        return
    now = daemon.now()
    tmp = daemon.store.tmp_path(f"reseal-{pid}.part")

    def work() -> packet.Sealed:
        with open(daemon.store.outbox_path(row.packet_id), "rb") as src:  # noqa: SIM117 - its errors are not ours
            with writing("the packet being sealed afresh", tmp), open(tmp, "w+b") as out:
                sealed = packet.reseal(
                    src, out, key=key, sender=daemon.identity, recipients=bundles, now=now, random=daemon.random
                )
                out.flush()
                os.fsync(out.fileno())
        return sealed

    try:
        try:
            sealed = await trio.to_thread.run_sync(work)
        except StoreError:
            raise  # this node's storage (a full disk), not the packet: the connection ends, it is tried again
        except OSError as exc:  # the outbox file itself is gone or unreadable: that packet cannot be sent
            raise Error(f"its outbox file cannot be read: {exc.strerror}") from None
        kept = keep_key(daemon.identity, row.packet_id, sealed.content_key, daemon.random)  # the new packet's K
        said = f"{answer.code}: {answer.message}; sealed afresh, dated {utc(now)}"  # `outbox` shows it, counted
        if daemon.store.outbox_resealed(row.packet_id, tmp, sealed.header_digest, now, kept, said):
            log.info("packet %s was refused as stale (%s): sealed afresh, dated %d", pid, answer.message, now)
    except StoreError:
        raise
    except Error as exc:
        daemon.store.outbox_failed(row.packet_id, answer.code, f"{answer.message}; cannot seal it afresh: {exc.what}")
        daemon.settled()
    finally:
        tmp.unlink(missing_ok=True)
