"""Quorum policy files: grammar, every refusal named by line, and evaluation of nested groups."""

from __future__ import annotations

import hashlib

import pytest

from valise.audit import quorum
from valise.crypto import sign
from valise.errors import UsageError
from valise.tlog import cosignature, note

LOG = note.Ed25519Signer("log.example/valise", sign.SigningKey(hashlib.sha256(b"log").digest())).verifier().vkey()


def _w(name: str) -> str:
    return cosignature.Cosigner(name, sign.SigningKey(hashlib.sha256(name.encode()).digest())).verifier().vkey()


def test_parse_and_evaluate_nested_groups() -> None:
    text = (
        f"# a comment\nlog {LOG} https://log.example/\n\n"
        f"witness a {_w('w/a')}\nwitness b {_w('w/b')} https://b.example/\nwitness c {_w('w/c')}\n"
        "group ab any a b\ngroup top all ab c  # c and one of a, b\nquorum top\n"
    )
    p = quorum.parse(text)
    assert p.log.vkey() == LOG
    assert p.urls == {"b": "https://b.example/"}
    assert p.satisfied({"a", "c"})
    assert p.satisfied({"b", "c"})
    assert not p.satisfied({"a", "b"})
    assert not p.satisfied({"c"})
    assert quorum.parse(f"log {LOG}\nquorum none\n").satisfied(set())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("quorum none\n", "no 'log' line"),
        (f"log {LOG}\n", "no 'quorum' line"),
        (f"log {LOG}\nlog {LOG}\nquorum none\n", "line 2: a second 'log'"),
        (f"log {LOG}\nwitness a {LOG}\nquorum none\n", "line 2: verifier key type 0x01"),
        (f"log {LOG}\nwitness a {_w('x')}\nwitness b {_w('x')}\nquorum none\n", "line 3: witness b has the key"),
        (f"log {LOG}\nwitness a {_w('x')}\nwitness a {_w('y')}\nquorum none\n", "line 3: a is defined twice"),
        (f"log {LOG}\nwitness none {_w('x')}\nquorum none\n", "not a valid name"),
        (f"log {LOG}\ngroup g any a\nquorum g\n", "line 2: group g names 'a'"),
        (f"log {LOG}\nwitness a {_w('x')}\ngroup g 2 a\nquorum g\n", "threshold 2 is not between 1 and its 1"),
        (f"log {LOG}\nwitness a {_w('x')}\ngroup g 01 a\nquorum g\n", "threshold '01' is not a number"),
        (f"log {LOG}\nquorum g\n", "line 2: quorum names 'g'"),
        (f"log {LOG}\nquorum none\nquorum none\n", "line 3: a second 'quorum'"),
        (f"log {LOG}\nwitnesses a\nquorum none\n", "line 2: unknown keyword 'witnesses'"),
    ],
)
def test_refusals_name_the_line(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quorum.parse(text)


def test_simple_policy_bounds() -> None:
    log = note.parse_vkey(LOG)
    ws = [cosignature.parse_vkey(_w("w/a"))]
    with pytest.raises(UsageError, match="a quorum of 2 needs at least 2 witnesses"):
        quorum.QuorumPolicy.simple(log, ws, 2)
    assert quorum.QuorumPolicy.simple(log, ws, 0).satisfied(set())
    assert not quorum.QuorumPolicy.simple(log, ws, 1).satisfied(set())
