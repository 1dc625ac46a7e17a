"""Notifications between chatsrv processes: PostgreSQL's LISTEN/NOTIFY, for Trio.

One asyncpg connection per store listens, outside the pool (it stays checked out for as long as
anything listens); it is opened with the first subscription and, when it is lost, opened again
with every channel listened to anew. Notifications are best effort: one sent while the listener
reconnects is lost, so whoever relies on them must also read the database now and then::

    Trio thread                                    asyncio thread
    -----------                                    --------------
    await bus.subscribe(channel) ── bridge.run ──▶ LISTEN channel (its first subscriber)
    await subscription.receive() ◀── token.run_sync_soon(send_nowait) ── the listener callback
    subscription.close()         ── call_soon_threadsafe ──▶ UNLISTEN (its last subscriber)

Sending is ``notify``: ``SELECT pg_notify(...)`` on a pooled connection, one statement. A
payload holds at most ``MAX_PAYLOAD_BYTES``. Errors leave as ``StoreError``/``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
import trio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ._aio import AsyncioThread

logger = logging.getLogger(__name__)

# How long the listener waits before connecting again after it lost its connection.
_RECONNECT_S = 1.0

# PostgreSQL's limit on a notification's payload is 8000 bytes.
MAX_PAYLOAD_BYTES = 7900

_NOTIFY = text("SELECT pg_notify(:channel, :payload)")


class Subscription:
    """What one channel receives from the moment of ``Bus.subscribe``; ``close()`` (sync, so
    that it can run anywhere, including a cancelled ``finally``) ends it."""

    def __init__(self, bus: Bus, channel: str) -> None:
        self.channel = channel
        self._bus = bus
        self._token = trio.lowlevel.current_trio_token()
        # Unbounded: what waits here is what the owner of a reply publishes while the
        # subscriber is busy, at most the reply itself.
        self._send, self._receive = trio.open_memory_channel[str](math.inf)

    async def receive(self) -> str:
        """The next payload (raises ``trio.EndOfChannel`` once closed)."""
        return await self._receive.receive()

    def close(self) -> None:
        self._send.close()
        self._receive.close()
        self._bus._forget(self)

    def _deliver(self, payload: str) -> None:  # on the asyncio thread
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._put, payload)

    def _put(self, payload: str) -> None:  # on the Trio thread
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._send.send_nowait(payload)


class Bus:
    """One store's notifications, on PostgreSQL (``Store.bus``; SQLite has none)."""

    def __init__(
        self,
        bridge: AsyncioThread,
        engine: AsyncEngine,
        *,
        timeout_s: float,
        call: Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]],
    ) -> None:
        self._bridge = bridge
        self._call = call  # the store's one hop to the loop, and its error boundary
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._timeout_s = timeout_s
        # Everything below is touched on the asyncio thread only.
        self._subscribers: dict[str, set[Subscription]] = {}
        self._conn: Any = None  # asyncpg.Connection, while it listens
        # One operation at a time on the listening connection (asyncpg refuses two at once).
        self._lock: asyncio.Lock | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._closed = False

    async def subscribe(self, channel: str) -> Subscription:
        """Listen to ``channel`` from now on."""
        subscription = Subscription(self, channel)
        try:
            await self._call(self._add(subscription))
        except BaseException:
            subscription.close()
            raise
        return subscription

    async def notify(self, channel: str, payload: str) -> None:
        """Send ``payload`` (at most ``MAX_PAYLOAD_BYTES`` in UTF-8) to ``channel``'s listeners,
        in every process, once the statement has run."""
        await self._call(self._notify(channel, payload))

    async def aclose(self) -> None:
        """Stop listening (on the asyncio loop: run it with the bridge)."""
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), self._timeout_s)

    # -- on the asyncio thread -----------------------------------------------------------------

    async def _notify(self, channel: str, payload: str) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(_NOTIFY, {"channel": channel, "payload": payload})

    def _locked(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _add(self, subscription: Subscription) -> None:
        channel = subscription.channel
        self._subscribers.setdefault(channel, set()).add(subscription)
        try:
            async with self._locked():
                conn = await self._connection()
                await conn.add_listener(channel, self._notified)  # LISTEN once per channel
        except BaseException:
            self._remove(subscription)
            raise

    async def _connection(self) -> Any:
        """The listening connection, connected if need be (under the lock)."""
        if self._conn is None:
            conn = await asyncpg.connect(self._dsn, timeout=self._timeout_s)
            conn.add_termination_listener(self._lost)
            self._conn = conn
        return self._conn

    def _notified(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        for subscription in list(self._subscribers.get(channel, ())):
            subscription._deliver(payload)

    def _lost(self, conn: Any) -> None:
        if conn is not self._conn or self._closed:
            return
        self._conn = None
        logger.warning("the notification listener lost its connection; reconnecting")
        self._reconnect = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        while not self._closed and self._subscribers:
            await asyncio.sleep(_RECONNECT_S)
            try:
                async with self._locked():
                    conn = await self._connection()
                    for channel in list(self._subscribers):
                        await conn.add_listener(channel, self._notified)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                logger.warning("the notification listener could not reconnect: %r", exc)
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.close()
                    self._conn = None
                continue
            logger.info("the notification listener is back")
            return

    def _forget(self, subscription: Subscription) -> None:  # any thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing listens any more
            self._bridge.loop.call_soon_threadsafe(self._remove, subscription)

    def _remove(self, subscription: Subscription) -> None:
        listeners = self._subscribers.get(subscription.channel)
        if listeners is None or subscription not in listeners:
            return
        listeners.discard(subscription)
        if not listeners:
            del self._subscribers[subscription.channel]
            task = asyncio.get_running_loop().create_task(self._unlisten(subscription.channel))
            task.add_done_callback(_ignore_failure)

    async def _unlisten(self, channel: str) -> None:
        async with self._locked():
            # A subscriber may have come meanwhile; a lost connection listens to nothing.
            if channel in self._subscribers or self._conn is None or self._closed:
                return
            await self._conn.remove_listener(channel, self._notified)


def _ignore_failure(task: asyncio.Task[Any]) -> None:
    # An UNLISTEN that fails (the connection is gone) does not matter: a new one listens afresh.
    if not task.cancelled():
        task.exception()
