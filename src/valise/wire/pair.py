"""Two connections wired back to back in memory: for tests, fuzzing and the transcript tool (no sockets).

`pair.send(Role.CLIENT, msg, ...)` serialises on one side, feeds the bytes to the other side in READ_SIZE pieces
(draining events between pieces, as a daemon does), and returns the events the other side produced.
"""

from __future__ import annotations

from valise.wire import events as ev
from valise.wire.connection import READ_SIZE, Connection, Signal
from valise.wire.limits import DEFAULT_LIMITS, SUPPORTED_VERSIONS, Limits
from valise.wire.state import Role


def drain(conn: Connection) -> list[ev.Event]:
    """Every event `conn` can produce now (stops at NEED_DATA, PAUSED or ConnectionClosed)."""
    out: list[ev.Event] = []
    while True:
        event: ev.Event | Signal = conn.next_event()
        if isinstance(event, Signal):  # NEED_DATA or PAUSED
            return out
        out.append(event)
        if isinstance(event, ev.ConnectionClosed):
            return out


def feed(conn: Connection, data: bytes, piece: int = READ_SIZE) -> list[ev.Event]:
    """Feed `data` to `conn` in pieces of `piece` bytes, draining after each; the events, in order."""
    out: list[ev.Event] = []
    for i in range(0, len(data), piece):
        conn.receive_data(data[i : i + piece])
        out += drain(conn)
    return out


class ConnectionPair:
    def __init__(self, client_limits: Limits = DEFAULT_LIMITS, server_limits: Limits = DEFAULT_LIMITS) -> None:
        self.client = Connection(Role.CLIENT, client_limits)
        self.server = Connection(Role.SERVER, server_limits)
        self.wire: list[tuple[Role, bytes]] = []  # every frame sent, in order (for transcripts)

    def conn(self, role: Role) -> Connection:
        return self.client if role is Role.CLIENT else self.server

    def send(self, role: Role, *msgs: ev.Message) -> list[ev.Event]:
        """Send `msgs` from `role`; return what the other side received."""
        frames = [self.conn(role).send(m) for m in msgs]
        self.wire += [(role, f) for f in frames]
        return feed(self.conn(role.other), b"".join(frames))

    def hello(
        self, member: str = "FRA", role: str = "node", seen: int = 0, versions: tuple[int, ...] = SUPPORTED_VERSIONS
    ) -> ev.Hello:
        return ev.Hello(versions=versions, member=member, role=role, seen=seen, limits=self.client.limits)

    def welcome(self, broker: str = "BROKER", time: int = 1_790_000_000, version: int = 1) -> ev.Welcome:
        return ev.Welcome(version=version, broker=broker, time=time, limits=self.server.limits)

    def handshake(self, member: str = "FRA", role: str = "node", time: int = 1_790_000_000) -> None:
        """hello, then welcome: both sides end up OPEN."""
        got = self.send(Role.CLIENT, self.hello(member=member, role=role))
        got += self.send(Role.SERVER, self.welcome(time=time))
        if [type(e) for e in got] != [ev.Hello, ev.Welcome]:
            raise AssertionError(f"handshake produced {got}")
