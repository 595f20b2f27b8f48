"""Text from others, made safe to print on a terminal.

Deny reasons, alarm messages, errors and labels come from the broker or from senders. Printed as they are, an
escape sequence in one could move the cursor, erase a line and forge what `valise send` or `valise status`
appears to say ("relayed: log index 42"). Control characters are shown as escapes instead; JSON output needs
none of this (json.dumps escapes them).
"""

from __future__ import annotations

import re

# C0 controls but tab, DEL, C1 controls, and the Unicode line/paragraph separators and bidirectional overrides
# (which can reorder what a terminal shows).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def shown(text: object) -> str:
    """`text` as a string in which every character that could act on a terminal appears as an escape."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}" if ord(m.group()) > 0xFF else f"\\x{ord(m.group()):02x}",
                       str(text))  # fmt: skip
