"""Findings: what an audit found wrong, at which log index, and why it matters (pure; specs/audit.md).

A finding is a fact about the log, not an exception: the auditor keeps going after one, so that a single run
reports everything it can. Each code has one fixed explanation of why it matters; the `what` text says what
exactly was wrong at that entry. Codes are stable (scripts match on them); specs/audit.md lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# code -> why it matters (one sentence a reader of the report needs to judge the finding).
WHY: dict[str, str] = {
    # the tree: the entries served do not make the tree the log signed
    "tree-root": "the entries do not hash to the root the log signed: they are not the log the broker committed to",
    "entry-altered": "the entry differs from the one the log signed; anything read from it cannot be trusted",
    "entry-missing": "an entry the log signed was removed; what it recorded is hidden from the reader",
    "entries-swapped": "two signed entries were exchanged; the log order, which policy replay relies on, is false",
    "bundle-malformed": "an entry bundle does not hold the entries its tile promises: entries were cut, added or moved",
    # entry form
    "genesis": "entry 0 must name the operator key; without it no directory record can be checked",
    "entry-malformed": "the broker logged bytes that no valise component writes; a log entry must be a known record",
    # policy records
    "policy-refused": "a directory record, rule or statement the policy fold refuses was logged anyway",
    # packets
    "pkt-malformed": "the packet record cannot be read, so what was relayed cannot be checked",
    "pkt-signature": "the header is not signed by the sender's key at that position: the broker relayed a forgery",
    "pkt-denied": "the policy in force at that position did not allow the relay: consent was not given",
    "pkt-replay": "the sender's packet id was used twice for different packets; the broker must refuse replays",
    "pkt-duplicate": "the same packet was logged twice; the broker answers a resubmission with its first receipt",
    "pkt-stale": "the packet was outside its validity window when logged, which the broker must refuse",
    # acknowledgements
    "ack-malformed": "the acknowledgement cannot be read",
    "ack-signature": "the acknowledgement is not signed by the recipient's key: a delivery was claimed for someone",
    "ack-unknown-packet": "the acknowledgement names no packet relayed before it",
    "ack-mismatch": "the acknowledgement does not fit the packet it names (sender, id or recipient)",
    "ack-duplicate": "the recipient's acknowledgement of this packet was already logged: the broker logs one and "
    "forwards that one to the sender",
    # retractions
    "retract-malformed": "the retraction cannot be read",
    "retract-signature": "the retraction is not signed by the packet's sender: only the sender may withdraw it",
    "retract-unknown-packet": "the retraction names no packet relayed before it",
    "retract-mismatch": "the retraction does not fit the packet it names (sender or id)",
    # purges
    "purge-malformed": "the purge record cannot be read",
    "purge-unknown-packet": "the purge names no packet relayed before it",
    "purge-not-recipient": "the purge names a member the packet was not addressed to",
    "purge-early": "the broker dropped a packet before it expired, which it may not do",
    "purge-duplicate": "this recipient's copy of the packet was already purged; a copy is purged once",
    # the broker's clock
    "log-time": "a record's log time is after the audit's clock, or well before a time the log already showed: "
    "expiries and purges are judged by these times, and a false one can hide an early purge",
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing wrong with the log: at entry `index` (None for the tree as a whole), code, what, why."""

    index: int | None
    code: str
    what: str

    @property
    def why(self) -> str:
        return WHY.get(self.code, "")

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "code": self.code, "what": self.what, "why": self.why}

    @staticmethod
    def from_json(value: dict[str, Any]) -> Finding:
        return Finding(value["index"], value["code"], value["what"])

    def line(self) -> str:
        where = "log" if self.index is None else f"entry {self.index}"
        return f"{where}: {self.code}: {self.what} — {self.why}"
