"""Replay the log entry by entry: signatures, consent and the traffic bookkeeping (pure; specs/audit.md).

`Replayer.feed(index, entry)` judges one entry against everything before it, exactly as the broker should have:

- entry 0 is the genesis record; it names the operator key;
- `dir`, `rule` and `stmt` records are folded into a PolicyState with signature checks on (the operator key for
  directory records and rules, the author's key as of that position for statements); a record the fold refuses
  is a finding and changes nothing, as in the broker's own fold;
- `pkt`: the header parses, its signature verifies under the sender's key as of that position, it was not stale
  at its `at` time, its packet id was not used before, and `decide(policy, meta, at)` allows every recipient;
- `ack`: signed by the recipient, naming a packet relayed before it, the recipient in its `to`;
- `retract`: signed by the packet's own sender, naming a packet relayed before it;
- `purge`: naming a packet relayed before it and one of its recipients, not before the packet expired.

Signatures of packets, acknowledgements and retractions do not change the policy state, so they are not
checked here: each becomes a `SigCheck` that the caller runs in bulk (in worker processes for long logs) and
reports back with `signature_failed`. Statement and directory signatures do change the state and are checked
inline by the fold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from valise import encoding
from valise.audit.findings import Finding
from valise.broker.relay import DEFAULT_WINDOW
from valise.errors import EncodingError, Error
from valise.genesis import Genesis
from valise.packet.format import HEADER_DOMAIN, PREFIX_SIZE, SIGNATURE_SIZE, Header
from valise.policy.decide import PacketMeta, decide
from valise.policy.records import TYPES as POLICY_TYPES
from valise.policy.state import ACTIVE, PolicyState
from valise.records import ACK_DOMAIN, ENTRY_MAX, NOTICE_MAX, PURGE_NONCE_SIZE, REASON_MAX, RETRACT_DOMAIN

# Canonical key order (sorted by UTF-8 bytes) and exact types of every traffic map the audit reads.
_PKT: dict[str, type] = {"at": int, "header": bytes, "sig": bytes, "t": str}
_NOTICE_ENTRY: dict[str, type] = {"notice": bytes, "t": str}
_PURGE: dict[str, type] = {"at": int, "digest": bytes, "recipient": str, "t": str}
# Since the nonce (records.purge_entry): both forms are valid, a log holds the old one up to some point.
_PURGE_NONCED: dict[str, type] = {"at": int, "digest": bytes, "nonce": bytes, "recipient": str, "t": str}
_NOTICE: dict[str, type] = {"body": bytes, "sig": bytes}
_ACK_BODY: dict[str, type] = {"at": int, "digest": bytes, "packet_id": bytes, "recipient": str, "sender": str, "v": int}
_RETRACT_BODY: dict[str, type] = {
    "at": int, "digest": bytes, "packet_id": bytes, "reason": str, "sender": str, "v": int
}  # fmt: skip
_NO_KEY = bytes(32)  # stands in for the operator key when entry 0 is not a genesis record: nothing verifies


@dataclass(frozen=True, slots=True)
class SigCheck:
    """An Ed25519 check to run later: `signature` over `message` (domain label included) under `public`."""

    index: int
    public: bytes
    message: bytes
    signature: bytes
    code: str
    what: str
    undo: Callable[[], None] | None = None


@dataclass(slots=True)
class Relayed:
    """What the audit keeps of a relayed packet to judge the entries that name it later."""

    index: int
    digest: bytes
    sender: str
    packet_id: bytes
    to: tuple[str, ...]
    expires: int
    acked: set[str] = field(default_factory=set)
    purged: set[str] = field(default_factory=set)
    retracted: int | None = None

    def to_json(self) -> list[Any]:
        return [
            self.index, self.digest.hex(), self.sender, self.packet_id.hex(), list(self.to), self.expires,
            sorted(self.acked), sorted(self.purged), self.retracted,
        ]  # fmt: skip

    @staticmethod
    def from_json(v: list[Any]) -> Relayed:
        return Relayed(
            v[0], bytes.fromhex(v[1]), v[2], bytes.fromhex(v[3]), tuple(v[4]), v[5], set(v[6]), set(v[7]), v[8]
        )


COUNTERS = ("entries", "packets", "acks", "retractions", "purges", "policy_records")


class Replayer:
    """The audit's fold over the log. Feed entries in order from index 0 (or from a saved state)."""

    def __init__(self, origin: str, *, window: int = DEFAULT_WINDOW) -> None:
        self.origin = origin
        self.window = window
        self.policy = PolicyState(origin, _NO_KEY)
        self.genesis: bytes | None = None
        self.policy_entries: list[tuple[int, bytes]] = []  # applied policy records: what a resume re-folds
        self.packets: dict[bytes, Relayed] = {}
        self.by_id: dict[tuple[str, bytes], bytes] = {}
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.findings: list[Finding] = []
        self.now: int | None = None  # the audit's clock (set per audit; log times past it are findings)
        # (time, index) of the latest packet or purge record, or of the last one named for falling far below it
        self.latest_time: tuple[int, int] | None = None
        self.checks: list[SigCheck] = []
        self.checks_bytes = 0  # of the messages in `checks`: a batch is bounded in bytes too (headers reach 64 KiB)

    @property
    def size(self) -> int:
        return self.policy.size

    def _find(self, index: int, code: str, what: str) -> None:
        self.findings.append(Finding(index, code, what))

    # --- the fold ------------------------------------------------------------------------------------------

    def feed(self, index: int, entry: bytes) -> None:
        if index != self.policy.size:
            raise Error(f"entry {index} fed to an audit at position {self.policy.size}")
        self.counts["entries"] += 1
        try:
            kind, m = _entry(entry)
        except EncodingError as exc:
            self._find(index, "genesis" if index == 0 else "entry-malformed", exc.what)
            self.policy.skip_to(self.policy.size + 1)
            return
        if index == 0 or kind == "genesis":
            self._genesis(index, entry)
        elif kind in POLICY_TYPES:
            self._policy(index, kind, entry)
            return  # the fold advanced (or we did) already
        elif kind == "pkt":
            self._packet(index, m, entry)
        elif kind == "ack":
            self._ack(index, m, entry)
        elif kind == "retract":
            self._retract(index, m, entry)
        elif kind == "purge":
            self._purge(index, m, entry)
        else:
            self._find(index, "entry-malformed", f"unknown entry type {kind[:40]!r}")
        self.policy.skip_to(self.policy.size + 1)

    def _genesis(self, index: int, entry: bytes) -> None:
        if index != 0:
            self._find(index, "entry-malformed", "a genesis record after entry 0")
            return
        try:
            genesis = Genesis.parse(entry, origin=self.origin)
        except Error as exc:
            self._find(index, "genesis", exc.what)
            return
        self.genesis = entry
        self.policy = PolicyState(self.origin, genesis.operator_key)

    def _policy(self, index: int, kind: str, entry: bytes) -> None:
        self.counts["policy_records"] += 1
        try:
            record = self.policy.apply(entry)
        except Error as exc:
            self._find(index, "policy-refused", str(exc))
            self.policy.skip_to(self.policy.size + 1)
            return
        if record is None:
            # Typed as policy, yet not a policy record to the fold (which takes such entries for other modules'
            # and skips them): not canonical msgpack, say. The fold advanced; the entry must not pass unnamed.
            try:
                encoding.unpack(entry, what=f"{kind} record", max_size=ENTRY_MAX)
                why = "it is not a policy record"
            except EncodingError as exc:
                why = exc.what
            self._find(index, "entry-malformed", f"a {kind!r} entry the policy fold cannot read: {why}")
            return
        self.policy_entries.append((index, entry))

    def _packet(self, index: int, m: dict[str, Any], entry: bytes) -> None:
        try:
            _strict(m, entry, "packet record", _PKT)
            header = Header.parse(m["header"])
        except Error as exc:
            self._find(index, "pkt-malformed", exc.what)
            return
        self.counts["packets"] += 1
        core, at, sig = header.core, m["at"], m["sig"]
        self._log_time(index, at, "packet")
        digest = hashlib.sha256(header.raw).digest()
        if digest in self.packets:
            self._find(
                index, "pkt-duplicate", f"packet {digest.hex()[:16]}… was logged at {self.packets[digest].index}"
            )
            return
        first = self.by_id.get((core.sender, core.packet_id))
        if first is not None:
            self._find(
                index, "pkt-replay",
                f"{core.sender} used packet id {core.packet_id.hex()} already at entry {self.packets[first].index}",
            )  # fmt: skip
        sender = self.policy.members.get(core.sender)
        if sender is None:
            self._find(
                index, "pkt-signature", f"{core.sender} is not in the directory, so nothing can verify its header"
            )
        elif len(sig) != SIGNATURE_SIZE:
            self._find(index, "pkt-signature", f"the header signature is {len(sig)} bytes")
        else:
            self._check(
                SigCheck(index, sender.sign_key, HEADER_DOMAIN + header.raw, sig, "pkt-signature",
                         f"the header does not verify under {core.sender}'s identity key at this position")
            )  # fmt: skip
        stale = core.expires <= at or abs(core.created - at) > self.window
        if core.expires <= at:
            self._find(index, "pkt-stale", f"logged at {at}, but the packet expired at {core.expires}")
        elif abs(core.created - at) > self.window:
            self._find(
                index, "pkt-stale", f"created at {core.created}, more than {self.window} s from its log time {at}"
            )
        labels = core.labels
        meta = PacketMeta(
            sender=core.sender, to=core.recipients, tlp=labels.tlp.label, categories=tuple(labels.categories),
            operation=labels.operation, size=PREFIX_SIZE + len(header.raw) + SIGNATURE_SIZE + header.ct_len,
            created=core.created, expires=None if stale else core.expires,
        )  # fmt: skip
        decision = decide(self.policy, meta, at)
        if not decision.allowed:
            reasons = "; ".join(f"{v.recipient}: {v.reason}" for v in decision.denied)
            self._find(index, "pkt-denied", f"{core.sender} → {', '.join(core.recipients)} was not allowed: {reasons}")
        self.packets[digest] = Relayed(index, digest, core.sender, core.packet_id, core.recipients, core.expires)
        self.by_id.setdefault((core.sender, core.packet_id), digest)

    def _notice(
        self, m: dict[str, Any], entry: bytes, what: str, fields: dict[str, type]
    ) -> tuple[dict[str, Any], bytes, bytes]:
        _strict(m, entry, f"{what} record", _NOTICE_ENTRY)
        if len(m["notice"]) > NOTICE_MAX:
            raise EncodingError(f"{what} is over {NOTICE_MAX} bytes")
        outer = _decode(m["notice"], what, _NOTICE)
        body = _decode(outer["body"], f"{what} body", fields)
        if body["v"] != 1 or len(body["digest"]) != 32 or len(body["packet_id"]) != 16:
            raise EncodingError(f"{what} has a bad version, digest or packet id length")
        return body, outer["body"], outer["sig"]

    def _ack(self, index: int, m: dict[str, Any], entry: bytes) -> None:
        try:
            body, raw_body, sig = self._notice(m, entry, "acknowledgement", _ACK_BODY)
        except Error as exc:
            self._find(index, "ack-malformed", exc.what)
            return
        self.counts["acks"] += 1
        recipient = body["recipient"]
        pkt = self.packets.get(body["digest"])
        if pkt is None:
            self._find(index, "ack-unknown-packet", f"{recipient} acknowledges packet {body['digest'].hex()[:16]}…")
        elif recipient not in pkt.to or body["sender"] != pkt.sender or body["packet_id"] != pkt.packet_id:
            self._find(
                index, "ack-mismatch",
                f"{recipient}'s acknowledgement of entry {pkt.index} names sender {body['sender']} and packet id "
                f"{body['packet_id'].hex()}; the packet is {pkt.sender}'s {pkt.packet_id.hex()} to {', '.join(pkt.to)}",
            )  # fmt: skip
            pkt = None
        undo = None
        if pkt is not None and recipient in pkt.acked:
            self._find(index, "ack-duplicate", f"{recipient} already acknowledged entry {pkt.index}")
        elif pkt is not None:
            pkt.acked.add(recipient)
            undo = _discard(pkt.acked, recipient)
        member = self.policy.members.get(recipient)
        if member is None:
            self._find(index, "ack-signature", f"{recipient} is not in the directory, so nothing can verify it")
            if undo is not None:
                undo()
            return
        self._check(
            SigCheck(index, member.sign_key, ACK_DOMAIN + raw_body, sig, "ack-signature",
                     f"the acknowledgement does not verify under {recipient}'s identity key", undo)
        )  # fmt: skip

    def _retract(self, index: int, m: dict[str, Any], entry: bytes) -> None:
        try:
            body, raw_body, sig = self._notice(m, entry, "retraction", _RETRACT_BODY)
        except Error as exc:
            self._find(index, "retract-malformed", exc.what)
            return
        if len(body["reason"].encode()) > REASON_MAX:
            self._find(index, "retract-malformed", f"the retraction's reason is longer than {REASON_MAX} bytes")
            return
        self.counts["retractions"] += 1
        pkt = self.packets.get(body["digest"])
        sender = body["sender"]
        if pkt is None:
            self._find(index, "retract-unknown-packet", f"{sender} retracts packet {body['digest'].hex()[:16]}…")
            return
        if sender != pkt.sender or body["packet_id"] != pkt.packet_id:
            self._find(
                index, "retract-mismatch",
                f"a retraction signed as {sender} names entry {pkt.index}, which is {pkt.sender}'s packet",
            )  # fmt: skip
            return
        undo = None
        if pkt.retracted is None:
            pkt.retracted = index
            undo = _unretract(pkt)
        member = self.policy.members.get(sender)
        if member is None:
            self._find(index, "retract-signature", f"{sender} is not in the directory")
            return
        self._check(
            SigCheck(index, member.sign_key, RETRACT_DOMAIN + raw_body, sig, "retract-signature",
                     f"the retraction does not verify under {sender}'s identity key", undo)
        )  # fmt: skip

    def _purge(self, index: int, m: dict[str, Any], entry: bytes) -> None:
        try:
            _strict(m, entry, "purge record", _PURGE_NONCED if type(m) is dict and "nonce" in m else _PURGE)
            if len(m.get("nonce", bytes(PURGE_NONCE_SIZE))) != PURGE_NONCE_SIZE:
                raise EncodingError(f"purge record nonce is not {PURGE_NONCE_SIZE} bytes")
        except Error as exc:
            self._find(index, "purge-malformed", exc.what)
            return
        self.counts["purges"] += 1
        self._log_time(index, m["at"], "purge")
        pkt = self.packets.get(m["digest"])
        if pkt is None:
            self._find(index, "purge-unknown-packet", f"purge of packet {m['digest'].hex()[:16]}… for {m['recipient']}")
            return
        if m["recipient"] not in pkt.to:
            self._find(index, "purge-not-recipient", f"entry {pkt.index} was not addressed to {m['recipient']}")
            return
        if m["at"] < pkt.expires:
            self._find(index, "purge-early", f"purged at {m['at']}, but entry {pkt.index} expires at {pkt.expires}")
        if m["recipient"] in pkt.purged:
            self._find(index, "purge-duplicate", f"{m['recipient']}'s copy of entry {pkt.index} was purged before")
        pkt.purged.add(m["recipient"])

    def _log_time(self, index: int, at: int, what: str) -> None:
        """The broker's clock as its packet and purge records show it. Expiries and purges are judged by these
        times, so a false one could pass an early purge: a purge of a packet that has not expired, dated after its
        expiry, is caught as a time past the audit's clock or, audited later, as the log's time falling back below
        it at a later record. (That later record is named, not the false one: forward jumps are routine.)"""
        if self.now is not None and at > self.now + self.window:
            self._find(index, "log-time", f"{what} logged at {at}, after the audit's clock {self.now}")
            return  # not the log's clock: later records are not held to it
        latest = self.latest_time
        if latest is None or at > latest[0]:
            self.latest_time = (at, index)
        elif at < latest[0] - self.window:
            # Held to the latest time so far, not to the record before: a clock walked back in steps under the
            # window would pass that. Once named, the drop becomes the reference (the records after it are as
            # early, and not named again), so that a second false date above it and a second drop are caught too.
            self._find(
                index, "log-time",
                f"{what} logged at {at}, {latest[0] - at} s before entry {latest[1]} (logged at {latest[0]})",
            )  # fmt: skip
            self.latest_time = (at, index)

    # --- signatures run by the caller ------------------------------------------------------------------------

    def _check(self, check: SigCheck) -> None:
        self.checks.append(check)
        self.checks_bytes += len(check.message)

    def take_checks(self) -> list[SigCheck]:
        checks, self.checks, self.checks_bytes = self.checks, [], 0
        return checks

    def signature_failed(self, check: SigCheck) -> None:
        self._find(check.index, check.code, check.what)
        if check.undo is not None:
            check.undo()

    # --- summary ---------------------------------------------------------------------------------------------

    def unacknowledged_past_expiry(self, now: int) -> int:
        """(packet, recipient) pairs with neither an acknowledgement nor a purge, expired by `now`, not retracted."""
        return sum(
            len(set(p.to) - p.acked - p.purged)
            for p in self.packets.values()
            if p.expires <= now and p.retracted is None
        )

    def summary(self, now: int) -> dict[str, int]:
        members = self.policy.members.values()
        return {
            **self.counts,
            "members": len(self.policy.members),
            "active_members": sum(1 for m in members if m.status == ACTIVE),
            "unacknowledged_past_expiry": self.unacknowledged_past_expiry(now),
            "findings": len(self.findings),
        }

    # --- persistence (plain values; no pickling) ---------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        if self.checks:
            raise Error("signature checks are still pending; run them before saving the audit state")
        return {
            "size": self.policy.size,
            "window": self.window,
            "genesis": None if self.genesis is None else self.genesis.hex(),
            "policy_entries": [[i, e.hex()] for i, e in self.policy_entries],
            "packets": [p.to_json() for p in self.packets.values()],
            "counts": dict(self.counts),
            "findings": [f.to_json() for f in self.findings],
            "latest_time": None if self.latest_time is None else list(self.latest_time),
        }

    @staticmethod
    def from_json(origin: str, value: dict[str, Any]) -> Replayer:
        """Rebuild from `to_json`: the policy is re-folded from the records this audit verified before."""
        window, counts = value["window"], value["counts"]
        if type(window) is not int or window < 0:
            raise TypeError(f"window {window!r} is not a number of seconds")
        if not isinstance(counts, dict) or any(k not in COUNTERS or type(v) is not int for k, v in counts.items()):
            raise TypeError("counts are not the audit's counters")
        r = Replayer(origin, window=window)
        if value["genesis"] is not None:
            r.genesis = bytes.fromhex(value["genesis"])
            key = Genesis.parse(r.genesis, origin=origin).operator_key
            # These records were verified when first audited; re-folding them skips only the Ed25519 checks.
            r.policy = PolicyState(origin, key, verify_signatures=False)
        for i, e in value["policy_entries"]:
            entry = bytes.fromhex(e)
            r.policy.skip_to(i)
            r.policy.apply(entry)
            r.policy_entries.append((i, entry))
        r.policy.skip_to(value["size"])
        r.policy.verify_signatures = True
        for row in value["packets"]:
            p = Relayed.from_json(row)
            r.packets[p.digest] = p
            r.by_id.setdefault((p.sender, p.packet_id), p.digest)
        r.counts.update(value["counts"])
        r.findings = [Finding.from_json(f) for f in value["findings"]]
        # Absent in states saved before it was kept; "last_time" in one version of this session's.
        latest = value.get("latest_time", value.get("last_time"))
        if latest is not None:
            at, index = latest[:2]
            if type(at) is not int or type(index) is not int:
                raise TypeError("latest_time is not [int, int]")
            r.latest_time = (at, index)
        return r


def _entry(entry: bytes) -> tuple[str, dict[str, Any]]:
    """Decode an entry's outer map (not yet checked for canonical form: `_strict` does that per type)."""
    if len(entry) > ENTRY_MAX:
        raise EncodingError(f"log entry is {len(entry)} bytes, over the limit of {ENTRY_MAX}")
    try:
        m = msgpack.unpackb(entry, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise EncodingError(f"log entry is not valid msgpack: {str(exc) or type(exc).__name__}") from None
    if type(m) is not dict or type(m.get("t")) is not str:
        raise EncodingError("log entry is not a map with a type field 't'")
    return m["t"], m


def _strict(value: Any, raw: bytes, what: str, fields: dict[str, type]) -> dict[str, Any]:
    """`value` (decoded from `raw`) is a map of exactly `fields`, in canonical key order, of exactly those types,
    and `raw` is its one canonical encoding. Every field is a scalar of a checked type (no float can hide), so
    re-encoding and comparing proves the shortest forms; the key order check proves the sorting."""
    if type(value) is not dict or tuple(value) != tuple(fields):
        if type(value) is dict and set(value) == set(fields):
            raise EncodingError(f"{what} is not in canonical msgpack form (keys out of order)")
        return encoding.check_map(value, what=what, fields=dict(fields))  # raises, naming the field
    for name, kind in fields.items():
        if type(value[name]) is not kind:
            raise EncodingError(f"{what} field {name!r} has the wrong type ({type(value[name]).__name__})")
    if msgpack.packb(value, use_bin_type=True) != raw:
        raise EncodingError(f"{what} is not in canonical msgpack form")
    return value


def _decode(raw: bytes, what: str, fields: dict[str, type]) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise EncodingError(f"{what} is not valid msgpack: {exc}") from None
    return _strict(value, raw, what, fields)


def _discard(s: set[str], item: str) -> Callable[[], None]:
    return lambda: s.discard(item)


def _unretract(pkt: Relayed) -> Callable[[], None]:
    def undo() -> None:
        pkt.retracted = None

    return undo


def verify_batch(items: Iterable[tuple[bytes, bytes, bytes]]) -> list[int]:
    """Positions in `items` of (public, message, signature) triples that do not verify (run in workers)."""
    import nacl.bindings
    import nacl.exceptions

    bad = []
    for i, (public, message, signature) in enumerate(items):
        try:
            nacl.bindings.crypto_sign_open(signature + message, public)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
            bad.append(i)
    return bad
