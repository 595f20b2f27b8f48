"""`valise broker status`: read from the broker directory of a broker serving real members over TLS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from valise.cli.main import main as cli
from valise.daemonlock import DaemonLock
from valise.wire import events as ev

from .harness import WireClient, make_world, running_broker, seal


async def _status(broker_dir: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await trio.to_thread.run_sync(cli, ["broker", "status", "--dir", str(broker_dir), *extra])
    return code, capsys.readouterr().out


async def test_status_says_what_waits_for_whom_and_when_the_queues_lag_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = make_world(tmp_path, ("FRA", "DEU"))
    world.consent("FRA", "DEU")
    home = world.home
    code, out = await _status(home.root, capsys, "--json")
    assert code == 3  # not running
    assert json.loads(out)["running"] is False
    async with running_broker(world) as broker, WireClient.connect(world, "FRA", broker.port) as fra:
        fra.refuse_cosign = True
        sent = [seal(world, "FRA", ["DEU"], b"for DEU %d" % i) for i in range(2)]
        for data in sent:
            assert isinstance(await fra.submit(data), ev.Receipt)
        with DaemonLock(home.serve_lock_path, "broker"):  # as `valise broker serve` holds it
            code, out = await _status(home.root, capsys, "--json")
            facts = json.loads(out)
            assert code == 0, facts
            assert facts["running"] is True
            assert facts["queues_behind"] == 0
            deu = facts["queues"]["DEU"]
            assert (deu["packets"], deu["bytes"], deu["notices"]) == (2, sum(len(d) for d in sent), 0)
            assert deu["oldest"] is not None
            assert facts["problems"] == []
            code, out = await _status(home.root, capsys)
            assert "DEU        2 packet(s)" in out
            assert "queues      up to date with the log" in out

            # The delivery queues cannot be written (a full disk): the packet is logged, not queued, and the
            # status says the queues lag the log.
            broker.mail._db.execute("PRAGMA query_only = ON")
            assert isinstance(await fra.submit(seal(world, "FRA", ["DEU"], b"while full")), ev.ErrorMessage)
            code, out = await _status(home.root, capsys, "--json")
            facts = json.loads(out)
            assert code == 3
            assert facts["queues_behind"] == 1
            assert "the delivery queues have not taken in the last 1 log entries" in facts["problems"][0]
            broker.mail._db.execute("PRAGMA query_only = OFF")
