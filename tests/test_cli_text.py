"""Text from the broker or a sender, printed on a terminal: no character of it may act on the terminal."""

from __future__ import annotations

from valise.cli.text import shown


def test_control_characters_are_escaped_and_the_rest_kept() -> None:
    forged = "DEU accepts GREEN\x1b[1A\x1b[2K\rrelayed: log index 42"
    assert shown(forged) == "DEU accepts GREEN\\x1b[1A\\x1b[2K\\x0drelayed: log index 42"
    assert shown("line\nbreak\x00\x7f\x9b") == "line\\x0abreak\\x00\\x7f\\x9b"
    assert shown("right-to-left \u202e override, \u2028 separator") == (
        "right-to-left \\u202e override, \\u2028 separator"
    )
    assert shown("tab\tstays, Zürich, 東京, 🙂") == "tab\tstays, Zürich, 東京, 🙂"
    assert shown(None) == "None"
