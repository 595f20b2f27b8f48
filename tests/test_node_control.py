from __future__ import annotations

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
