"""A log entry waiting for the broker's group commit (BrokerDaemon.enqueue), and the refusal of one that was
decided on again before it landed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from valise.broker import relay
from valise.errors import Error, StoreError
from valise.wire import events as ev


@dataclass(slots=True)
class Waiter:
    """A log entry queued for the next group commit, and what to do once it is in (or is not)."""

    entry: bytes
    on_commit: Callable[[int], None] | None
    on_error: Callable[[BaseException], None] | None = None
    traffic: bool = False
    on_durable: Callable[[int], None] | None = None  # after the batch's mailbox transaction has committed too
    readers: tuple[str, ...] | None = None  # who may read the entry in full (readers.py); None: parsed at commit
    # Decides again whether the entry may be logged, against the policy as it stands where the entry will land;
    # an Error refuses it (the callback has answered the member). Asked only if the policy changed since
    # `decided_at` (the broker's count of applied policy records when the entry was first decided on).
    recheck: Callable[[], Error | None] | None = None
    decided_at: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    index: int = -1
    error: BaseException | None = None

    async def result(self) -> int:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.index


class Refused(Error):
    """A queued entry that was decided on again before its commit (the policy had changed) and refused."""

    def __init__(self, what: str, answer: Callable[[int], ev.Message]) -> None:
        super().__init__(what)
        self.answer = answer  # the frame that says so, for a request id

    @classmethod
    def of(cls, outcome: relay.Reject | relay.Denied, packet_id: bytes) -> Refused:
        if isinstance(outcome, relay.Reject):
            return cls(outcome.message, lambda rid: ev.ErrorMessage(rid, outcome.code, outcome.message))
        reasons = tuple(ev.DenyReason(to, r) for to, r in outcome.reasons)
        return cls(f"packet {packet_id.hex()} denied", lambda rid: ev.Deny(rid, packet_id, reasons))


class NotQueued(StoreError):
    """The entry is in the log, at `index`, but the mailboxes could not take its changes (a full disk): they are
    redone from the log before the next checkpoint (BrokerDaemon._catch_up), as after a crash between the two
    commits. Its member gets no receipt now; what it sends again is matched to the logged entry, never logged
    twice."""

    def __init__(self, what: str, index: int, *, hint: str | None = None, cause: str | None = None) -> None:
        super().__init__(what, hint=hint, cause=cause)
        self.index = index
