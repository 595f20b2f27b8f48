from __future__ import annotations

import json

import pytest

from valise import encoding, labels
from valise.errors import LabelError
from valise.labels import TLP, Labels


def test_tlp_levels_are_ordered_by_restriction() -> None:
    assert [t.label for t in labels.TLP_LEVELS] == ["CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED"]
    assert TLP.CLEAR < TLP.GREEN < TLP.AMBER < TLP.AMBER_STRICT < TLP.RED
    assert labels.tlp_rank("AMBER+STRICT") == 3
    assert labels.tlp_rank(TLP.RED) == 4
    assert TLP.parse("AMBER+STRICT") is TLP.AMBER_STRICT


@pytest.mark.parametrize("bad", ["amber", "TLP:AMBER", "AMBER_STRICT", "WHITE", "", "RED "])
def test_tlp_refuses_other_spellings(bad: str) -> None:
    with pytest.raises(LabelError, match="TLP level"):
        TLP.parse(bad)
    with pytest.raises(LabelError):
        labels.tlp_rank(bad)


@pytest.mark.parametrize("good", ["malware", "cyber-crime", "apt29", "a"])
def test_category_accepts_lower_case_words(good: str) -> None:
    assert labels.check_category(good) == good


@pytest.mark.parametrize("bad", ["Malware", "two words", "-x", "x-", "a--b", "9lives", "", "x" * 33, "é"])
def test_category_refuses_others(bad: str) -> None:
    with pytest.raises(LabelError, match="category"):
        labels.check_category(bad)


def test_categories_are_sorted_unique_and_capped() -> None:
    assert labels.check_categories(["phishing", "malware"]) == ("malware", "phishing")
    with pytest.raises(LabelError, match="duplicate"):
        labels.check_categories(["malware", "malware"])
    with pytest.raises(LabelError, match="at most 16"):
        labels.check_categories([f"c{i}" for i in range(17)])


def test_operation_and_content_type_are_checked() -> None:
    assert Labels.make("RED", operation="TRIDENT-2026").operation == "TRIDENT-2026"
    with pytest.raises(LabelError, match="operation"):
        Labels.make("RED", operation="no spaces allowed")
    with pytest.raises(LabelError, match="content type"):
        Labels.make("RED", content_type="text/plain; charset=utf-8")


def test_labels_map_round_trip_and_canonical_order() -> None:
    lab = Labels.make("AMBER", ["phishing", "malware"], "OP1", labels.STIX_CONTENT_TYPE)
    m = lab.to_map()
    assert m["categories"] == ["malware", "phishing"]
    assert Labels.from_map(encoding.unpack(encoding.pack(m), what="l", max_size=1000)) == lab
    m["categories"] = ["phishing", "malware"]
    with pytest.raises(LabelError, match="not sorted"):
        Labels.from_map(m)
    with pytest.raises(LabelError, match="exactly"):
        Labels.from_map({"tlp": "RED"})


def test_stix_bundle_sniffing() -> None:
    bundle = {"type": "bundle", "id": "bundle--5d0092c5-5f74-4287-9642-33f4c354e56d", "objects": []}
    assert labels.sniff_content_type(json.dumps(bundle).encode()) == labels.STIX_CONTENT_TYPE
    assert labels.sniff_content_type(b"  \n" + json.dumps(bundle).encode()) == labels.STIX_CONTENT_TYPE
    for other in (
        {"type": "indicator", "id": "bundle--x"},
        {"type": "bundle", "id": "indicator--x"},
        {"type": "bundle"},
        [bundle],
    ):
        assert labels.sniff_content_type(json.dumps(other).encode()) == labels.OCTET_STREAM
    assert labels.sniff_content_type(b"\xff{not json") == labels.OCTET_STREAM
    assert labels.sniff_content_type(b"[" * 100_000) == labels.OCTET_STREAM
    assert labels.sniff_content_type(b"{" * 100_000) == labels.OCTET_STREAM
    assert labels.sniff_content_type(b"") == labels.OCTET_STREAM
