"""Packet labels: TLP 2.0 level, categories, operation name and content type (pure).

Labels travel in the packet's signed `core` (specs/packet.md, "Labels") so the broker can enforce sharing
agreements without reading the payload. This module is the one place their rules live; the policy engine
imports `TLP`, `tlp_rank` and `check_category` from here.

TLP 2.0 (FIRST, 2022) levels are ordered from least to most restrictive:
CLEAR < GREEN < AMBER < AMBER+STRICT < RED.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

from valise.errors import LabelError

STIX_CONTENT_TYPE = "application/stix+json;version=2.1"
OCTET_STREAM = "application/octet-stream"

MAX_CATEGORIES = 16
MAX_CATEGORY_LEN = 32
MAX_OPERATION_LEN = 64
MAX_CONTENT_TYPE_LEN = 128

# A category is one lower-case word, optionally joined by '-' (e.g. "malware", "cyber-crime"): no spaces or
# case variants, so two members can never mean the same category with different bytes.
CATEGORY = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# An operation name is a short printable identifier (e.g. "TRIDENT-2026"), same alphabet as member ids.
OPERATION = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A media type with optional parameters, printable ASCII without spaces (RFC 6838 restricted-name chars).
CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*(?:;[a-z0-9_.-]+=[A-Za-z0-9_.+-]+)*")


_JSON_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")


class TLP(enum.IntEnum):
    """TLP 2.0 levels; the integer value is the rank (higher = more restrictive), so levels compare directly."""

    CLEAR = 0
    GREEN = 1
    AMBER = 2
    AMBER_STRICT = 3
    RED = 4

    @property
    def label(self) -> str:
        """The wire spelling: "CLEAR", "GREEN", "AMBER", "AMBER+STRICT" or "RED"."""
        return "AMBER+STRICT" if self is TLP.AMBER_STRICT else self.name

    @classmethod
    def parse(cls, text: str) -> TLP:
        """The level spelled `text` (exact wire spelling; "TLP:" prefix and case variants are refused)."""
        level = _BY_LABEL.get(text) if isinstance(text, str) else None
        if level is not None:
            return level
        raise LabelError(
            f"TLP level {str(text)[:40]!r} is not valid", hint="use CLEAR, GREEN, AMBER, AMBER+STRICT or RED"
        )


TLP_LEVELS: tuple[TLP, ...] = tuple(TLP)
_BY_LABEL: dict[str, TLP] = {level.label: level for level in TLP_LEVELS}


def tlp_rank(level: TLP | str) -> int:
    """Rank of a TLP level (0 = CLEAR … 4 = RED); accepts the enum or its wire spelling."""
    return int(level if isinstance(level, TLP) else TLP.parse(level))


def check_category(name: str) -> str:
    """Return `name` if it is a valid category (lower-case word, '-' joins, ≤ 32 chars), else raise LabelError."""
    if not isinstance(name, str) or len(name) > MAX_CATEGORY_LEN or not CATEGORY.fullmatch(name):
        raise LabelError(
            f"category {str(name)[:40]!r} is not valid",
            hint=f"use a lower-case word of a-z 0-9 joined by '-', at most {MAX_CATEGORY_LEN} characters",
        )
    return name


def check_categories(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate a category list: each valid, no duplicates, at most 16; returned sorted (the canonical order)."""
    if len(names) > MAX_CATEGORIES:
        raise LabelError(f"{len(names)} categories given, at most {MAX_CATEGORIES} are allowed")
    for name in names:
        check_category(name)
    if len(set(names)) != len(names):
        raise LabelError("categories contain a duplicate")
    return tuple(sorted(names))


def check_operation(name: str | None) -> str | None:
    if name is not None and (not isinstance(name, str) or not OPERATION.fullmatch(name)):
        raise LabelError(f"operation name {str(name)[:80]!r} is not valid", hint="use 1-64 of A-Z a-z 0-9 . _ -")
    return name


def check_content_type(value: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_CONTENT_TYPE_LEN or not CONTENT_TYPE.fullmatch(value):
        raise LabelError(f"content type {str(value)[:80]!r} is not valid", hint="e.g. application/octet-stream")
    return value


def is_stix_bundle(data: bytes) -> bool:
    """True if `data` is a JSON object with "type": "bundle" and an "id" starting "bundle--" (STIX 2.1 §8)."""
    if not _JSON_OBJECT_START.match(data):
        return False
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return (
        isinstance(obj, dict)
        and obj.get("type") == "bundle"
        and isinstance(obj.get("id"), str)
        and obj["id"].startswith("bundle--")
    )


def sniff_content_type(data: bytes) -> str:
    """The default content type of a payload: STIX 2.1 if it parses as a STIX bundle, else octet-stream."""
    return STIX_CONTENT_TYPE if is_stix_bundle(data) else OCTET_STREAM


@dataclass(frozen=True, slots=True)
class Labels:
    """The labels of one packet. Build with `Labels.make` (validates and canonicalises)."""

    tlp: TLP
    categories: tuple[str, ...]
    operation: str | None
    content_type: str

    @classmethod
    def make(
        cls,
        tlp: TLP | str,
        categories: list[str] | tuple[str, ...] = (),
        operation: str | None = None,
        content_type: str = OCTET_STREAM,
    ) -> Labels:
        level = tlp if isinstance(tlp, TLP) else TLP.parse(tlp)
        return cls(level, check_categories(categories), check_operation(operation), check_content_type(content_type))

    def to_map(self) -> dict[str, Any]:
        """The canonical msgpack form carried in the packet core."""
        return {
            "tlp": self.tlp.label,
            "categories": list(self.categories),
            "operation": self.operation,
            "content_type": self.content_type,
        }

    @classmethod
    def from_map(cls, value: Any) -> Labels:
        """Parse labels from a decoded core; the categories must already be in canonical (sorted) order."""
        if not isinstance(value, dict) or set(value) != {"tlp", "categories", "operation", "content_type"}:
            raise LabelError("labels must be a map of exactly tlp, categories, operation, content_type")
        cats = value["categories"]
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise LabelError("labels field 'categories' must be a list of text")
        if not isinstance(value["tlp"], str):
            raise LabelError("labels field 'tlp' must be text")
        labels = cls.make(value["tlp"], cats, value["operation"], value["content_type"])
        if list(labels.categories) != cats:
            raise LabelError("labels field 'categories' is not sorted")
        return labels

    def to_json(self) -> dict[str, Any]:
        return self.to_map()
