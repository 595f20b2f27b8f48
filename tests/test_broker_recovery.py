"""The broker catches up with its own log after a crash between the log's commit and the mailboxes' commit.

The two are separate SQLite files, so a crash can leave traffic records in the log whose mailbox changes were
lost: an acknowledgement never forwarded, a retraction never relayed, a purge that left the item queued, a packet
whose small body travelled in the lost transaction. Here the crash's result is made directly: the records are
appended to the log while the broker is stopped, as a broker that died after its log commit would leave them.
A crash-injection review (SIGKILL at those points, real processes) found each of these; see the commit message.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from valise import encoding, packet, records
from valise.broker.daemon import BrokerDaemon
from valise.broker.mailbox import Mailboxes
from valise.errors import StoreError
from valise.store.sqlite import SqliteLog
from valise.wire import codes
from valise.wire import events as ev

from .harness import WireClient, World, cli, long_reason_retraction, make_world, running_broker, seal


def _world(tmp_path: Path) -> World:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    # A broker that has served creates its mailbox store before it logs any packet; the tests below append
    # packet records as a crashed broker left them, so the store must exist as it would.
    Mailboxes.open(world.home.mailbox_path).close()
    return world


def _head(data: bytes) -> packet.Head:
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return head


async def _relayed(world: World, data: bytes) -> int:
    """Submit `data` from FRA through a broker that then stops; return its log index."""
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        receipt = await fra.submit(data)
        assert isinstance(receipt, ev.Receipt), receipt
        return receipt.index


def _ack(world: World, head: packet.Head) -> records.Ack:
    now = int(time.time())
    return records.Ack.make(world.members["DEU"].signing, head.core.packet_id, head.digest, "FRA", "DEU", now)


def _log_size(world: World) -> int:
    with SqliteLog.open(world.home.db_path) as store:
        return store.size()


async def test_an_acknowledgement_logged_before_a_crash_is_forwarded_and_its_packet_dequeued(tmp_path: Path) -> None:
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"x" * 100_000)  # spooled: its file must go only with the last reference
    head = _head(data)
    await _relayed(world, data)
    ack = records.Ack.make(
        world.members["DEU"].signing, head.core.packet_id, head.digest, "FRA", "DEU", int(time.time())
    )
    world.append(records.ack_entry(ack))  # logged; the crash took the mailbox transaction with it
    index = _log_size(world) - 1
    async with running_broker(world) as broker:
        assert not broker.mail.has_item("DEU", "packet", head.digest)
        assert not broker.spool.path(head.digest).exists()
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            fra.refuse_cosign = True
            forwarded = await fra.next_of(ev.AckForward)
            assert isinstance(forwarded, ev.AckForward)
            assert (forwarded.ack, forwarded.index, forwarded.by) == (ack.raw, index, "DEU")


async def test_a_retraction_logged_before_a_crash_is_relayed(tmp_path: Path) -> None:
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"sent by mistake")
    head = _head(data)
    await _relayed(world, data)
    retraction = records.Retraction.make(
        world.members["FRA"].signing, head.core.packet_id, head.digest, "FRA", "mistake", int(time.time())
    )
    world.append(records.retract_entry(retraction))
    async with running_broker(world) as broker, WireClient.connect(world, "DEU", broker.port) as deu:
        deu.refuse_cosign = True
        notice = await deu.next_of(ev.RetractForward)
        assert isinstance(notice, ev.RetractForward)
        assert notice.retraction == retraction.raw
        assert not broker.mail.has_item("DEU", "packet", head.digest)  # withdrawn undelivered


async def test_a_purge_logged_before_a_crash_dequeues_the_packet(tmp_path: Path) -> None:
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"y" * 100_000)
    head = _head(data)
    await _relayed(world, data)
    world.append(records.purge_entry(head.digest, "DEU", int(time.time())))
    async with running_broker(world) as broker:
        assert not broker.mail.has_item("DEU", "packet", head.digest)
        assert not broker.spool.path(head.digest).exists()


async def test_a_packet_whose_body_a_crash_lost_waits_for_its_sender_across_restarts(tmp_path: Path) -> None:
    """Its entry is in the log, its small body was in the lost transaction. The resubmission is queued at the
    logged index, even after a second restart with other traffic in between (the orphan was kept only in memory:
    the retry was logged a second time, which the auditor reports as pkt-duplicate) and even once the sender's
    time window has passed (it was refused as stale: relayed by the log, refused to the sender)."""
    world = _world(tmp_path)
    lost = seal(world, "FRA", ["DEU"], b"body lost with the mailbox transaction")
    head = _head(lost)
    world.append(records.packet_entry(head.header.raw, head.signature, int(time.time())))
    logged_at = _log_size(world) - 1
    await _relayed(world, seal(world, "FRA", ["DEU"], b"later traffic"))  # the first restart, and more packets
    size = _log_size(world)
    later = time.time() + 3600  # past the 600 s window
    async with (
        running_broker(world, clock=lambda: later) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        receipt = await fra.submit(lost)
        assert isinstance(receipt, ev.Receipt), receipt
        assert receipt.index == logged_at
        assert broker.mail.has_item("DEU", "packet", head.digest)
        assert broker.store.size() == size  # nothing logged again
    async with running_broker(world) as broker:
        assert broker.orphans == {}
        assert broker.mail.orphans() == {}


async def test_a_body_released_in_a_batch_that_does_not_commit_stays(tmp_path: Path) -> None:
    """A spool file was unlinked inside the mailbox transaction: a crash (or a rollback) before the commit left
    a queued item with no body, for good. Files now go only after the commit."""
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"z" * 100_000)
    head = _head(data)
    await _relayed(world, data)
    ack = records.Ack.make(
        world.members["DEU"].signing, head.core.packet_id, head.digest, "FRA", "DEU", int(time.time())
    )
    async with running_broker(world) as broker:
        await _rolled_back(broker, ack)
        assert broker.spool.path(head.digest).exists()
        assert broker.mail.has_item("DEU", "packet", head.digest)


async def _rolled_back(broker: BrokerDaemon, ack: records.Ack) -> None:
    class Crash(Exception):
        pass

    try:
        with broker.mail.batch():
            broker.ack_effects(ack, 7)
            raise Crash
    except Crash:
        pass
    await trio.lowlevel.checkpoint()


async def test_spool_files_nothing_refers_to_are_removed_at_start(tmp_path: Path) -> None:
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"w" * 100_000)
    await _relayed(world, data)
    stray = world.home.root / "spool" / (hashlib.sha256(b"never logged").hexdigest() + ".pkt")
    stray.write_bytes(b"left by a crash")
    kept = world.home.root / "spool" / (_head(data).digest.hex() + ".pkt")
    async with running_broker(world):
        assert not stray.exists()
        assert kept.exists()  # still queued for DEU


async def test_retracting_a_packet_again_gets_the_first_answer_and_logs_nothing(tmp_path: Path) -> None:
    """A retry after a lost answer, or a second `valise retract`, was logged and relayed once more each time."""
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"sent by mistake")
    head = _head(data)
    await _relayed(world, data)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        answers = []
        for reason in ("mistake", "mistake, again"):
            retraction = records.Retraction.make(
                world.members["FRA"].signing, head.core.packet_id, head.digest, "FRA", reason, int(time.time())
            )
            rid = fra.conn.new_rid()
            await fra.send(ev.Retract(rid, head.core.packet_id, retraction.raw))
            answer = await fra.next_of(ev.RetractResult)
            assert isinstance(answer, ev.RetractResult)
            answers.append(answer)
            size = broker.store.size()
            await trio.sleep(1.1)  # a receipt signed anew would carry a later time
        assert answers[0].index == answers[1].index == size - 1
        assert answers[0].receipt == answers[1].receipt  # protocol.md: the first one's log index and receipt
        kinds = [records.entry_type(e)[0] for e in broker.store.entries(0, size)]
        assert kinds.count("retract") == 1


async def test_an_orphan_its_sender_never_sends_again_is_purged_at_its_expiry(tmp_path: Path) -> None:
    """Logged, body lost, sender gone for good (a wiped node): it expires like any packet, each recipient's copy
    purged in the log, instead of staying relayed-but-never-settled for ever."""
    world = _world(tmp_path)
    lost = seal(world, "FRA", ["DEU"], b"never sent again", expires=int(time.time()) + 3600)
    head = _head(lost)
    world.append(records.packet_entry(head.header.raw, head.signature, int(time.time())))
    later = time.time() + 7200
    async with running_broker(world, clock=lambda: later, purge_interval=3600) as broker:
        assert (("FRA", head.core.packet_id)) in broker.orphans
        size = broker.store.size()
        await broker.purge_expired()
        purges = [records.entry_type(e)[1] for e in broker.store.entries(size, broker.store.size())]
        assert [(p["t"], p["digest"], p["recipient"]) for p in purges] == [("purge", head.digest, "DEU")]
        assert broker.orphans == {}
        assert broker.mail.orphans() == {}
        await broker.purge_expired()
        assert broker.store.size() == size + 1  # once


async def test_a_packet_redone_while_the_broker_runs_is_an_orphan_at_once(tmp_path: Path) -> None:
    """The replay also runs before each batch (a mailbox transaction that failed without the process dying): a
    packet it finds without its body must be an orphan for the running broker too, not only in the database,
    or its retry is logged a second time."""
    world = _world(tmp_path)
    lost = seal(world, "FRA", ["DEU"], b"body lost with a failed mailbox transaction")
    head = _head(lost)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        world.append(records.packet_entry(head.header.raw, head.signature, int(time.time())))
        logged_at = broker.store.size() - 1
        assert isinstance(await fra.submit(seal(world, "FRA", ["DEU"], b"the next batch")), ev.Receipt)
        size = broker.store.size()
        receipt = await fra.submit(lost)
        assert isinstance(receipt, ev.Receipt), receipt
        assert receipt.index == logged_at
        assert broker.store.size() == size  # nothing logged again


async def test_a_lost_or_truncated_mailbox_store_stops_the_broker_unless_told_to_rebuild(tmp_path: Path) -> None:
    """SQLite opens a missing or 0-byte file as a new database: the broker started with empty queues and the
    packets waiting for members were never delivered, without a word."""
    world = _world(tmp_path)
    big = seal(world, "FRA", ["DEU"], b"x" * 300_000)  # spooled to a file: its body outlives the mailbox store
    head = _head(big)
    await _relayed(world, big)
    mailbox = world.home.mailbox_path
    for name in (mailbox.name + "-wal", mailbox.name + "-shm"):
        (mailbox.parent / name).unlink(missing_ok=True)
    mailbox.write_bytes(b"")
    with pytest.raises(StoreError, match=r"mailbox\.db is missing or empty, but the log holds relayed packets"):
        BrokerDaemon(world.home)
    assert mailbox.stat().st_size == 0  # nothing was created in its place
    mailbox.unlink()
    with pytest.raises(StoreError, match="--rebuild-mailboxes"):
        BrokerDaemon(world.home)
    # Rebuilt from the log, the waiting packet is queued again and reaches its recipient.
    async with (
        running_broker(world, rebuild_mailboxes=True) as broker,
        WireClient.connect(world, "DEU", broker.port) as deu,
    ):
        deu.refuse_cosign = True
        _, got = await deu.receive_delivery()
        assert got == big
        assert broker.mail.has_item("DEU", "packet", head.digest)


async def test_a_mailbox_store_missing_a_table_is_refused(tmp_path: Path) -> None:
    world = _world(tmp_path)
    await _relayed(world, seal(world, "FRA", ["DEU"], b"waiting"))
    with sqlite3.connect(world.home.mailbox_path) as db:
        db.execute("DROP TABLE mailbox")
    db.close()
    with pytest.raises(StoreError, match=r"mailbox\.db has no table mailbox: it is damaged"):
        BrokerDaemon(world.home)


async def test_a_retraction_is_refused_for_its_reason_length_or_its_signature_and_nothing_is_logged(
    tmp_path: Path,
) -> None:
    world = _world(tmp_path)
    data = seal(world, "FRA", ["DEU"], b"sent by mistake")
    head = _head(data)
    await _relayed(world, data)
    pid = head.core.packet_id
    too_long = long_reason_retraction(world.members["FRA"].signing, pid, head.digest, "FRA")
    by_another_key = records.Retraction.make(world.members["DEU"].signing, pid, head.digest, "FRA", "no", 1).raw
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        size = broker.store.size()
        for raw, code, what in [
            (too_long, codes.REFUSED, "reason is longer than 512 bytes"),
            (by_another_key, codes.BAD_SIGNATURE, "retraction by FRA"),
        ]:
            rid = fra.conn.new_rid()
            await fra.send(ev.Retract(rid, pid, raw))
            answer = await fra.next_of(ev.ErrorMessage)
            assert isinstance(answer, ev.ErrorMessage)
            assert (answer.rid, answer.code) == (rid, code)
            assert what in answer.message
        await fra.sync()
        assert broker.store.size() == size


async def test_a_mailbox_store_older_than_its_log_stops_the_broker(tmp_path: Path) -> None:
    """A mailbox.db restored from an older backup than broker.db (or copied file by file from a running broker):
    the broker took it for the aftermath of a crash, redid the missing packet as an orphan its sender (holding a
    receipt) never sends again, and the packet was lost without a word."""
    world = _world(tmp_path)
    await _relayed(world, seal(world, "FRA", ["DEU"], b"before the backup"))
    mailbox = world.home.mailbox_path
    backup = tmp_path / "mailbox.db.bak"
    shutil.copyfile(mailbox, backup)  # the broker is stopped: the file is whole (WAL checkpointed at close)
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        receipt = await fra.submit(seal(world, "FRA", ["DEU"], b"receipted after the backup"))
        assert isinstance(receipt, ev.Receipt)
        with trio.fail_after(10):  # the broker signs a checkpoint past it
            while broker.log.latest is None or broker.log.latest.size <= receipt.index:  # noqa: ASYNC110
                await trio.sleep(0.05)
    shutil.copyfile(backup, mailbox)
    with pytest.raises(StoreError, match=r"mailbox\.db is older than the log") as refused:
        BrokerDaemon(world.home)
    assert "1 more traffic record" in str(refused.value)
    assert "restore mailbox.db from the same backup as broker.db" in (refused.value.hint or "")


async def test_a_long_reason_retraction_queued_before_the_limit_does_not_jam_its_recipient(tmp_path: Path) -> None:
    """A broker before the 512-byte limit was enforced logged and queued such a retraction; parsing it strictly
    in the pusher ended every connection of its recipient, and nothing queued behind it was ever delivered."""
    world = _world(tmp_path)
    first, second = seal(world, "FRA", ["DEU"], b"retracted"), seal(world, "FRA", ["DEU"], b"behind it")
    head = _head(first)
    old = long_reason_retraction(world.members["FRA"].signing, head.core.packet_id, head.digest, "FRA")
    await _relayed(world, first)
    async with running_broker(world) as broker:
        broker.mail.remove("DEU", "packet", head.digest)
        broker.mail.post("DEU", "retract", head.digest, encoding.pack({"index": 5, "notice": old}))
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            fra.refuse_cosign = True
            assert isinstance(await fra.submit(second), ev.Receipt)
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            forwarded = await deu.next_of(ev.RetractForward)
            assert isinstance(forwarded, ev.RetractForward)
            assert (forwarded.by, forwarded.retraction) == ("FRA", old)
            await deu.send(ev.Seen(forwarded.seq))
            _, got = await deu.receive_delivery()
            assert got == second


async def test_an_operator_command_after_a_crash_mid_commit_does_not_stop_the_broker_from_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A review: after a crash between the log's commit and the mailboxes', an operator command signed a
    checkpoint over the lost batch, and the broker then refused to start, taking mailbox.db for an old backup."""
    world = _world(tmp_path)
    await _relayed(world, seal(world, "FRA", ["DEU"], b"before"))
    lost = seal(world, "FRA", ["DEU"], b"its batch reached the log, not the mailboxes")
    head = _head(lost)
    world.append(records.packet_entry(head.header.raw, head.signature, int(time.time())))  # as the crash left it
    capsys.readouterr()
    assert cli(["broker", "member", "suspend", "--dir", str(world.home.root), "--id", "ITA", "--reason", "audit"]) == 0
    err = capsys.readouterr().err
    assert "not signing a checkpoint now: the broker's mailboxes have not taken in its last batch" in err
    assert "valise broker status" in err
    async with running_broker(world) as broker:
        assert ("FRA", head.core.packet_id) in broker.orphans  # redone: it waits for its sender's resubmission
        assert broker.policy.members["ITA"].status == "suspended"
