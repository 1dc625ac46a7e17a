"""Tests of the fault proxy: first its mechanics over plain TCP, then what the store sees
through it in front of a real PostgreSQL.

Rules: loopback only, port 0; every test runs under ``trio.fail_after``. Waits are on the
proxy's events (``wait_connections``, ``wait_held``) or, for what happens in this Trio run
over loopback, on ``wait_all_tasks_blocked()``; never on sleeps. The store runs asyncpg on its
own asyncio thread, which Trio cannot see, so store tests only assert what the proxy makes
certain: a query whose bytes the proxy holds cannot have finished.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import asyncpg
import pytest
import trio
import trio.testing
from sqlalchemy.engine import make_url

import chatsrv.store._database
from chatsrv._errors import StoreUnavailable
from chatsrv.store import Store
from chatsrv.store._aio import open_asyncio_thread
from chatsrv.store._database import map_error
from tests.db import plain_url
from tests.faultproxy import FaultProxy, ProxiedDatabase

# The fixture, for this module whether or not conftest.py imports it too.

TIME_LIMIT_S = 10
GREETING = b"hello\n"


# -- Over plain TCP: a greeting echo server behind the proxy ------------------------------------


class Echo:
    """A TCP server that greets each client, then echoes; it records how each connection ended."""

    def __init__(self) -> None:
        self.endings: list[str] = []  # "eof" or "reset", one per connection

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(GREETING)
            async for data in stream:
                await stream.send_all(data)
            self.endings.append("eof")
        except trio.BrokenResourceError:
            self.endings.append("reset")


@pytest.fixture
def echo() -> Echo:
    return Echo()


@pytest.fixture
async def proxy(echo: Echo) -> AsyncIterator[FaultProxy]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo.handle, 0, host="127.0.0.1")
        )
        proxy = FaultProxy("127.0.0.1", listeners[0].socket.getsockname()[1])
        await nursery.start(proxy.serve)
        yield proxy
        nursery.cancel_scope.cancel(reason="the test is over")


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def assert_refused(proxy: FaultProxy) -> None:
    """A new connection is reset: at connect, or at the first read if the reset came later."""
    with pytest.raises((OSError, trio.BrokenResourceError)):
        async with await connect(proxy) as client:
            await client.receive_some()


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


async def test_forwards_both_ways_and_passes_on_a_close(proxy: FaultProxy, echo: Echo) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        async with await connect(proxy) as client:
            assert await receive_exactly(client, len(GREETING)) == GREETING
            payload = bytes(range(256)) * 4096  # 1 MiB: many chunks each way
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, payload)
                assert await receive_exactly(client, len(payload)) == payload
            assert (proxy.accepted, proxy.connections) == (1, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert proxy.connections == 0
        assert echo.endings == ["eof"]


async def test_cut_resets_both_sides_of_an_idle_connection(proxy: FaultProxy, echo: Echo) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        async with await connect(proxy) as client:
            assert await receive_exactly(client, len(GREETING)) == GREETING
            proxy.cut()
            assert proxy.connections == 0
            with pytest.raises(trio.BrokenResourceError):  # ECONNRESET, not an EOF
                await client.receive_some()
        await trio.testing.wait_all_tasks_blocked()
        assert echo.endings == ["reset"]
        # Only the open connections: new ones go through.
        async with await connect(proxy) as client:
            assert await receive_exactly(client, len(GREETING)) == GREETING


async def test_refuse_resets_new_connections_until_heal(proxy: FaultProxy, echo: Echo) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        proxy.refuse()
        await assert_refused(proxy)
        assert (proxy.accepted, proxy.connections) == (1, 0)
        proxy.heal()
        async with await connect(proxy) as client:
            assert await receive_exactly(client, len(GREETING)) == GREETING
        await trio.testing.wait_all_tasks_blocked()
        assert echo.endings == ["eof"]  # the refused one never reached the server


async def test_stall_holds_both_directions_until_heal(proxy: FaultProxy) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        proxy.stall()
        async with await connect(proxy) as client:
            await proxy.wait_held(1)  # the greeting, server to client
            await client.send_all(b"ping")
            await proxy.wait_held(2)  # the ping, client to server: nothing went either way
            proxy.heal()
            assert await receive_exactly(client, len(GREETING) + 4) == GREETING + b"ping"
            assert proxy.held == 0


async def test_down_drops_held_bytes_and_stays_down_until_heal(proxy: FaultProxy) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        proxy.stall()
        async with await connect(proxy) as client:
            await proxy.wait_held(1)
            proxy.down()
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some()  # the held greeting is gone with the connection
        await trio.testing.wait_all_tasks_blocked()
        assert (proxy.held, proxy.connections) == (0, 0)
        await assert_refused(proxy)
        proxy.heal()
        async with await connect(proxy) as client:
            assert await receive_exactly(client, len(GREETING)) == GREETING


# -- In front of PostgreSQL: what the store sees ------------------------------------------------


async def test_pg_proxy_points_the_url_at_the_proxy(
    pg_proxy: ProxiedDatabase, postgresql_url: str
) -> None:
    proxied, direct = make_url(pg_proxy.url), make_url(postgresql_url)
    assert (proxied.host, proxied.port) == ("127.0.0.1", pg_proxy.proxy.port)
    assert proxied.set(host=direct.host, port=direct.port) == direct
    with trio.fail_after(TIME_LIMIT_S):
        async with Store.open(pg_proxy.url, init_schema=False) as store:
            await store.ping()
            assert (pg_proxy.proxy.accepted, pg_proxy.proxy.connections) == (1, 1)


@pytest.fixture
def ping_at_every_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores opened in this test ping every pooled connection at checkout, however short its
    idle time (the default spares connections in steady use)."""
    monkeypatch.setattr(chatsrv.store._database, "PING_AFTER_IDLE_S", 0.0)


@pytest.mark.usefixtures("ping_at_every_checkout")
async def test_cut_idle_pooled_connection_is_replaced_by_the_ping(
    pg_proxy: ProxiedDatabase,
) -> None:
    proxy = pg_proxy.proxy
    with trio.fail_after(TIME_LIMIT_S):
        async with Store.open(pg_proxy.url, init_schema=False) as store:
            await store.ping()  # one connection, now idle in the pool
            proxy.cut()
            assert proxy.connections == 0
            await store.ping()  # the ping finds it dead; a fresh one goes through
            assert (proxy.accepted, proxy.connections) == (2, 1)


async def test_cut_connection_in_steady_use_fails_once(
    pg_proxy: ProxiedDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection back in use within PING_AFTER_IDLE_S is not pinged: its loss fails one call,
    transiently, and the pool is discarded so that the next call connects afresh."""
    monkeypatch.setattr(
        chatsrv.store._database, "PING_AFTER_IDLE_S", 3600.0
    )  # however slow the test
    proxy = pg_proxy.proxy
    with trio.fail_after(TIME_LIMIT_S):
        async with Store.open(pg_proxy.url, init_schema=False) as store:
            await store.ping()
            proxy.cut()
            with pytest.raises(StoreUnavailable):
                await store.ping()
            await store.ping()
            assert (proxy.accepted, proxy.connections) == (2, 1)


async def test_cut_mid_query_fails_the_query(pg_proxy: ProxiedDatabase) -> None:
    """asyncpg on its own (no pool to hide the loss): the query in flight fails, transiently."""
    proxy = pg_proxy.proxy
    with trio.fail_after(TIME_LIMIT_S):
        async with open_asyncio_thread() as bridge:
            conn = await bridge.run(asyncpg.connect(plain_url(pg_proxy.url), timeout=5))
            try:
                proxy.stall()
                failures: list[Exception] = []

                async def query() -> None:
                    try:
                        await bridge.run(conn.fetchval("SELECT 1"))
                    except Exception as exc:
                        failures.append(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(query)
                    await proxy.wait_held(1)  # the query, on its way to the server
                    proxy.cut()
                proxy.heal()
                [failure] = failures
                assert isinstance(map_error(failure), StoreUnavailable), repr(failure)
            finally:
                await bridge.run(conn.close(timeout=5))


async def test_refuse_fails_new_connections_fast(pg_proxy: ProxiedDatabase) -> None:
    proxy = pg_proxy.proxy
    proxy.refuse()
    # The store would wait up to 60 s for a connection; the failing ping gets 5 s. So the failure
    # is the reset, not a timeout, and a loaded machine keeps a wide margin on either side.
    with trio.fail_after(TIME_LIMIT_S):
        async with Store.open(pg_proxy.url, init_schema=False, timeout_s=60) as store:
            with trio.fail_after(5), pytest.raises(StoreUnavailable):
                await store.ping()
            assert (proxy.accepted, proxy.connections) == (1, 0)
            proxy.heal()
            await store.ping()
            assert proxy.connections == 1


async def test_refuse_spares_open_connections(pg_proxy: ProxiedDatabase) -> None:
    proxy = pg_proxy.proxy
    with trio.fail_after(TIME_LIMIT_S):
        async with Store.open(pg_proxy.url, init_schema=False) as store:
            await store.ping()
            proxy.refuse()
            await store.ping()  # on the pooled connection
            assert proxy.accepted == 1
            proxy.heal()


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "new"])
async def test_stall_hangs_a_query_until_heal(pg_proxy: ProxiedDatabase, pooled: bool) -> None:
    proxy = pg_proxy.proxy
    with trio.fail_after(TIME_LIMIT_S):
        async with Store.open(pg_proxy.url, init_schema=False) as store:
            if pooled:
                await store.ping()
            proxy.stall()
            done = trio.Event()

            async def ping() -> None:
                await store.ping()
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ping)
                await proxy.wait_held(1)
                assert not done.is_set()  # certain: its bytes have not reached the server
                proxy.heal()
            assert done.is_set()
            assert proxy.accepted == 1


@pytest.mark.usefixtures("ping_at_every_checkout")
async def test_down_then_heal_recovers(pg_proxy: ProxiedDatabase) -> None:
    proxy = pg_proxy.proxy
    with trio.fail_after(TIME_LIMIT_S):
        async with Store.open(pg_proxy.url, init_schema=False) as store:
            await store.ping()
            proxy.down()
            # The ping finds the pooled connection dead, and its replacement is refused.
            with pytest.raises(StoreUnavailable):
                await store.ping()
            proxy.heal()
            await store.ping()
            assert (proxy.accepted, proxy.connections) == (3, 1)
