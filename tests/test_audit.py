"""The auditor against logs made by a real broker: real TLS traffic, real SQLite, real exported tiles, no mocks.

One log is produced once per module by running real traffic through a broker (packets, acknowledgements, a
retraction), exported with `valise log export`; each test tampers with its own copy and checks that the audit
names what was done, at which index, or refuses the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from valise import encoding, packet, records
from valise.audit import proof as audit_proof
from valise.audit import quorum
from valise.audit import verify as verify_module
from valise.audit.source import DirSource, HttpSource
from valise.audit.verify import CheckpointRefused, audit
from valise.cli.main import main as cli
from valise.crypto import sign
from valise.logservice import LogService
from valise.store.sqlite import SqliteLog
from valise.tlog import checkpoint, cosignature, note, tiles
from valise.wire import events as ev

from .harness import ORIGIN, WireClient, World, long_reason_retraction, make_world, running_broker, seal


@dataclass
class Log:
    root: Path  # the world's root (broker directory, member keys)
    export: Path  # the exported tiles of the final log
    early: Path  # an export made while the broker ran, of a smaller tree
    vkey: str
    world: World
    pkt: list[int]  # log indexes of the relayed packets
    acks: list[int]
    retract: int


async def _traffic(world: World, early: Path) -> tuple[list[int], list[int], int]:
    pkts: list[int] = []
    acks: list[int] = []
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        datas = [seal(world, "FRA", ["DEU"], b"one"), seal(world, "FRA", ["DEU", "ITA"], b"two")]
        for data in datas:
            answer = await fra.submit(data)
            assert isinstance(answer, ev.Receipt), answer
            pkts.append(answer.index)
        await trio.sleep(0.5)  # a checkpoint covering them, then an export of that smaller tree
        assert cli(["log", "export", "--dir", str(world.home.root), "--out", str(early)]) == 0
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            for _ in datas:
                seq, got = await deu.receive_delivery()
                head = packet.parse_head(got)
                assert isinstance(head, packet.Head)
                ack = records.Ack.make(
                    world.members["DEU"].signing, head.core.packet_id, head.digest, "FRA", "DEU", int(time.time())
                )
                await deu.send(ev.Ack(seq, head.core.packet_id, ack.raw))
                forwarded = await fra.next_of(ev.AckForward)
                assert isinstance(forwarded, ev.AckForward)
                acks.append(forwarded.index)
        third = seal(world, "FRA", ["ITA"], b"three")
        answer = await fra.submit(third)
        assert isinstance(answer, ev.Receipt)
        pkts.append(answer.index)
        head = packet.parse_head(third)
        assert isinstance(head, packet.Head)
        retraction = records.Retraction.make(
            world.members["FRA"].signing, head.core.packet_id, head.digest, "FRA", "sent in error", int(time.time())
        )
        rid = fra.conn.new_rid()
        await fra.send(ev.Retract(rid, head.core.packet_id, retraction.raw))
        result = await fra.next_of(ev.RetractResult)
        assert isinstance(result, ev.RetractResult)
        await trio.sleep(0.5)
    return pkts, acks, result.index


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Log:
    root = tmp_path_factory.mktemp("audit")
    world = make_world(root)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    world.consent("FRA", "ITA", "AMBER", None)
    pkts, acks, retract = trio.run(_traffic, world, root / "early")
    assert cli(["log", "export", "--dir", str(world.home.root), "--out", str(root / "export")]) == 0
    vkey = note.Ed25519Signer(ORIGIN, world.home.log_key()).verifier().vkey()
    return Log(root, root / "export", root / "early", vkey, world, pkts, acks, retract)


def _policy(log: Log, witnesses: list[cosignature.CosignatureVerifier] = (), k: int = 0) -> quorum.QuorumPolicy:  # type: ignore[assignment]
    return quorum.QuorumPolicy.simple(note.parse_vkey(log.vkey), list(witnesses), k)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _verify(directory: Path, log: Log, *extra: str) -> tuple[int, dict[str, object]]:
    out = directory.parent / f"{directory.name}.report.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli(
            ["audit", "verify", "--log", str(directory), "--broker-key", log.vkey, "--json", "--jobs", "1", *extra]
        )
    out.write_text(buf.getvalue())
    text = buf.getvalue().strip()
    return code, (json.loads(text.splitlines()[-1]) if text else {})


def _findings(report: dict[str, object]) -> list[tuple[int | None, str]]:
    found = report["findings"]
    assert isinstance(found, list)
    return [(f["index"], f["code"]) for f in found]


def _bundle_path(directory: Path) -> Path:
    (cp_size,) = [checkpoint.parse_body(note.parse_note((directory / "checkpoint").read_bytes()).text).size]
    assert cp_size < 256  # the whole test log is one bundle
    return directory / tiles.Tile(tiles.ENTRIES, 0, cp_size).path


def _rewrite_entries(directory: Path, change: object) -> None:
    path = _bundle_path(directory)
    entries = tiles.parse_entries(path.read_bytes(), int(path.name))
    assert callable(change)
    change(entries)
    path.write_bytes(tiles.encode_entries(entries))


# --- a clean log ---------------------------------------------------------------------------------------------


def test_clean_log_verifies_with_summary(log: Log) -> None:
    code, report = _verify(log.export, log)
    assert code == 0, report
    assert report["findings"] == []
    assert report["tree_verified"] is True
    summary = report["summary"]
    assert isinstance(summary, dict)
    assert summary["packets"] == 3
    assert summary["acks"] == 2
    assert summary["retractions"] == 1
    assert summary["members"] == 3
    assert summary["entries"] == report["size"]


def test_a_signature_worker_that_dies_is_an_error_not_a_traceback(log: Log, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed by the OOM killer or a signal, a worker broke the pool: BrokenProcessPool came out as a traceback."""
    from concurrent.futures import ProcessPoolExecutor

    from valise.errors import StoreError

    monkeypatch.setattr(verify_module, "CHUNK", 1)
    with ProcessPoolExecutor(1) as ex:
        ex.submit(int).result()  # the worker is up
        for proc in list(ex._processes.values()):  # the only handle on the worker to kill
            proc.kill()
            proc.join()
        with pytest.raises(StoreError, match="a process checking signatures stopped"):
            audit(DirSource(log.export), _policy(log), now=int(time.time()), executor=ex)


def test_clean_log_with_worker_processes(log: Log) -> None:
    report = audit(DirSource(log.export), _policy(log), now=int(time.time()))
    assert report.clean
    # The same through the CLI with two signature-checking processes.
    code, _ = _verify(log.export, log, "--jobs", "2")
    assert code == 0


# --- tampering with the stored log after the fact ------------------------------------------------------------


def test_flipped_byte_in_an_entry_is_named(log: Log, tmp_path: Path) -> None:
    d = _copy(log.export, tmp_path / "x")
    target = log.acks[0]

    def flip(entries: list[bytes]) -> None:
        e = bytearray(entries[target])
        e[len(e) // 2] ^= 0x01
        entries[target] = bytes(e)

    _rewrite_entries(d, flip)
    code, report = _verify(d, log)
    assert code == 4
    assert (target, "entry-altered") in _findings(report)


def test_deleted_entry_is_named(log: Log, tmp_path: Path) -> None:
    d = _copy(log.export, tmp_path / "x")
    target = log.pkt[0]
    _rewrite_entries(d, lambda entries: entries.pop(target))
    code, report = _verify(d, log)
    assert code == 4
    assert (target, "entry-missing") in _findings(report)


def test_removed_acknowledgement_is_named(log: Log, tmp_path: Path) -> None:
    d = _copy(log.export, tmp_path / "x")
    target = log.acks[1]
    _rewrite_entries(d, lambda entries: entries.pop(target))
    code, report = _verify(d, log)
    assert code == 4
    found = _findings(report)
    assert (target, "entry-missing") in found
    assert not [f for f in found if f[1] == "entry-altered"]


def test_swapped_entries_are_named(log: Log, tmp_path: Path) -> None:
    d = _copy(log.export, tmp_path / "x")
    a, b = log.pkt[1], log.acks[0]

    def swap(entries: list[bytes]) -> None:
        entries[a], entries[b] = entries[b], entries[a]

    _rewrite_entries(d, swap)
    code, report = _verify(d, log)
    assert code == 4
    found = report["findings"]
    assert isinstance(found, list)
    swapped = [f for f in found if f["code"] == "entries-swapped"]
    assert [f["index"] for f in swapped] == [min(a, b)]
    assert f"entries {min(a, b)} and {max(a, b)}" in swapped[0]["what"]


def test_flipped_byte_in_the_broker_store_then_exported(log: Log, tmp_path: Path) -> None:
    """Data at rest altered in SQLite: the stored hashes still say what was signed, so the export betrays it."""
    root = _copy(log.root, tmp_path / "w")
    db = root / "broker" / "broker.db"
    import sqlite3

    target = log.pkt[1]
    with sqlite3.connect(db) as con:
        (data,) = con.execute("SELECT data FROM log_entries WHERE idx = ?", (target,)).fetchone()
        data = bytearray(data)
        data[-3] ^= 0x40
        con.execute("UPDATE log_entries SET data = ? WHERE idx = ?", (bytes(data), target))
    assert cli(["log", "export", "--dir", str(root / "broker"), "--out", str(tmp_path / "out")]) == 0
    code, report = _verify(tmp_path / "out", log)
    assert code == 4
    assert (target, "entry-altered") in _findings(report)


def _append_signed_packet(log: Log, broker: Path, sender: str, to: list[str], payload: bytes) -> int:
    """What a dishonest broker could do: append a correctly signed packet record, relayed or not, and sign over it."""
    from valise.broker.home import BrokerHome

    head = packet.parse_head(seal(log.world, sender, to, payload))
    assert isinstance(head, packet.Head)
    home = BrokerHome.open(broker)
    with SqliteLog.open(home.db_path) as store:
        index = store.append([records.packet_entry(head.header.raw, head.signature, int(time.time()))])
        LogService(store, ORIGIN, home.log_key()).sign()
    return index


def _export_and_verify(log: Log, broker: Path, out: Path) -> tuple[int, dict[str, object], list[str]]:
    assert cli(["log", "export", "--dir", str(broker), "--out", str(out)]) == 0
    code, report = _verify(out, log)
    found = report["findings"]
    assert isinstance(found, list)
    return code, report, [f["what"] for f in found]


def test_entries_typed_as_policy_that_the_fold_cannot_read_are_named(log: Log, tmp_path: Path) -> None:
    """The fold takes an undecodable entry for another module's and skips it; typed `stmt` or `rule`, such an
    entry passed an audit without a finding. A genuine statement re-encoded with its keys out of order, and a
    `rule` carrying a float and a field no rule has, both signed over by the broker."""
    import msgpack

    from valise.broker.home import BrokerHome
    from valise.policy import records as prec

    root = _copy(log.root, tmp_path / "w")
    home = BrokerHome.open(root / "broker")
    genuine = prec.grant(
        log.world.members["FRA"].signing, origin=ORIGIN, author="FRA", created=int(time.time()), to="ITA", tlp="GREEN"
    )
    outer = encoding.unpack(genuine, what="t", max_size=65536)
    reordered = msgpack.packb({"t": outer["t"], "sig": outer["sig"], "body": outer["body"]})
    smuggled = msgpack.packb({"t": "rule", "smuggled": b"anything", "x": 1.5})
    with SqliteLog.open(home.db_path) as store:
        first = store.append([reordered, smuggled])
        LogService(store, ORIGIN, home.log_key()).sign()
    code, report, what = _export_and_verify(log, root / "broker", tmp_path / "out")
    assert code == 4
    assert _findings(report) == [(first, "entry-malformed"), (first + 1, "entry-malformed")]
    assert "a 'stmt' entry the policy fold cannot read" in what[0]
    assert "a 'rule' entry the policy fold cannot read" in what[1]


@pytest.mark.parametrize("extra", ["entry", "bytes"])
def test_a_bundle_carrying_more_than_its_width_is_named_even_when_its_entries_are_right(
    log: Log, tmp_path: Path, extra: str
) -> None:
    """Every signed entry intact, plus an entry past the bundle's width or trailing bytes: readers MUST refuse
    such a bundle (log.md), and the audit passed it with exit 0."""
    d = _copy(log.export, tmp_path / "x")
    path = _bundle_path(d)
    data = path.read_bytes()
    path.write_bytes(data + (tiles.encode_entries([b"smuggled"]) if extra == "entry" else b"\x00\x01"))
    code, report = _verify(d, log)
    assert code == 4, report
    assert _findings(report) == [(0, "bundle-malformed")]
    assert report["tree_verified"] is True


def test_appended_packet_that_no_policy_allowed(log: Log, tmp_path: Path) -> None:
    """A correctly signed packet record, DEU → FRA, which DEU never had consent for, appended and signed over."""
    root = _copy(log.root, tmp_path / "w")
    index = _append_signed_packet(log, root / "broker", "DEU", ["FRA"], b"no consent")
    code, report, what = _export_and_verify(log, root / "broker", tmp_path / "out")
    assert code == 4
    assert _findings(report) == [(index, "pkt-denied")]
    assert "DEU has not granted anything to FRA" in what[0]


def test_the_replay_judges_each_packet_by_the_rules_in_force_at_its_position(log: Log, tmp_path: Path) -> None:
    """A packet logged while an operator rule banned its category is named; the same kind of packet logged after
    the rule was lifted is not: the auditor's replay follows the lift where it is in the log."""
    broker = _copy(log.root, tmp_path / "w") / "broker"
    code, out = run_cli("broker", "rule", "ban-category", "--dir", str(broker), "--category", "malware", "--json")
    assert code == 0
    banned = _append_signed_packet(log, broker, "FRA", ["DEU"], b"while banned")
    assert cli(["broker", "rule", "lift", "--dir", str(broker), "--id", json.loads(out)["record"]]) == 0
    _append_signed_packet(log, broker, "FRA", ["DEU"], b"after the lift")
    code, report, what = _export_and_verify(log, broker, tmp_path / "out")
    assert code == 4
    assert _findings(report) == [(banned, "pkt-denied")]
    assert "category 'malware' is banned by operator rule" in what[0]


def run_cli(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli(list(argv))
    return code, buf.getvalue()


def test_forged_acknowledgement_signature(log: Log, tmp_path: Path) -> None:
    """An acknowledgement signed by ITA's key claiming to be DEU's: logged and signed over by the broker."""
    root = _copy(log.root, tmp_path / "w")
    from valise.broker.home import BrokerHome

    home = BrokerHome.open(root / "broker")
    with SqliteLog.open(home.db_path) as store:
        _, m = records.entry_type(store.entries(log.pkt[2], log.pkt[2] + 1)[0])
        header = packet.Header.parse(m["header"])
        digest = hashlib.sha256(header.raw).digest()
        ita = log.world.members["ITA"].signing
        ok = records.Ack.make(ita, header.core.packet_id, digest, "FRA", "ITA", 1)
        # A body naming DEU (not a recipient of this packet) and signed by ITA's key.
        body = encoding.pack(
            {"v": 1, "packet_id": header.core.packet_id, "digest": digest, "sender": "FRA", "recipient": "DEU", "at": 1}
        )
        raw = encoding.pack({"body": body, "sig": ita.sign(records.ACK_DOMAIN, body)})
        forged = records.Ack(header.core.packet_id, digest, "FRA", "DEU", 1, raw)
        index = store.append([records.ack_entry(forged), records.ack_entry(ok)])
        LogService(store, ORIGIN, home.log_key()).sign()
    assert cli(["log", "export", "--dir", str(root / "broker"), "--out", str(tmp_path / "out")]) == 0
    code, report = _verify(tmp_path / "out", log)
    assert code == 4
    assert _findings(report) == [(index, "ack-mismatch"), (index, "ack-signature")]
    # The same with the signatures checked in worker processes, one batch per entry so that several run at once.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify_module, "CHUNK", 1)
        mp.setattr(verify_module, "MAX_BATCHES_IN_FLIGHT", 2)
        code, report = _verify(tmp_path / "out", log, "--jobs", "2")
    assert code == 4
    assert _findings(report) == [(index, "ack-mismatch"), (index, "ack-signature")]


def test_an_acknowledgement_or_purge_logged_twice_is_named(log: Log, tmp_path: Path) -> None:
    """What a broker that lost its mailbox transaction in a crash used to do: log the recipient's re-sent
    acknowledgement again (the first never forwarded), or purge a copy twice. The auditor could not see it."""
    root = _copy(log.root, tmp_path / "w")
    from valise.broker.home import BrokerHome

    home = BrokerHome.open(root / "broker")
    with SqliteLog.open(home.db_path) as store:
        ack = store.entries(log.acks[0], log.acks[0] + 1)[0]
        _, m = records.entry_type(store.entries(log.pkt[0], log.pkt[0] + 1)[0])
        header = packet.Header.parse(m["header"])
        purge = records.purge_entry(hashlib.sha256(header.raw).digest(), header.core.recipients[0], 2**40)
        index = store.append([ack, purge, purge])
        LogService(store, ORIGIN, home.log_key()).sign()
    assert cli(["log", "export", "--dir", str(root / "broker"), "--out", str(tmp_path / "out")]) == 0
    code, report = _verify(tmp_path / "out", log)
    assert code == 4
    # (Dated 2**40, far past the audit's clock, so that neither purge is early: each is also a log-time finding.)
    assert _findings(report) == [
        (index, "ack-duplicate"),
        (index + 1, "log-time"),
        (index + 2, "log-time"),
        (index + 2, "purge-duplicate"),
    ]


def test_a_purge_with_its_nonce_is_audited_and_one_with_a_malformed_nonce_is_named(log: Log, tmp_path: Path) -> None:
    """Purges carry 16 random bytes (records.purge_entry), so a co-recipient cannot rebuild one and find it among
    the public leaf hashes; the audit takes both forms, and names a nonce of another length."""
    root = _copy(log.root, tmp_path / "w")
    from valise.broker.home import BrokerHome

    home = BrokerHome.open(root / "broker")
    with SqliteLog.open(home.db_path) as store:
        _, m = records.entry_type(store.entries(log.pkt[0], log.pkt[0] + 1)[0])
        header = packet.Header.parse(m["header"])
        digest, (first, *_) = hashlib.sha256(header.raw).digest(), header.core.recipients
        nonced = records.purge_entry(digest, first, 2**40, bytes(range(16)))
        short = encoding.pack({"t": "purge", "digest": digest, "recipient": first, "at": 2**40, "nonce": bytes(15)})
        index = store.append([nonced, short])
        LogService(store, ORIGIN, home.log_key()).sign()
    assert cli(["log", "export", "--dir", str(root / "broker"), "--out", str(tmp_path / "out")]) == 0
    code, report = _verify(tmp_path / "out", log)
    assert code == 4
    assert _findings(report) == [(index, "log-time"), (index + 1, "purge-malformed")]  # dated 2**40: log-time


def test_an_early_purge_dated_after_the_expiry_is_caught_by_the_log_time(log: Log, tmp_path: Path) -> None:
    """The broker drops a copy before its packet expires and dates the purge at the expiry, so purge-early sees
    nothing: audited now, the date is past the audit's clock; audited after the expiry, the log's clock goes back
    at the next record."""
    from valise.broker.home import BrokerHome

    root = _copy(log.root, tmp_path / "w")
    home = BrokerHome.open(root / "broker")
    with SqliteLog.open(home.db_path) as store:
        _, m = records.entry_type(store.entries(log.pkt[0], log.pkt[0] + 1)[0])
        header = packet.Header.parse(m["header"])
        purge = records.purge_entry(hashlib.sha256(header.raw).digest(), header.core.recipients[0], header.core.expires)
        head = packet.parse_head(seal(log.world, "FRA", ["DEU"], b"after"))
        assert isinstance(head, packet.Head)
        later = records.packet_entry(head.header.raw, head.signature, int(time.time()))
        index = store.append([purge, later])
        LogService(store, ORIGIN, home.log_key()).sign()
    out = tmp_path / "out"
    assert cli(["log", "export", "--dir", str(root / "broker"), "--out", str(out)]) == 0
    policy = _policy(log)
    now = int(time.time())
    assert [(f.index, f.code) for f in audit(DirSource(out), policy, now=now).findings] == [(index, "log-time")]
    after_expiry = header.core.expires + 3600
    found = audit(DirSource(out), policy, now=after_expiry).findings
    assert [(f.index, f.code) for f in found if f.code == "log-time"] == [(index + 1, "log-time")]
    assert f"before entry {index}" in next(f.what for f in found if f.code == "log-time")


def test_a_log_clock_walked_back_in_steps_under_the_window_is_still_caught(log: Log, tmp_path: Path) -> None:
    """Each record within the window of the one before it, yet the log's time ends far below the false date: held
    to the latest time so far, not to the record before."""
    from valise.broker.home import BrokerHome

    root = _copy(log.root, tmp_path / "w")
    home = BrokerHome.open(root / "broker")
    with SqliteLog.open(home.db_path) as store:
        _, m = records.entry_type(store.entries(log.pkt[0], log.pkt[0] + 1)[0])
        header = packet.Header.parse(m["header"])
        expiry, digest = header.core.expires, hashlib.sha256(header.raw).digest()
        steps = [records.purge_entry(digest, header.core.recipients[0], expiry)]
        steps += [records.purge_entry(bytes(32), "DEU", expiry - k * 500) for k in (1, 2, 3)]  # 500 s < the window
        index = store.append(steps)
        LogService(store, ORIGIN, home.log_key()).sign()
    out = tmp_path / "out"
    assert cli(["log", "export", "--dir", str(root / "broker"), "--out", str(out)]) == 0
    found = audit(DirSource(out), _policy(log), now=expiry + 3600).findings
    assert [(f.index, f.code) for f in found if f.code == "log-time"] == [(index + 2, "log-time")]  # named once


def test_a_second_false_date_after_a_named_drop_is_caught_too(log: Log, tmp_path: Path) -> None:
    """After one drop was named, a second false date still below the first (a purge dated at its expiry) and a
    second drop went unnamed: the named drop is now the reference."""
    from valise.broker.home import BrokerHome

    root = _copy(log.root, tmp_path / "w")
    home = BrokerHome.open(root / "broker")
    e = int(time.time()) + 86400
    times = [e + 7200, e - 3600, e, e - 3600]  # a false date, the real time, a second false date, the real time
    with SqliteLog.open(home.db_path) as store:
        index = store.append([records.purge_entry(bytes(32), "DEU", t) for t in times])
        LogService(store, ORIGIN, home.log_key()).sign()
    out = tmp_path / "out"
    assert cli(["log", "export", "--dir", str(root / "broker"), "--out", str(out)]) == 0
    found = audit(DirSource(out), _policy(log), now=e + 8000).findings
    assert [f.index for f in found if f.code == "log-time"] == [index + 1, index + 3]


# --- checkpoints refused -------------------------------------------------------------------------------------


def test_unknown_signer_is_refused(log: Log) -> None:
    other = note.Ed25519Signer(ORIGIN, sign.SigningKey(bytes(32))).verifier().vkey()
    code = cli(["audit", "verify", "--log", str(log.export), "--broker-key", other, "--jobs", "1"])
    assert code == 5
    with pytest.raises(CheckpointRefused, match="no verifiable signatures"):
        audit(DirSource(log.export), quorum.QuorumPolicy.simple(note.parse_vkey(other), [], 0), now=0)


def _witness(name: str) -> cosignature.Cosigner:
    return cosignature.Cosigner(name, sign.SigningKey(hashlib.sha256(name.encode()).digest()))


def _cosign(directory: Path, witnesses: list[cosignature.Cosigner], *, forge: str | None = None) -> None:
    raw = (directory / "checkpoint").read_bytes()
    cp = checkpoint.parse_body(note.parse_note(raw).text)
    sigs = []
    for w in witnesses:
        s = w.cosign(cp, 1_790_000_000)
        if w.name == forge:
            s = note.Signature(s.name, s.key_id, s.sig[:-1] + bytes([s.sig[-1] ^ 1]))
        sigs.append(s)
    (directory / "checkpoint").write_bytes(cosignature.add_cosignatures(raw, sigs))


def test_witness_quorum_and_forged_cosignature(log: Log, tmp_path: Path) -> None:
    a, b, c = _witness("w.example/a"), _witness("w.example/b"), _witness("w.example/c")
    d = _copy(log.export, tmp_path / "x")
    _cosign(d, [a, b])
    keys = [w.verifier().vkey() for w in (a, b, c)]
    args = ["--witness", keys[0], "--witness", keys[1], "--witness", keys[2]]
    code, report = _verify(d, log, *args, "--quorum", "2")
    assert code == 0
    assert (report["cosigners"], report["unchecked_cosigners"]) == (["w.example/a", "w.example/b"], [])  # key names
    # Trusting only a: b's cosignature is present but unchecked, and said so (not silently dropped).
    code, report = _verify(d, log, "--witness", keys[0])
    assert (code, report["cosigners"], report["unchecked_cosigners"]) == (0, ["w.example/a"], ["w.example/b"])
    code, report = _verify(d, log)
    assert (report["cosigners"], report["unchecked_cosigners"]) == ([], ["w.example/a", "w.example/b"])
    assert _verify(d, log, *args, "--quorum", "3")[0] == 5
    assert _verify(d, log, *args)[0] == 5  # default quorum: all of them
    # A policy file: a group of two out of three, then all three.
    text = f"log {log.vkey}\nwitness a {keys[0]}\nwitness b {keys[1]}\nwitness c {keys[2]}\n"
    (tmp_path / "two.policy").write_text(text + "group g 2 a b c\nquorum g\n")
    (tmp_path / "all.policy").write_text(text + "group g all a b c  # every one\nquorum g\n")
    assert _verify(d, log, "--policy", str(tmp_path / "two.policy"))[0] == 0
    assert _verify(d, log, "--policy", str(tmp_path / "all.policy"))[0] == 5
    # A forged cosignature by a configured witness rejects the checkpoint, even when the quorum is otherwise met.
    f = _copy(log.export, tmp_path / "forged")
    _cosign(f, [a, b, c], forge="w.example/c")
    assert _verify(f, log, *args, "--quorum", "2")[0] == 5


def test_resume_verifies_only_new_entries(log: Log, tmp_path: Path) -> None:
    state = tmp_path / "audit.state"
    code, first = _verify(log.early, log, "--state", str(state))
    assert code == 0, first
    assert first["verified_from"] == 0
    saved = json.loads(state.read_text())
    assert saved["size"] == first["size"]
    assert "pickle" not in state.read_text()
    code, second = _verify(log.export, log, "--state", str(state))
    assert code == 0, second
    assert second["verified_from"] == first["size"]
    assert second["size"] == json.loads(state.read_text())["size"]
    summary = second["summary"]
    assert isinstance(summary, dict)
    assert (summary["packets"], summary["acks"]) == (3, 2)  # counts carry over the resume
    # The same checkpoint again: nothing new, still clean.
    assert _verify(log.export, log, "--state", str(state))[0] == 0
    # And now an older checkpoint: backwards, refused.
    assert _verify(log.early, log, "--state", str(state))[0] == 5


def test_a_damaged_state_file_is_an_error_not_a_traceback(
    log: Log, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "audit.state"
    assert _verify(log.early, log, "--state", str(state))[0] == 0
    good = json.loads(state.read_text())
    damaged = {
        "deep": "[" * 100_000,  # was RecursionError
        "checkpoint": json.dumps({**good, "checkpoint": 5}),  # was AttributeError
        "packets": json.dumps({**good, "replay": {**good["replay"], "packets": [[]]}}),  # was IndexError
        # These loaded, then raised TypeError once the log had new entries:
        "window": json.dumps({**good, "replay": {**good["replay"], "window": "600"}}),
        "counts": json.dumps({**good, "replay": {**good["replay"], "counts": {"entries": "x"}}}),
    }
    for name, text in damaged.items():
        state.write_text(text)
        capsys.readouterr()
        argv = ["audit", "verify", "--log", str(log.export), "--broker-key", log.vkey, "--state", str(state)]
        assert cli(argv) == 2, name
        err = capsys.readouterr().err
        assert f"{state}" in err, name
        assert "audit state" in err, name
        assert "Traceback" not in err


def test_consistency_proof_that_does_not_verify(log: Log, tmp_path: Path) -> None:
    state = tmp_path / "audit.state"
    assert _verify(log.early, log, "--state", str(state))[0] == 0
    d = _copy(log.export, tmp_path / "x")
    size = checkpoint.parse_body(note.parse_note((d / "checkpoint").read_bytes()).text).size
    tile = d / tiles.Tile(0, 0, size).path
    data = bytearray(tile.read_bytes())
    data[-1] ^= 1  # the last leaf hash: part of every proof from the early tree
    tile.write_bytes(bytes(data))
    assert _verify(d, log, "--state", str(state))[0] == 5
    # The held state is unchanged: the untampered export still verifies from it.
    assert _verify(log.export, log, "--state", str(state))[0] == 0


def _fork(log: Log, where: Path, payloads: list[bytes]) -> Path:
    """A copy of the broker whose log continues with `payloads` as entries, signed with the real log key."""
    root = _copy(log.root, where)
    from valise.broker.home import BrokerHome

    home = BrokerHome.open(root / "broker")
    with SqliteLog.open(home.db_path) as store:
        store.append([records.purge_entry(hashlib.sha256(p).digest(), "DEU", 0) for p in payloads])
        LogService(store, ORIGIN, home.log_key()).sign()
    out = where.parent / f"{where.name}-export"
    assert cli(["log", "export", "--dir", str(root / "broker"), "--out", str(out)]) == 0
    return out


def test_split_view_is_refused_and_kept_as_evidence(log: Log, tmp_path: Path) -> None:
    a = _fork(log, tmp_path / "a", [b"a"])
    b = _fork(log, tmp_path / "b", [b"b"])
    b2 = _fork(log, tmp_path / "b2", [b"b", b"c"])
    state = tmp_path / "mon.state"
    args = ["audit", "monitor", "--broker-key", log.vkey, "--state", str(state), "--once", "--jobs", "1", "--json"]
    assert cli([*args, "--log", str(log.export)]) == 0
    held = state.read_bytes()
    # Fork a extends the export; its purge names no packet, which is a finding (exit 4), but the tree is fine.
    assert cli([*args, "--log", str(a)]) == 4
    held = state.read_bytes()
    assert cli([*args, "--log", str(b)]) == 5  # the same size, another root: a split view
    assert state.read_bytes() == held  # the held checkpoint did not move
    evidence = sorted((tmp_path / "mon.state.evidence").iterdir())
    assert [p.suffix for p in evidence] == [".held", ".refused"]
    assert evidence[1].read_bytes() == (b / "checkpoint").read_bytes()
    # Both are validly signed by the log key: a portable proof of the fork.
    v = note.parse_vkey(log.vkey)
    cps = [checkpoint.open_checkpoint(p.read_bytes(), v)[0] for p in evidence]
    assert cps[0].size == cps[1].size
    assert cps[0].root != cps[1].root
    assert cli([*args, "--log", str(b2)]) == 5  # larger, but not consistent with the held tree


# --- live log over HTTP, and proofs --------------------------------------------------------------------------


async def test_monitor_over_http_follows_a_live_broker(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    vkey = note.Ed25519Signer(ORIGIN, world.home.log_key()).verifier().vkey()
    state = tmp_path / "mon.state"

    def monitor(url: str) -> int:
        return cli(
            ["audit", "monitor", "--log", url, "--broker-key", vkey, "--state", str(state), "--once", "--jobs", "1"]
        )

    async with (
        running_broker(world, serve_entries=True) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        url = f"http://127.0.0.1:{broker.http_port}"
        assert isinstance(await fra.submit(seal(world, "FRA", ["DEU"], b"1")), ev.Receipt)
        await trio.sleep(0.5)
        assert await trio.to_thread.run_sync(monitor, url) == 0
        size1 = json.loads(state.read_text())["size"]
        for payload in (b"2", b"3"):
            assert isinstance(await fra.submit(seal(world, "FRA", ["DEU"], payload)), ev.Receipt)
        await trio.sleep(0.5)
        assert await trio.to_thread.run_sync(monitor, url) == 0
        assert json.loads(state.read_text())["size"] == size1 + 2
        report = await trio.to_thread.run_sync(
            lambda: audit(
                HttpSource(url), quorum.QuorumPolicy.simple(note.parse_vkey(vkey), [], 0), now=int(time.time())
            )
        )
        assert report.clean
        assert report.summary["packets"] == 3


def test_a_proof_of_a_hostile_entry_that_is_in_the_log_is_described_without_a_crash(log: Log, tmp_path: Path) -> None:
    """A broker can log, and sign over, anything typed "pkt": a proof of it verifies (it is in the log), and
    describing it raised KeyError or TypeError."""
    from valise.broker.home import BrokerHome

    root = _copy(log.root, tmp_path / "w")
    home = BrokerHome.open(root / "broker")
    hostile = [encoding.pack({"t": "pkt", "at": 1}), encoding.pack({"t": "pkt", "header": 7, "sig": b"", "at": 1})]
    with SqliteLog.open(home.db_path) as store:
        first = store.append(hostile)
        LogService(store, ORIGIN, home.log_key()).sign()
    out = tmp_path / "out"
    assert cli(["log", "export", "--dir", str(root / "broker"), "--out", str(out)]) == 0
    for index in (first, first + 1):
        path = tmp_path / f"{index}.proof"
        path.write_bytes(audit_proof.export_proof(DirSource(out), index, _policy(log)))
        code, text = run_cli("audit", "proof", str(path), "--broker-key", log.vkey, "--json")
        assert code == 0
        assert json.loads(text)["type"] == "pkt"
        assert "sender" not in json.loads(text)


def test_proof_files_are_read_no_further_than_a_bundle_can_go(log: Log, capsys: pytest.CaptureFixture[str]) -> None:
    """`audit proof /dev/zero` grew to 8 GB; a 3 GB file was read whole before its size was checked."""
    assert cli(["audit", "proof", "/dev/zero", "--broker-key", log.vkey]) == 2
    assert "/dev/zero is over" in capsys.readouterr().err


def test_proof_bundle_export_and_verify(log: Log, tmp_path: Path) -> None:
    policy = _policy(log)
    index = log.pkt[1]
    bundle = audit_proof.export_proof(DirSource(log.export), index, policy)
    path = tmp_path / "p.proof"
    path.write_bytes(bundle)
    proven = audit_proof.verify_proof(bundle, policy)
    assert proven.index == index
    assert proven.describe()["sender"] == "FRA"
    code, text = run_cli("audit", "proof", str(path), "--broker-key", log.vkey)
    assert code == 0
    assert "  to: DEU, ITA\n" in text  # for a person: not a Python list, and a date, not Unix seconds
    at = proven.describe()["at"]
    assert f"  at: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(at))}\n" in text
    # Another entry in place of the carried one: the inclusion fails.
    other = audit_proof.export_proof(DirSource(log.export), log.pkt[0], policy)
    from valise.tlog import proofbundle

    mixed = proofbundle.parse(bundle)
    carried = proofbundle.parse(other).extra
    path.write_bytes(proofbundle.create(mixed.index, mixed.proof, mixed.checkpoint_note, carried))
    assert cli(["audit", "proof", str(path), "--broker-key", log.vkey]) == 1
    # An unknown log key.
    other_key = note.Ed25519Signer(ORIGIN, sign.SigningKey(bytes(32))).verifier().vkey()
    path.write_bytes(bundle)
    assert cli(["audit", "proof", str(path), "--broker-key", other_key]) != 0


def test_a_logged_retraction_whose_reason_is_over_the_limit_is_named(log: Log, tmp_path: Path) -> None:
    """protocol.md caps a retraction's reason at 512 bytes; a broker that logged a longer one (signed by the
    sender all the same) is named, as it would be for any malformed notice."""
    root = _copy(log.root, tmp_path / "w")
    index = _append_signed_packet(log, root / "broker", "FRA", ["DEU"], b"retracted at length")
    from valise.broker.home import BrokerHome

    home = BrokerHome.open(root / "broker")
    with SqliteLog.open(home.db_path) as store:
        (entry,) = store.entries(index, index + 1)
        header = packet.Header.parse(encoding.unpack(entry, what="pkt", max_size=65536)["header"])
        digest = hashlib.sha256(header.raw).digest()
        raw = long_reason_retraction(log.world.members["FRA"].signing, header.core.packet_id, digest, "FRA")
        at = store.append([encoding.pack({"t": "retract", "notice": raw})])
        LogService(store, ORIGIN, home.log_key()).sign()
    code, report, what = _export_and_verify(log, root / "broker", tmp_path / "out")
    assert code == 4
    assert (at, "retract-malformed") in _findings(report)
    assert any("longer than 512 bytes" in w for w in what)


def test_an_auditor_with_only_public_material_gets_the_witness_keys_the_log_shows(log: Log, tmp_path: Path) -> None:
    """A walkthrough's auditor could not check cosignatures: `audit verify` pointed at `policy show`, which needs
    a broker directory or a node. `--witness-keys` lists each active member's key from the verified directory,
    in the form the next run pins them with."""
    code, report = _verify(log.export, log, "--witness-keys")
    assert code == 0
    keys = report["witness_keys"]
    assert isinstance(keys, dict)
    expected = {
        m: cosignature.CosignatureVerifier(m, ident.bundle.sign_key).vkey() for m, ident in log.world.members.items()
    }
    assert keys == expected
    pinned = [a for vkey in keys.values() for a in ("--witness", vkey)]
    code, again = _verify(log.export, log, *pinned, "--quorum", "0")  # this export's note carries no cosignature
    assert code == 0, again
    assert (again["cosigners"], again["unchecked_cosigners"]) == ([], [])
    code, _ = _verify(log.export, log, "--witness-keys", "--tree-only")
    assert code == 2  # the directory comes from the entries, which --tree-only does not read
