"""A delivery from a member the node cannot verify yet: an honest broker's usual race, not an attack.

The broker takes a packet as soon as its sender's admission is in the log; a node checks the sender's key in the
log only up to a checkpoint it has verified, which comes up to a checkpoint interval later (and under a quorum
policy, only once enough witnesses have cosigned). The node must hold such a delivery until its log catches up,
then take it, not refuse it: refused, it stayed in the broker's mailbox, unacknowledged, until the next
reconnection, which on a healthy connection may be days away.
"""

from __future__ import annotations

import time
from pathlib import Path

from valise import identity, keyfiles
from valise.crypto.seeded import seeded_random
from valise.wire import events as ev

from .harness import WireClient, World, make_world, running_broker, running_node, seal
from .test_node_daemon import wait_for


def _admit(world: World, name: str) -> None:
    ident = identity.generate(name, seeded_random(b"late" + name.encode()), int(time.time()))
    d = world.root / "keys" / name
    keyfiles.save_identity(d, ident, None)
    world.members[name] = ident
    world.dirs[name] = d
    world.operator("member-add", id=name, kind="country", name=f"{name} bureau", region="europe",
                   bundle=ident.bundle.raw)  # fmt: skip


async def test_a_packet_from_a_member_admitted_after_the_last_checkpoint_is_taken_once_the_log_shows_it(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, ("FRA", "DEU"))
    # Checkpoints only when the test asks: the window between ITA's admission and the next one stays open.
    async with (
        running_broker(world, checkpoint_interval=3600) as broker,
        running_node(world, broker.port, tmp_path / "node") as node,
    ):
        _admit(world, "ITA")
        world.consent("ITA", "FRA")
        await wait_for(lambda: "ITA" in broker.policy.members and broker.policy.size == broker.store.size())
        data = seal(world, "ITA", ["FRA"], b"indicator from a new member")
        async with WireClient.connect(world, "ITA", broker.port) as ita:
            receipt = await ita.submit(data)
            assert isinstance(receipt, ev.Receipt), receipt
            # The node has the delivery but no checkpoint that shows ITA: nothing is taken yet, and no alarm (an
            # honest broker did nothing wrong).
            await wait_for(lambda: node.holding() == 1)
            assert node.store.inbox_all() == []
            assert node.store.alarms() == []
            await broker.publish_checkpoint()
            await wait_for(lambda: len(node.store.inbox_all()) == 1)
            (row,) = node.store.inbox_all()
            assert row.sender == "ITA"
            assert node.holding() == 0
            forwarded = await ita.next_of(ev.AckForward)  # acknowledged on the same connection
            assert isinstance(forwarded, ev.AckForward)
        assert node.store.alarms() == []
