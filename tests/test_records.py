from __future__ import annotations

import pytest

from valise import records
from valise.errors import EncodingError, SignatureError, StatementError
from valise.identity import Identity

from .harness import long_reason_retraction

PID = bytes(range(16))
DIGEST = bytes(32)


def test_ack_round_trip_and_forgery(members: dict[str, Identity]) -> None:
    deu = members["DEU"]
    ack = records.Ack.make(deu.signing, PID, DIGEST, "FRA", "DEU", 1234)
    got = records.Ack.verified(ack.raw, deu.bundle.sign_key)
    assert (got.packet_id, got.recipient, got.sender, got.at) == (PID, "DEU", "FRA", 1234)
    with pytest.raises(SignatureError, match="acknowledgement by DEU"):
        records.Ack.verified(ack.raw, members["ITA"].bundle.sign_key)
    for i in range(len(ack.raw)):
        bad = bytearray(ack.raw)
        bad[i] ^= 0x40
        with pytest.raises((SignatureError, StatementError)):
            records.Ack.verified(bytes(bad), deu.bundle.sign_key)


def test_signatures_do_not_cross_kinds(members: dict[str, Identity]) -> None:
    """An acknowledgement's signature cannot be replayed as a retraction (domain separation)."""
    fra = members["FRA"]
    ack = records.Ack.make(fra.signing, PID, DIGEST, "FRA", "FRA", 1)
    with pytest.raises(StatementError):
        records.Retraction.verified(ack.raw, fra.bundle.sign_key)


def test_retraction_and_receipt(members: dict[str, Identity]) -> None:
    fra = members["FRA"]
    r = records.Retraction.make(fra.signing, PID, DIGEST, "FRA", "sent in error", 99)
    assert records.Retraction.parse(r.raw)[0].sender == "FRA"
    assert records.Retraction.verified(r.raw, fra.bundle.sign_key).reason == "sent in error"
    with pytest.raises(SignatureError):
        records.Retraction.verified(r.raw, members["DEU"].bundle.sign_key)
    with pytest.raises(StatementError, match="longer"):
        records.Retraction.make(fra.signing, PID, DIGEST, "FRA", "x" * 600, 99)
    rc = records.Receipt.make(members["NGA"].signing, "log.example", 7, DIGEST, PID, "FRA", 5)
    assert records.Receipt.verified(rc.raw, members["NGA"].bundle.sign_key).index == 7
    with pytest.raises(SignatureError):
        records.Receipt.verified(rc.raw, fra.bundle.sign_key)


def test_a_retraction_reason_over_the_limit_is_refused_when_read_not_only_when_made(
    members: dict[str, Identity],
) -> None:
    fra = members["FRA"]
    raw = long_reason_retraction(fra.signing, PID, DIGEST, "FRA")
    with pytest.raises(EncodingError, match="reason is longer than 512 bytes"):
        records.Retraction.parse(raw)
    with pytest.raises(EncodingError, match="reason is longer than 512 bytes"):
        records.Retraction.verified(raw, fra.bundle.sign_key)


def test_entries_are_typed_and_capped(members: dict[str, Identity]) -> None:
    t, m = records.entry_type(records.purge_entry(DIGEST, "DEU", 5))
    assert (t, m["recipient"]) == ("purge", "DEU")
    nonced = records.purge_entry(DIGEST, "DEU", 5, bytes(16))
    assert records.entry_type(nonced)[1]["nonce"] == bytes(16)
    assert nonced != records.purge_entry(DIGEST, "DEU", 5, bytes([1]) * 16)  # unguessable without the nonce
    with pytest.raises(ValueError, match="a purge nonce is 16 bytes, not 8"):
        records.purge_entry(DIGEST, "DEU", 5, bytes(8))
    with pytest.raises(StatementError, match="over the log"):
        records.packet_entry(b"h" * 70000, bytes(64), 1)


@pytest.mark.parametrize(
    ("field", "value"), [("v", 2), ("digest", b"abc"), ("packet_id", b""), ("packet_id", bytes(32))]
)
def test_a_receipt_of_another_version_or_with_ids_of_other_lengths_is_refused_before_its_signature(
    members: dict[str, Identity], field: str, value: object
) -> None:
    """A fuzzing review: a broker-signed receipt with `v` 99 or a 3-byte digest was taken as a v1 promise (an
    acknowledgement with the same defects is refused)."""
    from valise import encoding

    body = {"v": 1, "origin": "log.example", "index": 7, "digest": DIGEST, "packet_id": PID, "sender": "FRA", "at": 5}
    body[field] = value
    raw_body = encoding.pack(body)
    broker = members["NGA"]
    raw = encoding.pack({"body": raw_body, "sig": broker.signing.sign(records.RECEIPT_DOMAIN, raw_body)})
    with pytest.raises(SignatureError, match="malformed receipt: bad version, digest or packet id length"):
        records.Receipt.verified(raw, broker.bundle.sign_key)
