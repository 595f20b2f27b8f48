"""The node's log follower over a real log (MemoryLog + LogService, real signed checkpoints): no mocks."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

import pytest

from valise import identity, packet, records
from valise.crypto import sign
from valise.errors import CheckpointError, NoteError
from valise.genesis import Genesis
from valise.logservice import LogService
from valise.node.follower import PAGE, Committed, Follower, ForkError, LogMismatchError, Update
from valise.policy import records as policy_records
from valise.policy.state import MAX_LIVE_STATEMENTS
from valise.store.memory import MemoryLog
from valise.tlog import merkle

from .conftest import NOW, seeded_random

ORIGIN = "valise.test/log"
BROKER = "broker"
BROKER_ID = identity.generate(BROKER, seeded_random(b"broker"), NOW)


class Log:
    """A real log as a broker keeps it, with the redaction rule the broker applies when serving entries."""

    def __init__(self, seed: bytes = b"log") -> None:
        rnd = seeded_random(seed)
        self.operator = sign.SigningKey(rnd(32))
        self.service = LogService(MemoryLog(), ORIGIN, sign.SigningKey(rnd(32)))
        self.seq = 0
        self.add(Genesis(ORIGIN, self.operator.public, BROKER_ID.bundle).entry())

    @property
    def vkey(self) -> str:
        return self.service.verifier.vkey()

    def add(self, *entries: bytes) -> bytes:
        _, cp = self.service.append_and_sign(list(entries), 0.0)
        return cp.note

    def admit(self, member: identity.Identity) -> bytes:
        self.seq += 1
        b = member.bundle
        return self.add(
            policy_records.dir_record(
                self.operator,
                ORIGIN,
                self.seq,
                NOW,
                "member-add",
                id=b.member_id,
                kind="country",
                name=b.member_id,
                region="EU",
                bundle=b.raw,
            )
        )

    def page(self, start: int, end: int, member: str) -> tuple[list[bytes], list[int], list[int]]:
        """Entries [start, end) as the broker serves them to `member` (at most a tile's worth of items): entries it
        may read in full, the runs of other members' traffic in between as stored complete-subtree hashes."""
        store = self.service.store
        readable = []
        for i, e in enumerate(store.entries(start, end)):
            kind, m = records.entry_type(e)
            if kind != "pkt" or member in _parties(m["header"]):
                readable.append(start + i)
        plan = merkle.covering(start, end, readable, 256)
        subtrees = store.read_hashes(
            [merkle.stored_hash_index(level, at >> level) for at, level in plan if level is not None]
        )
        out: list[bytes] = []
        hashed: list[int] = []
        levels: list[int] = []
        for at, level in plan:
            if level is None:
                out.append(store.entries(at, at + 1)[0])
            else:
                hashed.append(len(out))
                levels.append(level)
                out.append(subtrees.pop(0))
        return out, hashed, levels


def _parties(header: bytes) -> set[str]:
    core = packet.Header.parse(header).core
    return {core.sender, *core.recipients}


def pkt_entry(sender: identity.Identity, to: list[identity.Identity], seed: bytes) -> bytes:
    out = io.BytesIO()
    packet.seal(
        io.BytesIO(b"x" * 10), out, sender=sender, recipients=[t.bundle for t in to], tlp="AMBER",
        now=NOW, random=seeded_random(seed),
    )  # fmt: skip
    head = packet.parse_head(out.getvalue())
    assert isinstance(head, packet.Head)
    return records.packet_entry(head.header.raw, head.signature, NOW)


Serve = Callable[[int, int], tuple[list[bytes], list[int]]]


def follow(f: Follower, log: Log, note: bytes, serve: Serve | None = None) -> Committed | None:
    update = f.begin(note)
    if update is None:
        return None
    while (want := update.wanted()) is not None:
        entries, hashed, levels = (serve or (lambda s, e: log.page(s, e, f.member)))(*want)
        update.add(want[0], entries, hashed, levels)
    return f.commit(update)


def test_follows_the_log_and_learns_the_directory_from_it(members: dict[str, identity.Identity]) -> None:
    log = Log()
    log.admit(members["FRA"])
    note = log.admit(members["DEU"])
    f = Follower(log.vkey, "FRA", BROKER)
    assert f.member_key("DEU") is None
    done = follow(f, log, note)
    assert done is not None
    assert (f.size, f.root) == (3, log.service.latest.root)  # type: ignore[union-attr]
    assert f.member_key("DEU") == members["DEU"].bundle.sign_key
    assert f.policy is not None
    assert f.policy.size == 3
    assert [i for i, _ in done.keep] == [0, 1, 2]
    assert follow(f, log, note) is None  # the same checkpoint again changes nothing


def test_a_logged_statement_over_a_limit_is_refused_and_the_follower_goes_on(
    members: dict[str, identity.Identity],
) -> None:
    """The broker should never log a statement past a member's limit of live statements; if it does (a bug, or
    on purpose), that entry is a refused one like any the policy rejects, not an error that stops following."""
    log = Log()
    log.admit(members["FRA"])
    note = log.admit(members["DEU"])
    f = Follower(log.vkey, "FRA", BROKER)
    assert follow(f, log, note) is not None
    deu = members["DEU"].signing
    log.add(*[
        policy_records.grant(deu, origin=ORIGIN, author="DEU", created=NOW + i, to="FRA", tlp="AMBER")
        for i in range(MAX_LIVE_STATEMENTS + 1)
    ])  # fmt: skip
    note = log.admit(members["ITA"])
    done = follow(f, log, note)
    assert done is not None
    assert f.size == 3 + MAX_LIVE_STATEMENTS + 2
    ((problem, evidence),) = done.problems
    assert f"log entry {3 + MAX_LIVE_STATEMENTS} is refused by the policy" in problem
    assert (3 + MAX_LIVE_STATEMENTS, evidence) in done.keep  # kept: a later version may fold it
    assert f.member_key("ITA") == members["ITA"].bundle.sign_key  # what came after it was folded


def test_traffic_served_in_full_is_not_held_until_the_commit(members: dict[str, identity.Identity]) -> None:
    """A broker that serves every entry in full (other members' traffic too, against the redaction rule): the
    update keeps only what the fold uses (genesis, policy records, this member's packets), so a large tree does
    not grow the node's memory with it; the checkpoint is still verified and followed."""
    fra, deu, ita = members["FRA"], members["DEU"], members["ITA"]
    log = Log()
    for m in (fra, deu, ita):
        log.admit(m)
    log.add(*[pkt_entry(deu, [ita], b"o%d" % i) for i in range(PAGE + 10)])
    mine = pkt_entry(fra, [deu], b"mine")
    note = log.add(mine)
    f = Follower(log.vkey, "FRA", BROKER)
    update = f.begin(note)
    assert update is not None
    while (want := update.wanted()) is not None:
        start, end = want
        update.add(start, log.service.store.entries(start, end)[:256], (), ())  # everything in full
    assert sorted(update.full) == [0, 1, 2, 3, 4 + PAGE + 10]  # genesis, three admissions, FRA's packet
    assert sorted(update.parsed) == [4 + PAGE + 10]  # nor is what the others' entries hold kept, decoded
    done = f.commit(update)
    assert f.size == 4 + PAGE + 10 + 1
    assert [i for i, _ in done.mine] == [4 + PAGE + 10]


def test_redacted_traffic_keeps_positions_and_my_packets_are_noted(members: dict[str, identity.Identity]) -> None:
    fra, deu, ita = members["FRA"], members["DEU"], members["ITA"]
    log = Log()
    for m in (fra, deu, ita):
        log.admit(m)
    # Enough traffic between others to need several pages, then one packet of FRA's and a statement by FRA.
    others = [pkt_entry(deu, [ita], b"o%d" % i) for i in range(PAGE + 10)]
    log.add(*others)
    mine = pkt_entry(fra, [deu], b"mine")
    log.add(mine)
    grant = policy_records.grant(fra.signing, origin=ORIGIN, author="FRA", created=NOW, to="DEU", tlp="AMBER")
    note = log.add(grant)
    f = Follower(log.vkey, "FRA", BROKER)
    served: list[tuple[int, int]] = []

    answers: list[int] = []

    def serve(s: int, e: int) -> tuple[list[bytes], list[int], list[int]]:
        served.append((s, e))
        page = log.page(s, e, "FRA")
        answers.append(len(page[0]))
        return page

    done = follow(f, log, note, serve)
    assert done is not None
    assert served == [(0, log.service.store.size())]  # one request: the others' traffic came as a few subtrees
    assert answers[0] < 4 + 2 * (PAGE + 10).bit_length() + 2
    size = log.service.store.size()
    assert f.size == size
    mine_index = size - 2
    assert done.mine == [(mine_index, hashlib.sha256(records.entry_type(mine)[1]["header"]).digest())]
    assert f.policy is not None
    (stmt,) = f.policy.statements.values()
    assert stmt.position == size - 1  # counted past the hashed entries
    assert done.problems == []


def test_restore_refolds_without_refetching_and_keeps_following(members: dict[str, identity.Identity]) -> None:
    log = Log()
    log.admit(members["FRA"])
    log.add(pkt_entry(members["DEU"], [members["ITA"]], b"x"))
    note = log.admit(members["DEU"])
    f = Follower(log.vkey, "FRA", BROKER)
    done = follow(f, log, note)
    assert done is not None
    g = Follower.restore(log.vkey, "FRA", BROKER, done.state, done.keep)
    assert g.policy is not None
    assert f.policy is not None
    assert g.policy.snapshot() == f.policy.snapshot()
    assert (g.size, g.root, g.note) == (f.size, f.root, f.note)
    assert g.policy.verify_signatures
    note2 = log.admit(members["ITA"])
    assert follow(g, log, note2) is not None
    assert g.member_key("ITA") == members["ITA"].bundle.sign_key


def test_fork_and_rollback_are_refused_with_the_note_as_evidence(members: dict[str, identity.Identity]) -> None:
    log = Log(b"same")
    old_note = log.admit(members["FRA"])
    note = log.admit(members["DEU"])
    f = Follower(log.vkey, "FRA", BROKER)
    follow(f, log, note)
    with pytest.raises(ForkError, match="older") as rollback:
        f.begin(old_note)
    assert rollback.value.evidence == old_note
    # A second log with the same key: same size, different last entry -> a validly signed fork.
    fork = Log(b"same")
    fork.admit(members["FRA"])
    fork_note = fork.admit(members["ITA"])
    with pytest.raises(ForkError, match="two different roots") as forked:
        f.begin(fork_note)
    assert forked.value.evidence == fork_note
    assert f.size == 3  # nothing changed


def test_inconsistent_proof_offered_with_a_checkpoint_is_a_fork(members: dict[str, identity.Identity]) -> None:
    log = Log(b"p")
    note = log.admit(members["FRA"])
    f = Follower(log.vkey, "FRA", BROKER)
    follow(f, log, note)
    other = Log(b"p")
    other.admit(members["DEU"])
    other_note = other.admit(members["ITA"])
    proof = other.service.consistency_proof(2)
    with pytest.raises(ForkError, match="not consistent"):
        f.begin(other_note, (2, proof))


def test_served_entries_must_hash_to_the_root(members: dict[str, identity.Identity]) -> None:
    log = Log()
    log.admit(members["FRA"])
    note = log.admit(members["DEU"])
    f = Follower(log.vkey, "FRA", BROKER)

    def lie(s: int, e: int) -> tuple[list[bytes], list[int], list[int]]:
        entries, hashed, levels = log.page(s, e, "FRA")
        entries[2] = log.service.store.entries(1, 2)[0]  # serve FRA's admission twice
        return entries, hashed, levels

    with pytest.raises(LogMismatchError, match="do not hash to the root"):
        follow(f, log, note, lie)
    assert (f.size, f.policy) == (0, None)


def test_hiding_the_genesis_or_a_wrong_genesis_is_refused(members: dict[str, identity.Identity]) -> None:
    log = Log()
    note = log.admit(members["FRA"])
    f = Follower(log.vkey, "FRA", BROKER)
    update = f.begin(note)
    assert isinstance(update, Update)
    entries, _, _ = log.page(0, 2, "FRA")
    with pytest.raises(LogMismatchError, match="genesis"):
        update.add(0, [merkle.hash_leaf(entries[0]), entries[1]], [0], [0])
    with pytest.raises(LogMismatchError, match="genesis"):  # inside a subtree hash
        update.add(0, [log.service.store.read_hashes([merkle.stored_hash_index(1, 0)])[0]], [0], [1])
    with pytest.raises(LogMismatchError, match="pinned broker"):
        follow(Follower(log.vkey, "FRA", "other-broker"), log, note)
    with pytest.raises(LogMismatchError, match="pinned broker"):  # right name, another key
        follow(Follower(log.vkey, "FRA", BROKER, members["FRA"].bundle.sign_key), log, note)
    assert follow(Follower(log.vkey, "FRA", BROKER, BROKER_ID.bundle.sign_key), log, note) is not None


def test_a_log_without_genesis_is_refused(members: dict[str, identity.Identity]) -> None:
    service = LogService(MemoryLog(), ORIGIN, sign.SigningKey(bytes(32)))
    _, cp = service.append_and_sign([pkt_entry(members["FRA"], [members["DEU"]], b"g")], 0.0)
    f = Follower(service.verifier.vkey(), "FRA", BROKER)
    update = f.begin(cp.note)
    assert update is not None
    update.add(0, service.store.entries(0, 1), [], [])
    with pytest.raises(LogMismatchError, match="genesis"):
        f.commit(update)


def test_checkpoints_from_another_key_are_refused(members: dict[str, identity.Identity]) -> None:
    log, other = Log(b"a"), Log(b"b")
    note = other.admit(members["FRA"])
    f = Follower(log.vkey, "FRA", BROKER)
    with pytest.raises(NoteError):
        f.begin(note)
    with pytest.raises(CheckpointError, match="not usable"):
        Follower("not a vkey", "FRA", BROKER)


def test_subtree_hashes_that_do_not_fit_the_tree_are_refused(members: dict[str, identity.Identity]) -> None:
    """A broker's subtree items must start where such a subtree can, stay within the checkpoint, and say their
    level; anything else is refused before the root is even compared."""
    fra, deu, ita = members["FRA"], members["DEU"], members["ITA"]
    log = Log()
    for m in (fra, deu, ita):
        log.admit(m)
    note = log.add(*[pkt_entry(deu, [ita], b"s%d" % i) for i in range(12)])  # entries 4..15: ITA's and DEU's
    f = Follower(log.vkey, "FRA", BROKER)
    store = log.service.store
    head = store.entries(0, 4)

    def attempt(items: list[bytes], hashed: list[int], levels: list[int]) -> None:
        update = f.begin(note)
        assert update is not None
        update.add(0, head, [], [])
        update.add(4, items, hashed, levels)

    four = store.read_hashes([merkle.stored_hash_index(2, 1)])[0]  # the subtree of entries 4..7
    with pytest.raises(LogMismatchError, match="cannot start after 5 leaves"):
        attempt([store.entries(4, 5)[0], four], [1], [2])
    with pytest.raises(LogMismatchError, match="beyond the checkpoint"):
        attempt([four, four, four, four], [0, 1, 2, 3], [2, 2, 2, 2])
    with pytest.raises(LogMismatchError, match="a level for some"):
        attempt([four], [0], [])
    with pytest.raises(LogMismatchError, match="outside the page, or twice"):
        attempt([four], [3], [2])
    update = f.begin(note)
    assert update is not None
    update.add(0, head, [], [])
    update.add(4, [four, four, four], [0, 1, 2], [2, 2, 2])  # the right shape, the wrong subtrees
    with pytest.raises(LogMismatchError, match="do not hash to the root"):
        f.commit(update)
    assert f.size == 0
