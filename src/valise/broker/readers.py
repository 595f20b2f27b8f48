"""Who may read a log entry in full (pure; specs/protocol.md, "Reading the log").

Directory, policy and genesis records are for every member (`EVERYONE`). A traffic record is for the members it
names: a packet for its sender and recipients, an acknowledgement for the packet's sender and the recipient
that signed it, a retraction for the sender and the packet's recipients, a purge for the recipient whose copy
expired. Everyone else gets a hash in its place.

The broker records these readers when it appends an entry (mailbox.py, table `readers`), so serving a member
the log costs what that member may read plus a few subtree hashes, not a parse and a hash of every entry for
every member (at 196 members that was 196 parses of each entry).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from valise import records
from valise.errors import Error
from valise.packet.format import Header

EVERYONE = "*"  # not a member id (those are [A-Za-z0-9._-]): the readers of a public record

# A retraction names the packet by its header digest; its recipients are in the packet's own entry.
RecipientsOf = Callable[[bytes], Sequence[str] | None]


def readers_of(entry: bytes, recipients_of: RecipientsOf) -> tuple[str, ...]:
    """The members that may read `entry` in full, or (EVERYONE,); () for an entry nobody may read (it does not
    parse, or names a packet unknown here)."""
    try:
        kind, m = records.entry_type(entry)
        if kind == "pkt":
            core = Header.parse(m["header"]).core
            return (core.sender, *core.recipients)
        if kind == "ack":
            ack, _, _ = records.Ack.parse(m["notice"])
            return (ack.sender, ack.recipient)
        if kind == "retract":
            retraction, _, _ = records.Retraction.parse(m["notice"], logged=True)
            recipients = recipients_of(retraction.digest)
            return (retraction.sender, *(recipients or ()))
        if kind == "purge":
            recipient = m.get("recipient")
            return (recipient,) if isinstance(recipient, str) else ()
    except Error:
        return ()
    return (EVERYONE,)
