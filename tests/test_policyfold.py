"""The broker's own policy fold reads only what its mailboxes recorded as public, and still folds to the state a
full fold gives: real broker, real traffic over TLS, real SQLite, operator commands appending while it is stopped."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from valise import packet, records
from valise.broker import policyfold
from valise.broker.daemon import BrokerDaemon
from valise.cli.main import main as cli
from valise.cli.policy import load_state
from valise.errors import StoreError
from valise.policy import PolicyState
from valise.store.sqlite import SqliteLog
from valise.wire import events as ev

from .harness import WireClient, World, make_world, running_broker, seal


class CountingLog(SqliteLog):
    """The real SQLite log, counting the entries a fold reads (an observation, nothing replaced)."""

    read = 0

    def entries(self, start: int, end: int) -> list[bytes]:
        got = super().entries(start, end)
        self.read += len(got)
        return got

    def entries_at(self, indexes: Sequence[int]) -> list[bytes]:
        got = super().entries_at(indexes)
        self.read += len(got)
        return got


async def _traffic(world: World, packets: int) -> None:
    async with (
        running_broker(world) as broker,
        WireClient.connect(world, "FRA", broker.port) as fra,
        WireClient.connect(world, "DEU", broker.port) as deu,
    ):
        for i in range(packets):
            receipt = await fra.submit(seal(world, "FRA", ["DEU"], b"%d" % i))
            assert isinstance(receipt, ev.Receipt), receipt
            seq, got = await deu.receive_delivery()
            head = packet.parse_head(got)
            assert isinstance(head, packet.Head)
            now = int(time.time())
            ack = records.Ack.make(world.members["DEU"].signing, head.core.packet_id, head.digest, "FRA", "DEU", now)
            await deu.send(ev.Ack(seq, head.core.packet_id, ack.raw))
            await fra.next_of(ev.AckForward)
        # Policy changes the running broker takes in among the traffic: they must be in its public index.
        assert cli(["broker", "rule", "max-tlp", "--dir", str(world.home.root), "--tlp", "AMBER"]) == 0
        await trio.sleep(0.5)


def _full_fold(world: World, store: SqliteLog) -> PolicyState:
    return load_state(world.home, store, verify=True)


async def test_the_indexed_fold_reads_only_public_entries_and_agrees_with_a_full_fold(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    await _traffic(world, 30)
    # Appended while the broker is stopped: past the mailboxes' mark, read in full.
    assert cli(["broker", "member", "suspend", "--dir", str(world.home.root), "--id", "ITA", "--reason", "x"]) == 0
    with CountingLog.open(world.home.db_path) as store:
        assert isinstance(store, CountingLog)
        index = policyfold.read_public_index(world.home.mailbox_path, store)
        store.read = 0  # the index's check read one entry
        size = store.size()
        assert index.mark == size - 1  # everything but the suspension was taken in by the broker
        indexed = load_state(world.home, store)
        read = store.read
        assert indexed.snapshot() == _full_fold(world, store).snapshot()
    # 30 packets and 30 acknowledgements are never read; genesis (twice: it names the operator key), the members,
    # the consent and the rule are, the entry just below the mark (to check the index is this log's), and the
    # suspension past the mark.
    assert read == 2 + len(index.public) + (size - index.mark)  # + the entry below the mark, which ties it
    assert read <= size - 60 + 2
    assert indexed.members["ITA"].status == "suspended"
    assert indexed.tlp_limit is not None
    # The broker itself starts from the same fold.
    async with running_broker(world) as broker:
        assert broker.policy.snapshot() == indexed.snapshot()


async def test_without_a_mailbox_index_the_fold_reads_everything(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    await _traffic(world, 5)
    world.home.mailbox_path.unlink()  # a broker directory copied without it, say: slower, still right
    with CountingLog.open(world.home.db_path) as store:
        assert isinstance(store, CountingLog)
        state = load_state(world.home, store)
        assert store.read == 1 + store.size()  # genesis twice
        assert state.snapshot() == _full_fold(world, store).snapshot()


async def test_a_log_restored_from_another_backup_than_the_mailboxes_is_not_folded_by_their_index(
    tmp_path: Path, capsys: object
) -> None:
    """The log restored from a backup older than mailbox.db, then written to: the index describes entries the log
    no longer has, and would hide the new ones (a suspension the broker then ignored). Operator commands fold in
    full and warn; the broker refuses to start on it."""
    import shutil

    world = make_world(tmp_path)
    world.consent("FRA", "DEU", "AMBER", ["malware"])
    backup = tmp_path / "broker.db.backup"
    with SqliteLog.open(world.home.db_path):
        pass
    shutil.copyfile(world.home.db_path, backup)  # taken before any traffic (the broker is stopped: one file)
    await _traffic(world, 5)
    for suffix in ("-wal", "-shm"):
        world.home.db_path.with_name(world.home.db_path.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(backup, world.home.db_path)
    assert cli(["broker", "member", "suspend", "--dir", str(world.home.root), "--id", "ITA", "--reason", "x"]) == 0
    assert cli(["broker", "member", "suspend", "--dir", str(world.home.root), "--id", "DEU", "--reason", "y"]) == 0
    with SqliteLog.open(world.home.db_path) as store:
        index = policyfold.read_public_index(world.home.mailbox_path, store)
        assert index.mismatch is not None
        state = load_state(world.home, store)
        assert state.snapshot() == _full_fold(world, store).snapshot()
    assert (state.members["ITA"].status, state.members["DEU"].status) == ("suspended", "suspended")
    with pytest.raises(StoreError, match=r"mailbox\.db does not match the log in broker\.db: it has taken in"):
        BrokerDaemon(world.home)
    # Written to past the mark, the log is long enough again: the hash of the entry below the mark still tells.
    with SqliteLog.open(world.home.db_path) as store:
        fillers = [records.purge_entry(bytes([i % 256]) * 32, "DEU", i) for i in range(store.size(), 40)]
        store.append(fillers)
        index = policyfold.read_public_index(world.home.mailbox_path, store)
        assert index.mismatch is not None
        assert index.mismatch.endswith("is not the one it took in")
        assert (list(index.public), index.mark) == ([], 0)  # not used: the fold reads every entry
