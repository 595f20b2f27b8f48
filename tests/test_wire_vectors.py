"""specs/wire.md: its transcript and test vectors are what the code produces, and they replay as stated."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import msgpack
import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "wire.md"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_wire_vectors", ROOT / "tools" / "gen_wire_vectors.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def test_spec_sections_are_up_to_date() -> None:
    text = SPEC.read_text()
    assert GEN.render(text) == text, "run: python tools/gen_wire_vectors.py --write"


@pytest.mark.parametrize("vector", GEN.vectors(), ids=lambda v: v.name)
def test_vectors_fail_as_stated(vector: object) -> None:
    assert GEN.replay(vector) == vector.code  # type: ignore[attr-defined]


def test_transcript_decodes_independently() -> None:
    """Re-read the spec's hex with plain msgpack (not valise.wire): lengths, types and key order hold."""
    block = SPEC.read_text().split("<!-- generated:transcript -->")[1].split("<!-- end:transcript -->")[0]
    frames: list[tuple[str, bytes]] = []
    for line in block.splitlines():
        if line.startswith("# "):
            frames.append((line, b""))
        elif re.fullmatch(r"[0-9a-f]+", line):
            frames[-1] = (frames[-1][0], frames[-1][1] + bytes.fromhex(line))
    assert len(frames) == len(GEN.session())
    for (title, data), (_, msg) in zip(frames, GEN.session(), strict=True):
        length = int.from_bytes(data[:4], "big")
        assert length == len(data) - 4, title
        value = msgpack.unpackb(data[4:], raw=False)
        assert value["t"] == msg.TYPE
        assert f" {msg.TYPE} " in title
        assert list(value) == sorted(value, key=lambda k: k.encode()), title
        assert msgpack.packb(value, use_bin_type=True) == data[4:], title


def test_oversized_prefix_vectors_need_only_four_bytes() -> None:
    for v in GEN.vectors():
        if v.code == "frame-too-large":
            assert len(v.stream) == 4
