"""Sealing a packet afresh (packet.reseal): what a sender's outbox does with a packet that waited past the broker's
time window. Round trips at chunk boundaries, what stays and what changes, and each refusal."""

from __future__ import annotations

import io

import pytest

from valise import identity, packet
from valise.crypto import stream
from valise.errors import Error, PayloadError, SenderMismatchError, StanzaError, TruncatedError, UsageError

from .conftest import NOW, seeded_random

LATER = NOW + 3600
CHUNK = stream.CHUNK


def _sealed(
    members: dict[str, identity.Identity], payload: bytes, to: tuple[str, ...] = ("DEU",)
) -> tuple[bytes, bytes]:
    out = io.BytesIO()
    sealed = packet.seal(io.BytesIO(payload), out, sender=members["FRA"], recipients=[members[m].bundle for m in to],
                         tlp="AMBER", categories=["malware"], operation="op-1", now=NOW, expires=NOW + 86_400,
                         random=seeded_random(b"first"))  # fmt: skip
    return out.getvalue(), sealed.content_key


def _reseal(
    members: dict[str, identity.Identity],
    data: bytes,
    key: bytes,
    to: tuple[str, ...] = ("DEU",),
    *,
    sender: str = "FRA",
    now: int = LATER,
) -> tuple[bytes, packet.Sealed]:
    out = io.BytesIO()
    bundles = [members[m].bundle for m in to]
    sealed = packet.reseal(
        io.BytesIO(data), out, key=key, sender=members[sender], recipients=bundles, now=now, random=seeded_random(b"a")
    )
    return out.getvalue(), sealed


def _open(members: dict[str, identity.Identity], data: bytes, me: str = "DEU") -> tuple[bytes, packet.Opened]:
    out = io.BytesIO()
    opened = packet.open(io.BytesIO(data), out, me=members[me], sender=members["FRA"].bundle, now=LATER + 1)
    return out.getvalue(), opened


def test_the_content_key_is_the_second_random_draw(members: dict[str, identity.Identity]) -> None:
    """Known answer: the packet id (16 bytes), then K (32 bytes), from the same randomness."""
    _, key = _sealed(members, b"x")
    draw = seeded_random(b"first")
    draw(16)
    assert key == draw(32)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 2, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_a_resealed_packet_opens_to_the_same_payload_dated_anew(
    members: dict[str, identity.Identity], size: int
) -> None:
    payload = bytes(i % 251 for i in range(size))
    data, key = _sealed(members, payload, ("DEU", "ITA"))
    again, sealed = _reseal(members, data, key, ("DEU", "ITA"))
    old, new = packet.parse_head(data), packet.parse_head(again)
    assert isinstance(old, packet.Head)
    assert isinstance(new, packet.Head)
    for me in ("DEU", "ITA"):
        plaintext, opened = _open(members, again, me)
        assert plaintext == payload
    assert (opened.packet_id, opened.labels, opened.expires, opened.recipients) == (
        old.core.packet_id, old.core.labels, old.core.expires, old.core.recipients,
    )  # fmt: skip
    assert opened.created == LATER
    assert new.header.ct_len == old.header.ct_len  # the same padded payload
    assert sealed.header_digest == new.digest != old.digest
    assert sealed.content_key != key  # a new K: never K's nonces again under other associated data
    assert new.header.key_commit != old.header.key_commit
    assert len(again) == sealed.size


def test_a_reseal_seals_to_a_recipient_s_current_key(members: dict[str, identity.Identity]) -> None:
    """A recipient that moved to new keys while the packet waited gets it under its new key."""
    data, key = _sealed(members, b"indicators")
    moved = dict(members)
    moved["DEU"] = identity.rotate(members["DEU"], seeded_random(b"deu-new"), NOW + 60)
    again, _ = _reseal(moved, data, key)
    out = io.BytesIO()
    me = identity.Identity(moved["DEU"].member_id, moved["DEU"].signing, moved["DEU"].enc_private,
                           moved["DEU"].tls_private, moved["DEU"].bundle, ())  # fmt: skip  # without the old key
    opened = packet.open(io.BytesIO(again), out, me=me, sender=members["FRA"].bundle, now=LATER + 1)
    assert out.getvalue() == b"indicators"
    assert not opened.sealed_to_replaced_key


def test_a_reseal_with_another_key_is_refused(members: dict[str, identity.Identity]) -> None:
    data, key = _sealed(members, b"x")
    with pytest.raises(StanzaError, match="kept content key does not match"):
        _reseal(members, data, bytes(32))
    with pytest.raises(StanzaError, match="kept content key does not match"):
        _reseal(members, data, key[:16])


def test_a_reseal_never_uses_the_old_content_key_again(members: dict[str, identity.Identity]) -> None:
    """packet.md: K' is never K (a crypto review: nothing checked it). The same key under the same packet id
    means the same nonces, with other associated data: a broken random source must not get that far."""
    data, key = _sealed(members, b"x" * 100)
    rest = seeded_random(b"rest")
    with pytest.raises(Error, match="gave the old content key again"):
        packet.reseal(io.BytesIO(data), io.BytesIO(), key=key, sender=members["FRA"],
                      recipients=[members["DEU"].bundle], now=LATER,
                      random=lambda n: key if n == len(key) else rest(n))  # fmt: skip


def test_only_the_sender_reseals(members: dict[str, identity.Identity]) -> None:
    data, key = _sealed(members, b"x")
    with pytest.raises(SenderMismatchError, match="packet is from FRA, not DEU"):
        _reseal(members, data, key, sender="DEU")


def test_a_reseal_to_other_recipients_is_refused(members: dict[str, identity.Identity]) -> None:
    data, key = _sealed(members, b"x", ("DEU", "ITA"))
    with pytest.raises(UsageError, match="are not the packet's"):
        _reseal(members, data, key, ("DEU",))
    with pytest.raises(UsageError, match="are not the packet's"):
        _reseal(members, data, key, ("DEU", "ITA", "NGA"))


def test_an_expired_packet_is_not_resealed(members: dict[str, identity.Identity]) -> None:
    data, key = _sealed(members, b"x")
    with pytest.raises(UsageError, match="has expired"):
        _reseal(members, data, key, now=NOW + 86_400)


def test_a_modified_or_cut_packet_file_is_refused(members: dict[str, identity.Identity]) -> None:
    data, key = _sealed(members, bytes(2 * CHUNK))
    head = packet.parse_head(data)
    assert isinstance(head, packet.Head)
    flipped = bytearray(data)
    flipped[head.head_size + CHUNK + 20] ^= 1  # the second chunk
    with pytest.raises(PayloadError, match="chunk 1 does not authenticate"):
        _reseal(members, bytes(flipped), key)
    with pytest.raises(TruncatedError, match="ciphertext ends after"):
        _reseal(members, data[:-1], key)
    swapped = bytearray(data)  # chunks that authenticate, in another order: the first one fails where it is
    first, second = head.head_size, head.head_size + stream.CT_CHUNK
    swapped[first:second], swapped[second : second + stream.CT_CHUNK] = (
        data[second : second + stream.CT_CHUNK], data[first:second],
    )  # fmt: skip
    with pytest.raises(PayloadError, match="chunk 0 does not authenticate"):
        _reseal(members, bytes(swapped), key)
