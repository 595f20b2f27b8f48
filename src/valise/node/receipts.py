"""Receipt export: an offline proof that a packet this member sent is in the log (an I/O edge over the session).

`valise receipt export` asks the daemon for a C2SP tlog-proof bundle (specs/log.md, "Proof bundles") that
`valise audit proof FILE --broker-key VKEY` verifies anywhere, with nothing but the log key. The receipt alone
is the broker's word; the bundle ties the packet to a checkpoint the log key signed (and the witnesses cosigned):

1. the broker's latest checkpoint (`get-checkpoint`, with its cosignatures) is followed first, so it is one this
   node verified itself (consistent with everything before), and, under a witness policy, one that meets the
   quorum; it must cover the receipt's index;
2. the inclusion proof of the index in that tree (`get-inclusion`), and the entry itself (`get-entries`: a packet
   record names its sender, so the broker serves it in full), which must be this very packet: a `pkt` record
   whose header digest is the receipt's digest, sent by this member;
3. `audit.proof.build_proof` checks all of it as the verifier will and writes the bundle, the entry as its
   extra data when it fits (4096 bytes), so the one format is made in one place.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from valise import records
from valise.audit import proof as audit_proof
from valise.audit.quorum import QuorumPolicy
from valise.errors import Error, NoteError
from valise.packet.format import Header
from valise.tlog import proofbundle
from valise.wire import events as ev

if TYPE_CHECKING:
    from valise.node.daemon import NodeDaemon
    from valise.node.store import OutboxRow


@dataclass(frozen=True, slots=True)
class Exported:
    bundle: bytes  # the tlog-proof bundle
    entry: bytes  # the log entry (also inside the bundle when it fits)
    carried: bool  # whether the bundle carries the entry as its extra data
    size: int  # the checkpoint's tree size
    cosigners: list[str]  # the policy's witnesses that cosigned it (empty without a policy)
    unchecked_cosigners: list[str]  # other cosignatures on the note, by keys the node does not pin


async def export_receipt(daemon: NodeDaemon, row: OutboxRow) -> Exported:
    """A proof bundle for the receipted packet `row`, from the broker's latest checkpoint (see the module doc)."""
    if row.state != "receipted" or row.log_index is None:
        raise Error(f"packet {row.packet_id.hex()} is {row.state}: only a receipted packet has a log entry to prove")
    session = daemon.session
    if session is None:
        raise Error("the broker is unreachable right now", hint="try again when `valise status` says connected")
    index = row.log_index
    answer = await session.request(ev.GetCheckpoint)
    if not isinstance(answer, ev.Checkpoint):
        raise Error(f"the broker gave no checkpoint: {answer}")
    signed = answer.checkpoint
    await daemon.sync(session, signed)  # the checkpoint must be one this node verified (ForkError: an alarm)
    f = daemon.follower
    cp = f.open(signed)
    if (cp.size, cp.root) != (f.size, f.root):
        raise Error(f"the broker's checkpoint of size {cp.size} is not the one this node verified (size {f.size})")
    if index >= cp.size:
        raise Error(
            f"the latest checkpoint (size {cp.size}) does not cover log index {index} yet",
            hint="the broker signs a checkpoint every second or so; try again",
        )
    policy = daemon.quorum or QuorumPolicy.simple(f.verifier, [], 0)
    if daemon.quorum is not None:
        try:
            daemon.quorum.open(signed)
        except NoteError as exc:
            raise Error(
                f"the checkpoint of size {cp.size} is awaiting the witness quorum: {exc.what}",
                hint="a bundle is only made from a checkpoint that meets the node's quorum; try again later",
            ) from None
        if f.trusted_size < cp.size:  # it met the quorum, so sync trusted it; this guards that rule
            raise Error(f"the checkpoint of size {cp.size} is not in use by this node yet")
    answer = await session.request(lambda rid: ev.GetInclusion(rid, index, cp.size))
    if not isinstance(answer, ev.Inclusion):
        raise Error(f"the broker gave no inclusion proof for index {index}: {answer}")
    proof = answer.proof
    answer = await session.request(lambda rid: ev.GetEntries(rid, index, index + 1))
    if not isinstance(answer, ev.Entries) or answer.start != index or len(answer.entries) != 1 or answer.hashed:
        raise Error(f"the broker did not serve log entry {index} in full: {answer}")
    entry = answer.entries[0]
    check_entry(daemon, row, entry)
    bundle = audit_proof.build_proof(signed, index, proof, entry, policy)
    proven = audit_proof.verify_proof(bundle, policy, entry)  # what the holder will run, before it leaves us
    carried = proofbundle.parse(bundle).extra == entry
    return Exported(bundle, entry, carried, cp.size, proven.cosigners, proven.unchecked_cosigners)


def check_entry(daemon: NodeDaemon, row: OutboxRow, entry: bytes) -> None:
    """The entry must be this packet's `pkt` record (the inclusion proof then shows it is at the index)."""
    try:
        kind, m = records.entry_type(entry)
        header = Header.parse(m["header"]) if kind == "pkt" and isinstance(m.get("header"), bytes) else None
    except Error:
        header = None
    digest = hashlib.sha256(header.raw).digest() if header is not None else None
    if header is None or digest != row.digest or header.core.sender != daemon.member:
        message = (
            f"receipt for packet {row.packet_id.hex()} promised log index {row.log_index}, "
            "but the broker serves another entry there"
        )
        daemon.alarm("receipt", message, row.receipt)
        raise Error(message)
