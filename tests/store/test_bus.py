"""The store's bus on a real PostgreSQL: LISTEN/NOTIFY between two stores (two processes' worth),
what a subscriber receives, when it stops receiving, and a listener that loses its connection.

Rules: each test opens its own stores on the session's database; every wait is bounded.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import trio

from chatsrv.store import MAX_PAYLOAD_BYTES, Store, Subscription
from tests.db import plain_url, terminate_backend


async def receive(subscription: Subscription, timeout_s: float = 5.0) -> str:
    with trio.fail_after(timeout_s):
        return await subscription.receive()


async def nothing_arrives(subscription: Subscription, after: str) -> None:
    """Nothing but ``after``'s marker arrives: send the marker on another channel first."""
    with trio.move_on_after(0.3):
        payload = await subscription.receive()
        pytest.fail(f"received {payload!r} ({after})")


def listeners_of(url: str, channel: str) -> list[int]:
    """The backends whose last statement listened to ``channel`` (blocking: run in a thread)."""

    async def main() -> list[int]:
        conn = await asyncpg.connect(plain_url(url), timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE query ILIKE $1", f"LISTEN%{channel}%"
            )
        finally:
            await conn.close()
        return [row["pid"] for row in rows]

    return asyncio.run(main())


async def test_sqlite_has_no_bus(tmp_path: object) -> None:
    async with Store.open(f"sqlite+aiosqlite:///{tmp_path}/db") as store:
        assert store.bus is None


async def test_a_notification_reaches_every_subscriber_of_its_channel(
    postgresql_url: str,
) -> None:
    async with Store.open(postgresql_url) as sender, Store.open(postgresql_url) as listener:
        assert sender.bus is not None and listener.bus is not None
        first = await listener.bus.subscribe("chatsrv_test_a")
        second = await listener.bus.subscribe("chatsrv_test_a")
        other = await listener.bus.subscribe("chatsrv_test_b")
        await sender.bus.notify("chatsrv_test_a", "héllo")
        await sender.bus.notify("chatsrv_test_a", "again")
        assert [await receive(first), await receive(first)] == ["héllo", "again"]
        assert [await receive(second), await receive(second)] == ["héllo", "again"]
        await nothing_arrives(other, "a message on another channel")
        for subscription in (first, second, other):
            subscription.close()


async def test_a_closed_subscription_receives_nothing_and_the_others_go_on(
    postgresql_url: str,
) -> None:
    async with Store.open(postgresql_url) as store:
        assert store.bus is not None
        leaving = await store.bus.subscribe("chatsrv_test_c")
        staying = await store.bus.subscribe("chatsrv_test_c")
        leaving.close()
        await store.bus.notify("chatsrv_test_c", "still here")
        assert await receive(staying) == "still here"
        with pytest.raises(trio.ClosedResourceError):
            await leaving.receive()
        staying.close()
        # The last one gone, the channel is no longer listened to; a new subscriber listens again.
        again = await store.bus.subscribe("chatsrv_test_c")
        await store.bus.notify("chatsrv_test_c", "back")
        assert await receive(again) == "back"
        again.close()


async def test_the_largest_payload_goes_through(postgresql_url: str) -> None:
    async with Store.open(postgresql_url) as store:
        assert store.bus is not None
        subscription = await store.bus.subscribe("chatsrv_test_d")
        payload = "é" * (MAX_PAYLOAD_BYTES // 2)
        await store.bus.notify("chatsrv_test_d", payload)
        assert await receive(subscription) == payload
        subscription.close()


async def test_the_listener_reconnects_after_losing_its_connection(postgresql_url: str) -> None:
    async with Store.open(postgresql_url) as store:
        assert store.bus is not None
        subscription = await store.bus.subscribe("chatsrv_test_e")
        pids = await trio.to_thread.run_sync(listeners_of, postgresql_url, "chatsrv_test_e")
        assert len(pids) == 1
        await trio.to_thread.run_sync(terminate_backend, postgresql_url, pids[0])
        # Sent until one arrives: those sent while it reconnects are lost (best effort).
        with trio.fail_after(15):
            while True:
                await store.bus.notify("chatsrv_test_e", "after the loss")
                with trio.move_on_after(0.5):
                    assert await subscription.receive() == "after the loss"
                    break
        subscription.close()
