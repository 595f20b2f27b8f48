"""One daemon per directory: an exclusive flock on a file in it, released when the process ends, however it ends.

Two brokers on one directory would both sign checkpoints and push the same mailboxes; two node daemons on one
directory would fight over the broker connection (each replaces the other) and the control socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from valise.errors import UsageError


class DaemonLock:
    def __init__(self, path: Path, what: str, *, holder: str | None = None) -> None:
        self.path = path
        self.what = what  # "broker", "node daemon": for the error
        self.holder = holder or what  # who takes it, written in the file for whoever finds it held
        self._f: IO[bytes] | None = None

    def __enter__(self) -> DaemonLock:
        f = open(self.path, "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            held_by = f.read(200).decode(errors="replace").strip()
            f.close()
            by = f" ({held_by})" if held_by else ""
            raise UsageError(f"another {self.what} is running on {self.path.parent}{by}") from None
        # Who holds it, for a refusal to name (a `valise erase` on a stopped node holds the node daemon's lock).
        with contextlib.suppress(OSError):  # a full disk must not stop what only wanted the lock
            f.truncate(0)
            f.write(f"{self.holder}, pid {os.getpid()}\n".encode())
            f.flush()
        self._f = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
