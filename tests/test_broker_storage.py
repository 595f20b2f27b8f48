"""A broker whose storage fails (a full disk, a quota): it keeps serving everyone, gives no receipt for what is not
durable, logs nothing twice, and catches up by itself once it can write again; the audit stays clean.

Two real failures: the mailbox store's own connection refusing writes (SQLite's query_only, a real refusal by
the engine, which the broker sees as it sees "database or disk is full") while the log's store still writes,
which is the state a full disk leaves when the log's small transaction fits and the mailboxes' larger one does
not; and `valise broker serve` as a real process under a file size limit (RLIMIT_FSIZE: writes past it fail as
on a full disk), lifted from outside with prlimit."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import pytest
import trio

from valise import packet, records
from valise.broker.daemon import BrokerDaemon
from valise.cli.main import main as cli
from valise.store import sqlfile
from valise.wire import codes
from valise.wire import events as ev

from .harness import WireClient, World, log_vkey, make_world, running_broker, seal
from .test_node_daemon import wait_for


def _head(data: bytes) -> packet.Head:
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    return head


def _deu_ack(world: World, head: packet.Head) -> records.Ack:
    """DEU's signed acknowledgement of FRA's packet `head`."""
    deu = world.members["DEU"].signing
    return records.Ack.make(deu, head.core.packet_id, head.digest, "FRA", "DEU", int(time.time()))


async def _receipted(world: World, fra: WireClient, text: bytes) -> packet.Head:
    """FRA's packet to DEU, submitted and receipted."""
    data = seal(world, "FRA", ["DEU"], text)
    assert isinstance(await fra.submit(data), ev.Receipt)
    return _head(data)


class _CommitRefused:
    """mailbox.db's connection, whose COMMIT fails while `failing` (what a full disk does once a transaction's
    pages no longer fit): every write before it succeeds, and the mailboxes roll back as they do for real."""

    def __init__(self, guarded: sqlfile.Guarded) -> None:
        self.guarded = guarded
        self.failing = False

    def execute(self, sql: str, args: Sequence[object] = ()) -> sqlite3.Cursor:
        if self.failing and sql == "COMMIT":
            raise self.guarded.failure(sqlite3.OperationalError("database or disk is full"))
        return self.guarded.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> sqlite3.Cursor:
        return self.guarded.executemany(sql, rows)

    @property
    def in_transaction(self) -> bool:
        return self.guarded.in_transaction

    def close(self) -> None:
        self.guarded.close()


# How the mailboxes fail: at their first write (SQLite refusing it: the connection made read-only), or only at
# COMMIT, after every change of the batch was made (the in-memory bookkeeping must not keep them).
MODES = ("write", "commit")
CAUSES = {"write": "attempt to write a readonly database", "commit": "database or disk is full"}


def _mailboxes_writable(broker: BrokerDaemon, writable: bool, mode: str = "write") -> None:
    if mode == "write":
        broker.mail._db.execute(f"PRAGMA query_only = {'OFF' if writable else 'ON'}")
        return
    if not isinstance(broker.mail._db, _CommitRefused):
        broker.mail._db = _CommitRefused(broker.mail._db)  # type: ignore[assignment]
    broker.mail._db.failing = not writable


def _logged(broker: BrokerDaemon, kind: str) -> list[int]:
    """The log indexes of the entries of `kind` ("pkt", "ack", ...)."""
    size = broker.store.size()
    return [i for i, e in enumerate(broker.store.entries(0, size)) if records.entry_type(e)[0] == kind]


async def _audit_clean(broker: BrokerDaemon, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Once a checkpoint covers the whole log: export it and verify it as an auditor, with no findings."""
    await wait_for(lambda: broker.log.latest is not None and broker.log.latest.size == broker.store.size())
    out = root / "export"
    assert await trio.to_thread.run_sync(cli, ["log", "export", "--dir", str(broker.home.root), "--out", str(out)]) == 0
    capsys.readouterr()
    vkey = broker.log.verifier.vkey()
    argv = ["audit", "verify", "--log", str(out), "--broker-key", vkey, "--json", "--jobs", "1"]
    assert await trio.to_thread.run_sync(cli, argv) == 0
    assert json.loads(capsys.readouterr().out)["findings"] == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [40, 40_000], ids=["small", "spooled"])
async def test_a_packet_logged_while_the_mailboxes_cannot_write_is_queued_once_and_never_logged_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str, size: int
) -> None:
    world = make_world(tmp_path, ("FRA", "DEU"))
    world.consent("FRA", "DEU")
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        data = seal(world, "FRA", ["DEU"], bytes(size))
        head = _head(data)
        _mailboxes_writable(broker, False, mode)
        answer = await fra.submit(data)
        assert isinstance(answer, ev.ErrorMessage)
        assert answer.code == codes.INTERNAL
        assert f"the packet is logged, but the broker's storage failed: {CAUSES[mode]}" in answer.message
        assert str(tmp_path) not in answer.message  # the member is told why, not the broker's paths
        (index,) = _logged(broker, "pkt")  # in the log, with no receipt given

        # The broker serves on; the node's retries, while the store still fails, are not logged again.
        for _ in range(2):
            again = await fra.submit(data)
            assert isinstance(again, ev.ErrorMessage)
            assert again.code == codes.INTERNAL
            assert _logged(broker, "pkt") == [index]
        await trio.sleep(0.5)  # checkpoint rounds pass: none may be signed over the entry the mailboxes lack
        assert broker.log.latest is not None
        assert broker.log.latest.size <= index

        _mailboxes_writable(broker, True, mode)  # space again
        receipt = await fra.submit(data)  # the node's retry
        assert isinstance(receipt, ev.Receipt), receipt
        assert receipt.index == index
        assert _logged(broker, "pkt") == [index]
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            seq, got = await deu.receive_delivery()
            assert got == data
            await deu.sync()
            ack = _deu_ack(world, head)
            await deu.send(ev.Ack(seq, head.core.packet_id, ack.raw))
            forwarded = await fra.next_of(ev.AckForward)
            assert isinstance(forwarded, ev.AckForward)
            await fra.send(ev.Seen(forwarded.seq))
        await _audit_clean(broker, tmp_path, capsys)


@pytest.mark.parametrize("mode", MODES)
async def test_an_acknowledgement_and_a_retraction_logged_while_the_mailboxes_cannot_write_are_applied_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """The recipient's connection is not ended for it (its node would reconnect at once, again and again), a
    push of the same packet again is not logged a second time, and the sender gets the acknowledgement once the
    store takes it; a retraction asked for meanwhile is answered `internal`, then with its one logged index."""
    world = make_world(tmp_path, ("FRA", "DEU"))
    world.consent("FRA", "DEU")
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        head = await _receipted(world, fra, b"acknowledged while the disk was full")
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            seq, _ = await deu.receive_delivery()
            await deu.sync()
            ack = _deu_ack(world, head)
            _mailboxes_writable(broker, False, mode)
            await deu.send(ev.Ack(seq, head.core.packet_id, ack.raw))
            await wait_for(lambda: _logged(broker, "ack"))
            # DEU's connection stays up, and answers a ping.
            await deu.send(ev.Ping(1))
            assert isinstance(await deu.next_of(ev.Pong), ev.Pong)
        # DEU reconnects: the packet, still in its mailbox, is pushed again and acknowledged again: not logged again.
        async with WireClient.connect(world, "DEU", broker.port) as deu:
            deu.refuse_cosign = True
            seq, _ = await deu.receive_delivery()
            await deu.send(ev.Ack(seq, head.core.packet_id, ack.raw))
            await deu.send(ev.Ping(2))
            await deu.next_of(ev.Pong)
        assert len(_logged(broker, "ack")) == 1

        retraction = records.Retraction.make(
            world.members["FRA"].signing, head.core.packet_id, head.digest, "FRA", "wrong desk", int(time.time())
        )
        for _ in range(3):  # asked again and again while the store fails: logged once
            await fra.send(ev.Retract(fra.conn.new_rid(), head.core.packet_id, retraction.raw))
            refused = await fra.next_of(ev.ErrorMessage)
            assert isinstance(refused, ev.ErrorMessage)
            assert refused.code == codes.INTERNAL
        (retracted_at,) = _logged(broker, "retract")

        _mailboxes_writable(broker, True, mode)
        forwarded = await fra.next_of(ev.AckForward)  # the acknowledgement, applied from the log
        assert isinstance(forwarded, ev.AckForward)
        assert forwarded.id == head.core.packet_id
        await fra.send(ev.Seen(forwarded.seq))
        rid = fra.conn.new_rid()
        await fra.send(ev.Retract(rid, head.core.packet_id, retraction.raw))
        answer = await fra.next_of(ev.RetractResult)
        assert isinstance(answer, ev.RetractResult)
        assert answer.index == retracted_at
        assert len(_logged(broker, "ack")) == 1
        assert _logged(broker, "retract") == [retracted_at]
        await _audit_clean(broker, tmp_path, capsys)


async def test_confirmations_the_mailboxes_cannot_record_do_not_stop_the_broker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A review: a node confirming a forwarded acknowledgement (`seen`) while mailbox.db could not be written
    stopped the broker for every member. The item stays, and is pushed again."""
    world = make_world(tmp_path, ("FRA", "DEU"))
    world.consent("FRA", "DEU")
    async with running_broker(world) as broker:
        async with WireClient.connect(world, "FRA", broker.port) as fra:
            fra.refuse_cosign = True
            head = await _receipted(world, fra, b"confirmed while the disk was full")
            async with WireClient.connect(world, "DEU", broker.port) as deu:
                deu.refuse_cosign = True
                seq, _ = await deu.receive_delivery()
                await deu.sync()
                ack = _deu_ack(world, head)
                await deu.send(ev.Ack(seq, head.core.packet_id, ack.raw))
            forwarded = await fra.next_of(ev.AckForward)
            assert isinstance(forwarded, ev.AckForward)
            _mailboxes_writable(broker, False)
            await fra.send(ev.Seen(forwarded.seq))
            # The committer has run the batch with the confirmation, and failed it.
            await wait_for(lambda: "confirmation(s) not recorded" in caplog.text)
            await fra.send(ev.Ping(1))
            await fra.next_of(ev.Pong)
            _mailboxes_writable(broker, True)
        async with WireClient.connect(world, "FRA", broker.port) as fra:  # the broker runs on; the item comes again
            fra.refuse_cosign = True
            again = await fra.next_of(ev.AckForward)
            assert isinstance(again, ev.AckForward)
            assert again.id == head.core.packet_id


# --- the broker as a real process under a file size limit ---------------------------------------------------

LIMIT = 1 << 20  # no broker file may grow past 1 MiB: a fresh broker's stores fit, a 3 MiB packet does not
LAUNCHER = (
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY));"
    " os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def _serve_limited(directory: Path, log: BinaryIO) -> subprocess.Popen[bytes]:
    serve = ["-m", "valise.cli.main", "broker", "serve", "--dir", str(directory), "--listen", "127.0.0.1:0",
             "--http", "127.0.0.1:0", "--checkpoint-interval", "0.2"]  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(LIMIT), *serve], stdout=subprocess.PIPE, stderr=log)


async def test_a_packet_the_broker_cannot_spool_is_refused_alone_and_taken_once_it_can(tmp_path: Path) -> None:
    """A review: a spool file the broker could not write ended the sender's connection with no error frame, and
    its node reconnected and uploaded it again ~10 times a second. Now that upload is answered `internal`, the
    connection carries on (a small packet behind it is receipted), and the packet goes once there is room."""
    world = make_world(tmp_path, ("FRA", "DEU"))
    world.consent("FRA", "DEU")
    log = (tmp_path / "broker.log").open("wb")
    proc = _serve_limited(world.home.root, log)
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        port = int(line.split(b"listening on 127.0.0.1:")[1].split(b",")[0])
        async with WireClient.connect(world, "FRA", port) as fra:
            fra.refuse_cosign = True
            big = seal(world, "FRA", ["DEU"], os.urandom(3 << 20))
            answer = await fra.submit(big)
            assert isinstance(answer, ev.ErrorMessage), answer
            assert answer.code == codes.INTERNAL
            assert "the broker could not store the packet: File too large" in answer.message
            assert str(world.home.root) not in answer.message  # the member is told why, not the broker's paths
            small = seal(world, "FRA", ["DEU"], b"behind it")
            assert isinstance(await fra.submit(small), ev.Receipt)
            assert list((world.home.root / "spool").glob("*.part")) == []
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            receipt = await fra.submit(big)
            assert isinstance(receipt, ev.Receipt), receipt
            digest = hashlib.sha256(_head(big).header.raw).digest()
            assert (world.home.root / "spool" / f"{digest.hex()}.pkt").exists()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()
    assert "Traceback" not in (tmp_path / "broker.log").read_text()
    assert log_vkey(world)  # the directory is still a broker's


async def test_purges_and_statements_while_the_mailboxes_cannot_commit_are_logged_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A review: a packet that expired while the mailboxes could not commit was purged at every purger round
    (purge-duplicate), and a member's statement, logged and in force, was answered as not logged, its retries
    refused as replays. Now one purge is logged, and the statement gets its receipt."""
    from valise.policy import records as prec

    world = make_world(tmp_path, ("FRA", "DEU", "ITA"))
    world.consent("FRA", "DEU")
    async with (
        running_broker(world, purge_interval=0.1) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        fra.refuse_cosign = True
        data = seal(world, "FRA", ["DEU"], b"expires while the disk is full", expires=int(time.time()) + 2)
        assert isinstance(await fra.submit(data), ev.Receipt)
        _mailboxes_writable(broker, False, "commit")
        await wait_for(lambda: _logged(broker, "purge"))
        await trio.sleep(0.5)  # five more purger rounds
        assert len(_logged(broker, "purge")) == 1

        grant = prec.grant(world.members["FRA"].signing, origin=world.home.config().origin, author="FRA",
                           created=int(time.time()), to="ITA", tlp="GREEN")  # fmt: skip
        rid = fra.conn.new_rid()
        await fra.send(ev.Statement(rid, grant))
        result = await fra.next_of(ev.StatementResult)
        assert isinstance(result, ev.StatementResult)
        assert result.index == broker.store.size() - 1

        _mailboxes_writable(broker, True, "commit")
        await wait_for(lambda: not broker.mail.pending("DEU"))
        assert len(_logged(broker, "purge")) == 1
        await _audit_clean(broker, tmp_path, capsys)


@pytest.mark.parametrize("notice", ["ack", "retract"])
async def test_a_copy_acknowledged_or_retracted_while_the_mailboxes_cannot_commit_is_not_purged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], notice: str
) -> None:
    """A review: an acknowledgement (or a retraction) logged while the mailboxes could not commit left the copy
    in DEU's mailbox, so when it expired the purger logged a purge too: the log said the copy was delivered and
    dropped undelivered. The purger skips copies whose acknowledgement or retraction is in flight."""
    world = make_world(tmp_path, ("FRA", "DEU"))
    world.consent("FRA", "DEU")
    async with (
        running_broker(world, purge_interval=0.1) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
    ):
        fra.refuse_cosign = True
        data = seal(world, "FRA", ["DEU"], b"settled, then expired", expires=int(time.time()) + 2)
        head = _head(data)
        assert isinstance(await fra.submit(data), ev.Receipt)
        _mailboxes_writable(broker, False, "commit")
        if notice == "ack":
            async with WireClient.connect(world, "DEU", broker.port) as deu:
                deu.refuse_cosign = True
                seq, _ = await deu.receive_delivery()
                await deu.sync()
                await deu.send(ev.Ack(seq, head.core.packet_id, _deu_ack(world, head).raw))
                await wait_for(lambda: _logged(broker, "ack"))
        else:
            retraction = records.Retraction.make(
                world.members["FRA"].signing, head.core.packet_id, head.digest, "FRA", "", int(time.time())
            )
            await fra.send(ev.Retract(fra.conn.new_rid(), head.core.packet_id, retraction.raw))
            await fra.next_of(ev.ErrorMessage)
        await trio.sleep(2.5)  # expired, and the purger has run many times
        assert _logged(broker, "purge") == []
        _mailboxes_writable(broker, True, "commit")
        await wait_for(lambda: not broker.mail.pending("DEU") or notice == "retract")
        await trio.sleep(0.3)
        assert _logged(broker, "purge") == []
        await _audit_clean(broker, tmp_path, capsys)
