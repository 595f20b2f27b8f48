from __future__ import annotations

from pathlib import Path

from valise.node.store import NodeStore

PID = bytes(16)
DIG = bytes([1]) * 32


def test_outbox_lifecycle_survives_reopen(tmp_path: Path) -> None:
    st = NodeStore.open(tmp_path)
    st.enqueue(PID, DIG, ["DEU", "ITA"], 100, 200, b"sealed-bytes")
    assert [r.packet_id for r in st.outbox_due(0)] == [PID]
    st.outbox_retry_later(PID, 50.0, "broker unreachable")
    assert st.outbox_due(10) == []
    st.close()
    st = NodeStore.open(tmp_path)
    row = st.outbox_get(PID)
    assert row is not None
    assert row.attempts == 1
    assert row.state == "queued"
    assert st.outbox_path(PID).read_bytes() == b"sealed-bytes"
    st.outbox_receipted(PID, b"receipt", 7)
    row = st.outbox_get(PID)
    assert row is not None
    assert (row.state, row.log_index) == ("receipted", 7)
    assert st.outbox_due(1e12) == []
    assert st.record_ack(PID, "DEU", b"ack")
    assert not st.record_ack(PID, "DEU", b"ack")


def test_inbox_dedupes_redeliveries(tmp_path: Path) -> None:
    st = NodeStore.open(tmp_path)
    assert st.inbox_add(DIG, PID, "FRA", 5, {"tlp": "AMBER"}, b"p")
    assert not st.inbox_add(DIG, PID, "FRA", 6, {"tlp": "AMBER"}, b"p")
    assert len(st.inbox_all()) == 1
    assert st.inbox_find(PID.hex()[:6])[0].labels == {"tlp": "AMBER"}
    st.inbox_mark(DIG, acked=True, state="read")
    row = st.inbox_get(DIG)
    assert row is not None
    assert row.acked
    assert row.state == "read"
    st.put("checkpoint", b"cp")
    assert st.get("checkpoint") == b"cp"
