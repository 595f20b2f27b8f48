"""How a daemon stops on SIGINT or SIGTERM: gracefully, within its grace period, and never killed halfway by a
second signal.

The daemons used to leave trio's signal receiver as soon as the first signal came. The default handlers were
then back in place while the daemon stopped, and trio handed back any signal that had come meanwhile: a second
SIGTERM (a service manager's, or an impatient operator's) killed the broker before its last commit batch and
the closing of its stores (a concurrency review). Now the receiver stays open until the daemon has stopped, a
second signal cuts the grace period short instead, and later ones are logged and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

log = logging.getLogger("valise")

# How long, once the daemon has stopped, the signals that came meanwhile are collected (and dropped) before the
# receiver closes; one that comes later still gets the default handler.
DRAIN = 0.05


async def stop_when_signalled(
    signals: AsyncIterator[int], stop: Callable[[], Awaitable[object]], scope: trio.CancelScope, what: str
) -> None:
    """Wait for a first signal, then run `stop()` (a graceful stop, bounded by its own grace period) and cancel
    `scope`, the daemon's. A second signal meanwhile ends the graceful part at once."""
    async for signum in signals:
        log.info("%s: signal %d: stopping", what, signum)
        break
    async with trio.open_nursery() as stopping:

        async def cut_short() -> None:
            async for signum in signals:
                log.warning("%s: signal %d again: stopping now, without waiting for the others", what, signum)
                stopping.cancel_scope.cancel()
                return

        stopping.start_soon(cut_short)
        await stop()
        stopping.cancel_scope.cancel()
    scope.cancel()


async def drop_pending(signals: AsyncIterator[int], what: str) -> None:
    """Once the daemon has stopped, and before its receiver closes: the signals that came meanwhile, said and
    dropped. (On closing, trio hands pending signals to the default handlers, which would kill the process now
    that it has finished cleanly.)"""
    with trio.move_on_after(DRAIN):
        async for signum in signals:
            log.info("%s: signal %d while stopping: already stopped", what, signum)
