"""The broker's own policy fold reads only what its mailboxes recorded as public, and still folds to the state a
full fold gives: real broker, real traffic over TLS, real SQLite, operator commands appending while it is stopped."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import trio

from valise import packet, records
from valise.broker import policyfold
from valise.cli.main import main as cli
from valise.cli.policy import load_state
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
    index = policyfold.read_public_index(world.home.mailbox_path)
    with CountingLog.open(world.home.db_path) as store:
        assert isinstance(store, CountingLog)
        size = store.size()
        assert index.mark == size - 1  # everything but the suspension was taken in by the broker
        indexed = load_state(world.home, store)
        read = store.read
        assert indexed.snapshot() == _full_fold(world, store).snapshot()
    # 30 packets and 30 acknowledgements are never read; genesis (twice: it names the operator key), the members,
    # the consent and the rule are, and the suspension past the mark.
    assert read == 1 + len(index.public) + (size - index.mark)
    assert read <= size - 60 + 1
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
