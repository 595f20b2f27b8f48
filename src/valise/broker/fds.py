"""File descriptors: how many the broker may spend on peers nobody has authenticated.

Every connection costs a descriptor, and so do the SQLite files, the spool's open uploads and each member's
session. A process out of descriptors cannot accept anyone ("accept returned EMFILE"), members included, so peers
that have proved nothing (TLS handshakes in progress; readers of the public log over HTTP) get a bounded share
each, and past it the oldest of them is dropped rather than the newcomer refused.

The usual soft limit (1024) is small for a daemon; the hard limit is the administrator's. Like Go's runtime, the
broker raises its soft limit to the hard one when it starts (`raise_soft_limit`).
"""

from __future__ import annotations

import contextlib
import resource
from errno import EADDRINUSE

import trio

from valise.errors import Error

# Without an enforced hard limit, ask for this many (Linux also caps it at /proc/sys/fs/nr_open).
UNBOUNDED_TARGET = 1 << 20
# Each kind of unauthenticated peer may hold at most this fraction of the soft limit; the other half is left for
# members, files and the databases.
SHARE_DIVISOR = 4
MIN_SHARE = 16


def soft_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNBOUNDED_TARGET if soft == resource.RLIM_INFINITY else soft


def raise_soft_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit where the system allows; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNBOUNDED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        # Above nr_open, or a sandbox that forbids it: keep what we have.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft_limit()


def unauthenticated_share(limit: int, cap: int) -> int:
    """How many unauthenticated peers of one kind to keep at once: a quarter of `limit`, at most `cap`."""
    return max(MIN_SHARE, min(cap, limit // SHARE_DIVISOR))


async def listen_tcp(host: str, port: int, option: str) -> list[trio.SocketListener]:
    """`trio.open_tcp_listeners`, failing with an error that names the address and the option that chose it:
    the system's alone says only "Address already in use", which is the usual first failure of a new broker."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        hint = "another broker or program is listening there: pick another port" if exc.errno == EADDRINUSE else None
        raise Error(f"cannot listen on {host}:{port} ({option}): {exc.strerror or exc}", hint=hint) from None
