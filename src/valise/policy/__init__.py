"""Directory and sharing policy: signed records folded from the log, and decisions with reasons (pure).

- `records`  the byte layout of directory records, operator rules and member statements, and their signing;
- `state`    PolicyState, folded from log entries in order (deterministic, atomic per entry);
- `decide`   PacketMeta → per-recipient allow/deny with a reason;
- `matrix`   the effective channels between all members.

specs/policy.md is the authority on formats and rules.
"""

from valise.policy.decide import Decision, PacketMeta, Verdict, decide
from valise.policy.matrix import Channel, channels
from valise.policy.records import Record
from valise.policy.state import Group, Member, PolicyState, Rule, Statement

__all__ = [
    "Channel",
    "Decision",
    "Group",
    "Member",
    "PacketMeta",
    "PolicyState",
    "Record",
    "Rule",
    "Statement",
    "Verdict",
    "channels",
    "decide",
]
