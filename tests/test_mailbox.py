from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from valise.broker.mailbox import Mailboxes, MailItem, PacketRow
from valise.errors import StoreError


def _row(n: int, expires: int = 2000) -> PacketRow:
    return PacketRow(bytes([n]) * 32, "FRA", bytes([n]) * 16, n, expires, 100, 1000)


def test_packets_are_queued_in_order_per_recipient(tmp_path: Path) -> None:
    mb = Mailboxes.open(tmp_path / "q.db")
    mb.record_packet(_row(1), ["DEU", "ITA"])
    mb.record_packet(_row(2), ["DEU"])
    mb.post("FRA", "ack", _row(1).digest, b"signed-ack")
    assert [(i.seq, i.kind, i.digest[0]) for i in mb.pending("DEU")] == [(1, "packet", 1), (2, "packet", 2)]
    assert [i.digest[0] for i in mb.pending("ITA")] == [1]
    assert [(i.kind, i.body) for i in mb.pending("FRA")] == [("ack", b"signed-ack")]
    assert [i.seq for i in mb.pending("DEU", after_seq=1)] == [2]


def test_pending_packets_carry_their_sender_and_kept_bytes(tmp_path: Path) -> None:
    # The pusher sends a packet's kept bytes and the acknowledgement goes to its sender without a query of its own.
    mb = Mailboxes.open(tmp_path / "q.db")
    mb.record_packet(_row(1), ["DEU"], b"small packet")
    mb.record_packet(PacketRow(bytes([2]) * 32, "NGA", bytes([2]) * 16, 2, 2000, 10**9, 1000), ["DEU"])  # spooled
    mb.post("DEU", "retract", _row(1).digest, b"signed-retraction")
    items = mb.pending("DEU")
    assert [(i.kind, i.sender, i.body) for i in items] == [
        ("packet", "FRA", b"small packet"),
        ("packet", "NGA", None),
        ("retract", None, b"signed-retraction"),
    ]


def test_record_packet_is_idempotent_and_fills_gaps(tmp_path: Path) -> None:
    mb = Mailboxes.open(tmp_path / "q.db")
    mb.record_packet(_row(1), ["DEU"])
    # A crash after the log append but before queueing ITA; the sender resubmits with both recipients.
    mb.record_packet(_row(1), ["DEU", "ITA"])
    assert len(mb.pending("DEU")) == 1
    assert len(mb.pending("ITA")) == 1
    assert mb.packet_by_id("FRA", _row(1).packet_id) == _row(1)


def test_survives_reopen_and_removal_is_durable(tmp_path: Path) -> None:
    mb = Mailboxes.open(tmp_path / "q.db")
    mb.record_packet(_row(1), ["DEU"])
    mb.record_packet(_row(2), ["DEU"])
    assert mb.remove("DEU", "packet", _row(1).digest)
    assert not mb.remove("DEU", "packet", _row(1).digest)
    mb.close()
    mb = Mailboxes.open(tmp_path / "q.db")
    assert [i.digest[0] for i in mb.pending("DEU")] == [2]
    # Sequence numbers never go back, even after removals and a reopen.
    mb.record_packet(_row(3), ["DEU"])
    assert [i.seq for i in mb.pending("DEU")] == [2, 3]


def test_expired_and_unreferenced(tmp_path: Path) -> None:
    mb = Mailboxes.open(tmp_path / "q.db")
    mb.record_packet(_row(1, expires=1500), ["DEU", "ITA"])
    mb.record_packet(_row(2, expires=3000), ["DEU"])
    assert [(m, p.log_index) for m, p in mb.expired_packets(1500)] == [("DEU", 1), ("ITA", 1)]
    assert mb.expired_packets(1499) == []
    mb.remove("DEU", "packet", _row(1).digest)
    assert mb.unreferenced([_row(1).digest]) == []
    mb.remove("ITA", "packet", _row(1).digest)
    assert mb.unreferenced([_row(1).digest, _row(2).digest]) == [_row(1).digest]


def test_a_rolled_back_batch_takes_no_sequence_numbers_and_an_emptied_mailbox_keeps_counting(tmp_path: Path) -> None:
    mb = Mailboxes.open(tmp_path / "q.db")
    mb.record_packet(_row(1), ["DEU"])
    try:
        with mb.batch():
            mb.record_packet(_row(2), ["DEU"])
            mb.post("DEU", "retract", _row(1).digest, b"signed-retraction")
            raise RuntimeError("the batch fails after queueing")
    except RuntimeError:
        pass
    assert [(i.seq, i.digest[0]) for i in mb.pending("DEU")] == [(1, 1)]
    mb.record_packet(_row(3), ["DEU"])
    assert [i.seq for i in mb.pending("DEU")] == [1, 2]  # seq 2 again: the failed batch's numbers were not kept
    # Emptied, closed and reopened: numbering goes on from the last committed counter.
    assert mb.remove("DEU", "packet", _row(1).digest)
    assert mb.remove("DEU", "packet", _row(3).digest)
    mb.close()
    mb = Mailboxes.open(tmp_path / "q.db")
    mb.record_packet(_row(4), ["DEU"])
    assert [i.seq for i in mb.pending("DEU")] == [3]


def test_a_duplicate_item_is_queued_once_and_takes_no_sequence_number(tmp_path: Path) -> None:
    mb = Mailboxes.open(tmp_path / "q.db")
    mb.post("FRA", "ack", b"a" * 32, b"signed-ack")
    mb.post("FRA", "ack", b"a" * 32, b"signed-ack")
    mb.post("FRA", "ack", b"b" * 32, b"another-ack")
    assert [(i.seq, i.digest[:1]) for i in mb.pending("FRA")] == [(1, b"a"), (2, b"b")]


def test_a_counter_another_writer_moved_fails_loudly_once_then_is_read_again(tmp_path: Path) -> None:
    mb = Mailboxes.open(tmp_path / "q.db")
    mb.record_packet(_row(1), ["DEU"])  # DEU's next seq (2) is now cached
    other = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
    other.execute("INSERT INTO mailbox VALUES ('DEU', 2, 'retract', ?, x'00')", (_row(1).digest,))
    other.execute("UPDATE counters SET next_seq = 3 WHERE member = 'DEU'")
    other.close()
    # Seq 2 is taken: the insert must fail, never be dropped as a duplicate...
    with pytest.raises(StoreError, match="UNIQUE constraint failed"):
        mb.post("DEU", "ack", b"a" * 32, b"signed-ack")
    # ...and the counter is read again from what is committed, even though that transaction had changed none.
    mb.post("DEU", "ack", b"a" * 32, b"signed-ack")
    assert [(i.seq, i.kind) for i in mb.pending("DEU")] == [(1, "packet"), (2, "retract"), (3, "ack")]


def test_items_are_handed_over_at_their_commit_as_a_query_would_read_them(tmp_path: Path) -> None:
    # A connected member's pusher takes new items from this hand-over instead of querying for them, so it must see
    # exactly what the query would: each committed item once, with its seq, kept bytes, sender and packet id.
    mb = Mailboxes.open(tmp_path / "q.db")
    got: list[MailItem] = []
    mb.on_posted = got.extend
    spooled = PacketRow(bytes([2]) * 32, "NGA", bytes([2]) * 16, 2, 2000, 10**9, 1000)
    with mb.batch():
        mb.record_packet(_row(1), ["DEU", "ITA"], b"small packet")
        mb.record_packet(spooled, ["DEU"])
        mb.post("FRA", "ack", _row(1).digest, b"signed-ack")
        mb.post("DEU", "retract", _row(1).digest, b"signed-retraction")
        assert got == []  # nothing before the commit
    assert sorted(got, key=lambda i: (i.member, i.seq)) == [
        item for member in ("DEU", "FRA", "ITA") for item in mb.pending(member)
    ]
    assert len(got) == 5

    got.clear()
    with mb.batch():  # queued and taken out again in one transaction: nothing to push
        mb.record_packet(_row(3), ["DEU"])
        assert mb.remove("DEU", "packet", _row(3).digest)

    def failing_batch() -> None:
        with mb.batch():
            mb.record_packet(_row(4), ["DEU"])
            raise RuntimeError("the batch failed")

    with pytest.raises(RuntimeError):  # rolled back: nothing was queued
        failing_batch()
    mb.record_packet(_row(1), ["DEU", "ITA"], b"small packet")  # queued already: not again
    assert got == []
    assert [i.digest[0] for i in mb.pending("DEU")] == [1, 2, 1]  # the packets, then the retraction of 1


def test_a_retractions_table_from_before_receipt_times_were_kept_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    Mailboxes.open(path).close()
    with sqlite3.connect(path) as db:  # as an older broker made it
        db.execute("DROP TABLE retractions")
        db.execute("CREATE TABLE retractions (digest BLOB PRIMARY KEY, log_index INTEGER NOT NULL) WITHOUT ROWID")
        db.execute("INSERT INTO retractions VALUES (?, 7)", (b"\x01" * 32,))
    mb = Mailboxes.open(path)
    assert mb.retraction(b"\x01" * 32) == (7, None)  # a receipt dated anew for it: its time was not kept
    mb.record_retraction(b"\x02" * 32, 9, 1234)
    assert mb.retraction(b"\x02" * 32) == (9, 1234)
