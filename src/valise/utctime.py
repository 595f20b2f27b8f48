"""Unix times as people read them, for any integer a peer may have signed.

A record or packet can carry any 64-bit time; Python's calendar ends at 9999 and the platform's time_t may end
sooner, and formatting such a time raised an OverflowError from deep inside a policy decision (which cost the
sender its connection). Records now refuse times past MAX_CALENDAR_TIME, and `utc` never raises.
"""

from __future__ import annotations

import datetime as dt

MAX_CALENDAR_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second Python's calendar can show


def utc(t: int) -> str:
    """`t` as `YYYY-MM-DDTHH:MM:SSZ`; outside 1970..9999, the number itself, said to be out of range."""
    if 0 <= t <= MAX_CALENDAR_TIME:
        try:
            return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, OSError, ValueError):  # a platform whose time_t ends before 9999
            pass
    return f"{t} (Unix time outside 1970..9999)"
