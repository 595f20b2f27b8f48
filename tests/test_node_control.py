from __future__ import annotations

import functools
import io
import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from valise.errors import LimitError, WireError
from valise.node import control


async def test_messages_and_data_stream_over_a_real_unix_socket(tmp_path: Path) -> None:
    path = control.socket_path(tmp_path)
    listener = await control.listen(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    payload = os.urandom(control.CHUNK * 2 + 17)
    got: list[object] = []

    async def server() -> None:
        stream = await listener.accept()
        reader = control.MessageReader(stream)
        got.append(await reader.next())
        got.append(b"".join([c async for c in reader.data()]))
        await control.send_msg(stream, {"ok": True, "n": 1})
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        client = await control.connect(path)
        await control.send_msg(client, {"op": "send", "to": ["DEU"]})
        await control.send_data(client, io.BytesIO(payload))
        reply = await control.MessageReader(client).next()
        assert reply == {"ok": True, "n": 1}
        await client.aclose()
    assert got == [{"op": "send", "to": ["DEU"]}, payload]
    await listener.aclose()


async def test_oversized_and_truncated_frames_are_refused() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all((control.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(LimitError, match="over the limit"):
        await control.MessageReader(b).next()
    a, b = trio.testing.memory_stream_pair()
    await a.send_all((10).to_bytes(4, "big") + b"\x81")
    await a.aclose()
    with pytest.raises(WireError, match="inside a frame"):
        await control.MessageReader(b).next()


async def test_too_long_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LimitError, match="shorter node directory"):
        await control.listen(tmp_path / ("x" * 120) / "control.sock")


def test_a_data_stream_is_held_to_a_floor_rate_once_its_grace_has_passed() -> None:
    floor = control.RateFloor(min_rate=1000, grace=10.0, now=100.0)
    floor.add(1, now=105.0, what="sent")  # slow, but within the grace period
    floor.add(1, now=110.0, what="sent")  # exactly at its end
    floor.add(20_000, now=120.0, what="sent")  # 20,002 bytes in 20 s: over 1000/s on average
    with pytest.raises(WireError, match=r"the control client sent 20003 bytes in 21 s, under the 0 KiB/s"):
        floor.add(1, now=121.0, what="sent")  # 20,003 bytes in 21 s: under 21,000
    fast = control.RateFloor(min_rate=64 * 1024, grace=60.0, now=0.0)
    fast.add(100 * 1024 * 1024, now=61.0, what="took")  # a disk's pace passes


async def test_a_peer_that_takes_nothing_stalls_a_send_with_its_own_error() -> None:
    """The daemon answers nothing after PeerStalled: its last frame may be cut short, and an answer written after
    it would be read as part of that frame."""
    a, b = trio.testing.lockstep_stream_pair()  # no buffer: nothing is taken until b reads
    with pytest.raises(control.PeerStalled, match=r"took nothing for 0\.1 s"):
        await control.send_msg(a, {"op": "data", "data": bytes(100)}, within=0.1)
    assert issubclass(control.PeerStalled, WireError)
    await a.aclose()
    await b.aclose()


async def _connect_all(path: Path, n: int) -> list[trio.SocketStream]:
    return [await control.connect(path) for _ in range(n)]


async def test_control_connections_past_the_limit_wait_and_are_then_served(tmp_path: Path) -> None:
    path = control.socket_path(tmp_path)
    listener = await control.listen(path)
    served: list[trio.SocketStream] = []
    release = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        served.append(stream)
        await release.wait()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(control.serve, listener, handler, limit=2))
        clients = await _connect_all(path, 3)  # the third waits in the listen backlog
        with trio.fail_after(10):
            while len(served) < 2:  # noqa: ASYNC110 - connections another task takes
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        assert len(served) == 2
        release.set()
        with trio.fail_after(10):
            while len(served) < 3:  # noqa: ASYNC110
                await trio.sleep(0.01)
        for client in clients:
            await client.aclose()
        nursery.cancel_scope.cancel()
    await listener.aclose()


async def test_out_of_descriptors_the_control_socket_waits_instead_of_stopping_the_daemon(tmp_path: Path) -> None:
    """A concurrency review held 251 idle control connections open on a node whose descriptor limit was 256:
    accept() raised EMFILE and the whole daemon, broker connection and all, exited. Here this process's limit is
    lowered until accept fails, then the clients go and a new one is served."""
    import resource

    path = control.socket_path(tmp_path)
    listener = await control.listen(path)
    answered = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal answered
        reader = control.MessageReader(stream)
        if await reader.next() is not None:
            await control.send_msg(stream, {"ok": True})
            answered += 1
        await stream.aclose()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.serve, listener, handler)
        clients: list[trio.SocketStream] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 16, hard))
        try:
            with pytest.raises(OSError, match="Too many open files"):  # noqa: PT012
                for _ in range(64):  # clients and accepted connections share the limit: accept fails first
                    clients.append(await control.connect(path))
                    await trio.sleep(0.01)
            await trio.sleep(0.3)  # accept() has failed by now, and was tried again
        finally:
            for client in clients:
                await client.aclose()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        with trio.fail_after(10):
            client = await control.connect(path)
            await control.send_msg(client, {"op": "status"})
            assert await control.MessageReader(client).next() == {"ok": True}
            await client.aclose()
        assert answered == 1
        nursery.cancel_scope.cancel()
    await listener.aclose()
