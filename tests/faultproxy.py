"""A TCP proxy that breaks the database on cue: tests put it between chatsrv and PostgreSQL.

Each accepted connection is a *link*: the client's socket, a new socket to the target, and two
pump tasks (client → target, target → client) in a nursery owned by the link's handler::

    accept loop (serve's nursery)
      └── _handle(link)                  with link.scope: connect to the target, then
            └── nursery: _pump(client → target), _pump(target → client)

A test drives the faults with plain method calls, from the Trio thread:

- ``cut()``     resets every open link at once, both sockets (SO_LINGER 0, so an RST, not a
                FIN): what a client sees when the server host crashes. Idle links (a connection
                resting in a pool) are reset as surely as busy ones.
- ``refuse()``  resets each new connection as soon as it is accepted: the database looks down.
- ``stall()``   holds every chunk read from now on, in both directions, on old and new links
                (``held`` counts them): the database hangs.
- ``heal()``    ends ``refuse`` and ``stall``; held chunks flow on, in order.
- ``down()``    is ``cut()`` plus ``refuse()``: the database died and stays down.

Observations (``accepted``, ``connections``, ``held``) change synchronously with the events that
cause them, and ``wait_connections`` / ``wait_held`` wait on Trio events, never on a clock, so
tests stay deterministic. The ``pg_proxy`` fixture, at the bottom, puts one in front of the test
PostgreSQL database.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import trio


class _Link:
    """One proxied connection: its two sockets and the cancel scope around its pumps."""

    def __init__(self, client: trio.SocketStream) -> None:
        self.client = client
        self.target: trio.SocketStream | None = None  # set once connected
        self.scope = trio.CancelScope()

    def reset(self) -> None:
        """Close both sockets now, with an RST, and stop the pumps.

        The sockets are closed right here rather than by the handler when it next runs, so that
        the peers are reset by the time ``cut()`` returns. Cancelling first matters: a pump
        blocked on a socket is then woken by ``Cancelled`` rather than by the close's
        ``ClosedResourceError``.
        """
        self.scope.cancel(reason="the fault proxy reset the connection")
        for stream in (self.client, self.target):
            if stream is not None:
                _reset(stream)

    def close(self) -> None:
        """Close both sockets the ordinary way (a FIN, unless ``reset`` got there first)."""
        for stream in (self.client, self.target):
            if stream is not None:
                stream.socket.close()


def _reset(stream: trio.SocketStream) -> None:
    sock = stream.socket
    if sock.fileno() == -1:  # already closed
        return
    # Linger on, for 0 s: close() drops unsent data and sends an RST instead of a FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    """A TCP proxy to ``target_host:target_port`` that injects faults on demand.

    Run it with ``await nursery.start(proxy.serve)``; it listens on ``host:port`` (port 0: a free
    one, read from ``port`` once started) until cancelled. ``host`` must be an IP address.
    """

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self.accepted = 0  # connections accepted, in all (refused ones too)
        self._links: set[_Link] = set()
        self._held = 0
        self._refusing = False
        # Set while bytes flow; stall() swaps in an unset one, heal() sets it.
        self._flowing = trio.Event()
        self._flowing.set()
        self._changed = trio.Event()  # set, then replaced, whenever an observation changes

    # --- serving -------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept and proxy connections until cancelled; reports ``(host, port)`` when listening."""
        (listener,) = await trio.open_tcp_listeners(self.port, host=self.host)
        async with listener, trio.open_nursery() as nursery:
            self.port = listener.socket.getsockname()[1]
            task_status.started((self.host, self.port))
            while True:
                client = await listener.accept()
                self.accepted += 1
                if self._refusing:
                    _reset(client)
                else:
                    # Registered before its handler runs, so that a cut() right now reaches it.
                    link = _Link(client)
                    self._links.add(link)
                    nursery.start_soon(self._handle, link)
                self._notify()

    async def _handle(self, link: _Link) -> None:
        try:
            # Entered after cut() has cancelled it? Then nothing below runs.
            with link.scope:
                try:
                    link.target = await trio.open_tcp_stream(self.target_host, self.target_port)
                except OSError:
                    # The real target is down: reset the client, as a dead server would.
                    link.reset()
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, link, link.client, link.target)
                    nursery.start_soon(self._pump, link, link.target, link.client)
        finally:
            self._forget(link)
            link.close()

    async def _pump(self, link: _Link, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        """Copy ``source`` to ``sink`` until EOF; on a broken socket, end the whole link."""
        try:
            while data := await source.receive_some():
                if not self._flowing.is_set():
                    await self._hold()
                await sink.send_all(data)
            # A FIN is passed on as a FIN (half-close); the link ends when both directions have.
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # A reset from one peer: pass it on to the other one, as a crash would.
            link.reset()

    async def _hold(self) -> None:
        self._held += 1
        self._notify()
        try:
            await self._flowing.wait()
        finally:
            self._held -= 1
            self._notify()

    def _forget(self, link: _Link) -> None:
        if link in self._links:
            self._links.remove(link)
            self._notify()

    # --- faults ----------------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every open connection, both sides, now (SO_LINGER 0: an RST)."""
        for link in list(self._links):
            self._forget(link)
            link.reset()

    def refuse(self) -> None:
        """From now on, reset each new connection as soon as it is accepted."""
        self._refusing = True

    def stall(self) -> None:
        """From now on, hold every chunk read, both directions, on all connections."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def heal(self) -> None:
        """Accept new connections again, and let held chunks go on."""
        self._refusing = False
        self._flowing.set()

    def down(self) -> None:
        """The database died and stays down: ``refuse()``, then ``cut()``."""
        self.refuse()
        self.cut()

    # --- observations --------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections open now (accepted, not refused, and neither closed nor cut)."""
        return len(self._links)

    @property
    def held(self) -> int:
        """Chunks read and not forwarded because of ``stall()``, now."""
        return self._held

    async def wait_connections(self, n: int) -> None:
        """Until at least ``n`` connections are open."""
        await self._wait_until(lambda: self.connections >= n)

    async def wait_held(self, n: int = 1) -> None:
        """Until at least ``n`` chunks are being held."""
        await self._wait_until(lambda: self._held >= n)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        await trio.lowlevel.checkpoint()
        while not predicate():
            await self._changed.wait()


# --- the pytest fixture ----------------------------------------------------------------------

import pytest  # noqa: E402  (only the fixture needs pytest; a benchmark may import the rest)
from sqlalchemy.engine import make_url  # noqa: E402


@dataclass(frozen=True)
class ProxiedDatabase:
    """What ``pg_proxy`` yields: the proxy, and the test database's URL through it."""

    proxy: FaultProxy
    url: str


@pytest.fixture
async def pg_proxy(postgresql_url: str) -> AsyncIterator[ProxiedDatabase]:
    """A :class:`FaultProxy` in front of the test PostgreSQL database, for one test."""
    database = make_url(postgresql_url)
    proxy = FaultProxy(database.host or "127.0.0.1", database.port or 5432)
    # pytest-trio runs a fixture's setup and teardown in one task, so yielding inside this
    # nursery is safe here (unlike in an ordinary async generator).
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(proxy.serve)
        url = database.set(host=host, port=port).render_as_string(hide_password=False)
        yield ProxiedDatabase(proxy, url)
        nursery.cancel_scope.cancel(reason="the test is over")
