"""One daemon per directory: an exclusive flock on a file in it, released when the process ends, however it ends.

Two brokers on one directory would both sign checkpoints and push the same mailboxes; two node daemons on one
directory would fight over the broker connection (each replaces the other) and the control socket.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

from valise.errors import UsageError


class DaemonLock:
    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what  # "broker", "node daemon": for the error
        self._f: IO[bytes] | None = None

    def __enter__(self) -> DaemonLock:
        f = open(self.path, "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise UsageError(f"another {self.what} is running on {self.path.parent}") from None
        self._f = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
