"""Tests of the store (on SQLite and on a real PostgreSQL) and of its asyncio bridge.

Rules: every store behaviour is checked on both databases (the ``database_url`` fixture);
PostgreSQL is never skipped. Fault tests break the real thing (a terminated backend, a held
SQLite lock, a closed port) rather than patching the store. Anything that could hang runs
under ``trio.fail_after``; waits are on events, never on sleeps, except for a few polls of
PostgreSQL's own state (``pg_stat_activity``), which no event reports; none is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import logging
import re
import socket
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypedDict

import asyncpg
import pytest
import trio
from sqlalchemy import event, exc

from chatsrv._errors import StoreError, StoreUnavailable
from chatsrv.store import LOCAL_USER_ID, Store
from chatsrv.store._aio import AsyncioThread, BridgeClosed, open_asyncio_thread
from chatsrv.store._database import map_error
from chatsrv.store._migrate import head
from chatsrv.store._tables import schema_statements
from tests.db import plain_url, terminate_backend

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


# The owner, lease and stream limit every test turn is begun with.
class Lease(TypedDict):
    owner: str
    lease_s: float
    default_model: str
    max_streams: int


LEASE: Lease = {
    "owner": "test-owner",
    "lease_s": 30.0,
    "default_model": "default-model",
    "max_streams": 100,
}


async def execute(store: Store, *statements: str) -> list[Any]:
    """Run raw SQL through the store's own engine and bridge; the first column of each result."""

    async def run() -> list[Any]:
        results = []
        async with store._engine.begin() as conn:
            for statement in statements:
                result = await conn.exec_driver_sql(statement)
                results.append(result.scalar() if result.returns_rows else None)
        return results

    return await store._call(run())


async def new_turn(store: Store, content: str = "hi", *, system: str | None = None) -> Any:
    conversation = await store.create_conversation(
        user=LOCAL_USER_ID, title="t", model=None, system=system
    )
    turn = await store.begin_turn(
        conversation["id"], user=LOCAL_USER_ID, content=content, model="m1", **LEASE
    )
    assert turn is not None
    return turn


# -- Conversations --------------------------------------------------------------------------


async def test_conversation_crud(store: Store) -> None:
    created = [
        await store.create_conversation(user=LOCAL_USER_ID, title=f"t{i}", model="m", system=None)
        for i in range(3)
    ]
    first = created[0]
    assert uuid.UUID(first["id"]).version == 4
    assert first == {
        "id": first["id"],
        "title": "t0",
        "model": "m",
        "system": None,
        "created_at": first["created_at"],
    }
    assert ISO_UTC.match(first["created_at"])

    assert await store.get_conversation(first["id"], user=LOCAL_USER_ID) == first
    assert (
        await store.get_conversation(first["id"].upper(), user=LOCAL_USER_ID) == first
    )  # any UUID spelling
    assert await store.list_conversations(user=LOCAL_USER_ID) == created[::-1]  # newest first
    assert await store.list_conversations(user=LOCAL_USER_ID, limit=2) == created[:0:-1]

    assert await store.delete_conversation(first["id"], user=LOCAL_USER_ID) is True
    assert await store.get_conversation(first["id"], user=LOCAL_USER_ID) is None
    assert await store.delete_conversation(first["id"], user=LOCAL_USER_ID) is False
    assert await store.list_conversations(user=LOCAL_USER_ID) == created[:0:-1]


async def test_delete_cascades_to_messages(store: Store) -> None:
    turn = await new_turn(store)
    cid = turn.user_message["conversation_id"]
    assert await store.delete_conversation(cid, user=LOCAL_USER_ID) is True
    assert await store.list_messages(cid, user=LOCAL_USER_ID) is None
    assert await store.get_message(turn.user_message["id"], user=LOCAL_USER_ID) is None
    assert await execute(store, "SELECT count(*) FROM messages") == [0]


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "", "1234", str(uuid.uuid4())])
async def test_unknown_and_invalid_ids_find_nothing(store: Store, bad_id: str) -> None:
    assert await store.get_conversation(bad_id, user=LOCAL_USER_ID) is None
    assert await store.delete_conversation(bad_id, user=LOCAL_USER_ID) is False
    assert await store.list_messages(bad_id, user=LOCAL_USER_ID) is None
    assert await store.get_message(bad_id, user=LOCAL_USER_ID) is None
    assert (
        await store.begin_turn(bad_id, user=LOCAL_USER_ID, content="hi", model="m", **LEASE) is None
    )
    assert (
        await store.finish_reply(bad_id, content="x", status="complete", stop_reason=None) is False
    )
    assert await execute(store, "SELECT count(*) FROM messages") == [0]


# -- Turns ----------------------------------------------------------------------------------


async def test_begin_turn_and_finish_reply_round_trip(store: Store) -> None:
    conversation = await store.create_conversation(
        user=LOCAL_USER_ID, title=None, model="m0", system="Be brief."
    )
    cid = conversation["id"]
    turn = await store.begin_turn(cid, user=LOCAL_USER_ID, content="first", model="m1", **LEASE)
    assert turn is not None
    assert turn.history == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
    ]
    user, assistant = turn.user_message, turn.assistant_message
    assert (user["role"], user["status"], user["content"], user["model"]) == (
        "user",
        "complete",
        "first",
        None,
    )
    assert (assistant["role"], assistant["status"], assistant["content"]) == (
        "assistant",
        "streaming",
        "",
    )
    assert assistant["model"] == "m1" and assistant["stop_reason"] is None
    # The assistant row exists (streaming) before any byte of the reply.
    assert await store.get_message(assistant["id"], user=LOCAL_USER_ID) == assistant
    assert user["created_at"] < assistant["created_at"]

    usage = {"prompt_tokens": 3, "completion_tokens": 2, "details": {"cached": [1, None, True]}}
    assert await store.finish_reply(
        assistant["id"], content="Hello.", status="complete", stop_reason="stop", usage=usage
    )
    finished = await store.get_message(assistant["id"], user=LOCAL_USER_ID)
    assert finished is not None
    assert finished["content"] == "Hello." and finished["status"] == "complete"
    assert finished["stop_reason"] == "stop" and finished["error"] is None
    assert finished["usage"] == usage
    assert finished["created_at"] == assistant["created_at"]
    assert finished["updated_at"] > assistant["updated_at"]

    # A reply cut off with partial content counts as history; an empty one does not.
    second = await store.begin_turn(cid, user=LOCAL_USER_ID, content="second", model="m1", **LEASE)
    assert second is not None
    await store.finish_reply(
        second.assistant_message["id"],
        content="Partial",
        status="interrupted",
        stop_reason=None,
        error="client went away",
    )
    third = await store.begin_turn(cid, user=LOCAL_USER_ID, content="third", model="m2", **LEASE)
    assert third is not None
    await store.finish_reply(
        third.assistant_message["id"], content="", status="failed", stop_reason=None, error="boom"
    )
    fourth = await store.begin_turn(cid, user=LOCAL_USER_ID, content="fourth", model="m2", **LEASE)
    assert fourth is not None
    assert fourth.history == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "Partial"},
        {"role": "user", "content": "third"},
        {"role": "user", "content": "fourth"},
    ]

    listed = await store.list_messages(cid, user=LOCAL_USER_ID)
    assert listed is not None
    expected_ids = [
        m["id"]
        for t in (turn, second, third, fourth)
        for m in (t.user_message, t.assistant_message)
    ]
    assert [m["id"] for m in listed] == expected_ids
    assert [m["status"] for m in listed] == [
        "complete", "complete", "complete", "interrupted",
        "complete", "failed", "complete", "streaming",
    ]  # fmt: skip
    assert listed[3]["error"] == "client went away"
    stamps = [m["created_at"] for m in listed]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert all(ISO_UTC.match(m["created_at"]) and ISO_UTC.match(m["updated_at"]) for m in listed)
    assert all(m["usage"] is None for m in listed if m["id"] != assistant["id"])


async def test_finish_reply_is_idempotent(store: Store) -> None:
    turn = await new_turn(store)
    mid = turn.assistant_message["id"]
    assert await store.finish_reply(mid, content="a", status="interrupted", stop_reason=None)
    assert await store.finish_reply(
        mid, content="ab", status="complete", stop_reason="stop", usage={"total_tokens": 2}
    )
    listed = await store.list_messages(turn.user_message["conversation_id"], user=LOCAL_USER_ID)
    assert listed is not None and len(listed) == 2
    assert listed[1]["id"] == mid
    assert (listed[1]["content"], listed[1]["status"], listed[1]["stop_reason"]) == (
        "ab",
        "complete",
        "stop",
    )
    assert listed[1]["usage"] == {"total_tokens": 2}


async def test_finish_reply_touches_only_assistant_rows(store: Store) -> None:
    turn = await new_turn(store)
    user_id = turn.user_message["id"]
    assert not await store.finish_reply(user_id, content="x", status="failed", stop_reason=None)
    assert await store.get_message(user_id, user=LOCAL_USER_ID) == turn.user_message
    with pytest.raises(ValueError, match="status"):
        await store.finish_reply(user_id, content="x", status="done", stop_reason=None)


# -- Schema ---------------------------------------------------------------------------------


def test_schema_file_splits_into_plain_statements() -> None:
    statements = schema_statements()
    assert len(statements) == 10
    assert all(";" not in s and "--" not in s for s in statements)
    assert "now()" not in " ".join(statements).lower()


async def test_upgrading_a_schema_at_head_is_a_no_op(store: Store) -> None:
    cid = (
        await store.create_conversation(user=LOCAL_USER_ID, title="kept", model=None, system=None)
    )["id"]
    assert await store.upgrade_schema() == []
    assert await store.schema_revision() == head()
    assert (await store.get_conversation(cid, user=LOCAL_USER_ID)) is not None


async def test_upgrade_schema_on_an_empty_database_runs_once(database_url: str) -> None:
    async with Store.open(database_url, init_schema=False) as a, Store.open(database_url) as b:
        await execute(
            a,
            "DROP TABLE IF EXISTS messages",
            "DROP TABLE IF EXISTS conversations",
            "DROP TABLE IF EXISTS api_keys",
            "DROP TABLE IF EXISTS users",
            "DROP TABLE IF EXISTS database_identity",
            "DROP TABLE IF EXISTS alembic_version",
        )
        assert await a.schema_revision() is None
        results: list[list[str]] = []

        async def upgrade(store: Store) -> None:
            results.append(await store.upgrade_schema())

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:  # two workers starting at once
                nursery.start_soon(upgrade, a)
                nursery.start_soon(upgrade, b)
        assert sorted(results) == [[], ["0001", "0002", "0003", "0004"]]
        assert await a.upgrade_schema() == []
        assert await a.schema_revision() == head()
        await new_turn(b)


async def test_ids_are_dashed_text_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "ids.db"
    async with Store.open(f"sqlite:///{path}") as store:
        turn = await new_turn(store)
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT typeof(id), id FROM messages").fetchall()
        journal = conn.execute("PRAGMA journal_mode").fetchone()
    conn.close()
    expected = [("text", turn.user_message["id"]), ("text", turn.assistant_message["id"])]
    assert sorted(rows) == sorted(expected)
    assert journal == ("wal",)


# -- Faults ---------------------------------------------------------------------------------


async def test_terminated_backend_during_finish_reply(postgresql_url: str) -> None:
    async with Store.open(postgresql_url) as store:
        turn = await new_turn(store)
        mid = turn.assistant_message["id"]
        terminated: list[int] = []

        def kill_before_update(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("UPDATE MESSAGES") and not terminated:
                pid = conn.connection.driver_connection.get_server_pid()
                terminated.append(pid)
                terminate_backend(postgresql_url, pid)

        event.listen(store._engine.sync_engine, "before_cursor_execute", kill_before_update)
        with trio.fail_after(20):
            with pytest.raises(StoreUnavailable) as raised:
                await store.finish_reply(mid, content="partial", status="failed", stop_reason=None)
            assert terminated
            assert isinstance(raised.value.__cause__, exc.DBAPIError)
            # The retry gets a fresh connection and writes the same row.
            assert await store.finish_reply(
                mid, content="done", status="complete", stop_reason="stop", usage={"n": 1}
            )
        event.remove(store._engine.sync_engine, "before_cursor_execute", kill_before_update)
        listed = await store.list_messages(turn.user_message["conversation_id"], user=LOCAL_USER_ID)
        assert listed is not None and [m["id"] for m in listed].count(mid) == 1
        assert len(listed) == 2
        assert (listed[1]["content"], listed[1]["status"], listed[1]["usage"]) == (
            "done",
            "complete",
            {"n": 1},
        )


async def test_conversation_deleted_while_a_turn_begins(postgresql_url: str) -> None:
    """begin_turn locks nothing: a conversation whose delete commits while the turn's INSERT
    checks its foreign key fails that check, and the turn is not found, with nothing written."""
    async with Store.open(postgresql_url) as store:
        conversation = await store.create_conversation(
            user=LOCAL_USER_ID, title=None, model=None, system=None
        )
        cid = conversation["id"]
        deleting: list[threading.Thread] = []

        def delete_meanwhile(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "INSERT INTO messages" in statement and not deleting:
                pid = conn.connection.driver_connection.get_server_pid()
                deleted = threading.Event()
                thread = threading.Thread(
                    target=delete_once_blocking, args=(postgresql_url, cid, pid, deleted)
                )
                deleting.append(thread)
                thread.start()
                assert deleted.wait(10)  # deleted, not yet committed

        event.listen(store._engine.sync_engine, "before_cursor_execute", delete_meanwhile)
        with trio.fail_after(20):
            assert (
                await store.begin_turn(cid, user=LOCAL_USER_ID, content="hi", model=None, **LEASE)
                is None
            )
        event.remove(store._engine.sync_engine, "before_cursor_execute", delete_meanwhile)
        [thread] = deleting
        thread.join(10)
        count = f"SELECT count(*) FROM messages WHERE conversation_id = '{cid}'"
        assert await execute(store, count) == [0]


def delete_once_blocking(url: str, cid: str, pid: int, deleted: threading.Event) -> None:
    """Delete the conversation in a transaction, and commit it once backend ``pid`` waits for
    that transaction's row lock (its foreign key check)."""

    async def main() -> None:
        conn = await asyncpg.connect(plain_url(url), timeout=10)
        try:
            async with conn.transaction():
                await conn.execute("DELETE FROM conversations WHERE id = $1", cid)
                deleted.set()
                waiting = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1"
                for _ in range(1000):
                    if await conn.fetchval(waiting, pid) == "Lock":
                        return  # commit
                    await asyncio.sleep(0.01)
                raise AssertionError("the turn's INSERT never waited for the delete")
        finally:
            await conn.close()

    asyncio.run(main())


async def test_sqlite_lock_held_past_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    async with Store.open(f"sqlite+aiosqlite:///{path}", timeout_s=0.2) as store:
        turn = await new_turn(store)
        mid = turn.assistant_message["id"]
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            with trio.fail_after(10), pytest.raises(StoreUnavailable, match="locked"):
                await store.finish_reply(mid, content="x", status="complete", stop_reason="stop")
            # Readers are not blocked by a writer under WAL.
            assert await store.get_message(mid, user=LOCAL_USER_ID) == turn.assistant_message
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        with trio.fail_after(10):
            assert await store.finish_reply(mid, content="x", status="complete", stop_reason="stop")
        finished = await store.get_message(mid, user=LOCAL_USER_ID)
        assert finished is not None and finished["content"] == "x"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_ping_unreachable_database_is_unavailable() -> None:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/nowhere"
    with trio.fail_after(20):
        async with Store.open(url, init_schema=False, timeout_s=2) as store:
            with pytest.raises(StoreUnavailable):
                await store.ping()
        with pytest.raises(StoreUnavailable):
            async with Store.open(url, timeout_s=2):
                pass  # applying the schema fails first


async def test_ping(store: Store) -> None:
    await store.ping()


_STMT = "SELECT 1"


def _with_cause(cause: BaseException) -> Exception:
    orig = Exception("adapted driver error")
    orig.__cause__ = cause
    return orig


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (exc.InterfaceError(_STMT, None, Exception("the underlying connection is closed")), True),
        (exc.OperationalError(_STMT, None, Exception("server closed the connection")), True),
        (exc.DBAPIError(_STMT, None, Exception("x"), connection_invalidated=True), True),
        (exc.DBAPIError(_STMT, None, _with_cause(asyncpg.AdminShutdownError("bye"))), True),
        (exc.DBAPIError(_STMT, None, _with_cause(asyncpg.UndefinedTableError("no"))), False),
        (exc.OperationalError(_STMT, None, sqlite3.OperationalError("database is locked")), True),
        (exc.OperationalError(_STMT, None, sqlite3.OperationalError("no such table: x")), False),
        (exc.IntegrityError(_STMT, None, sqlite3.IntegrityError("FOREIGN KEY failed")), False),
        (exc.ProgrammingError(_STMT, None, Exception("syntax")), False),
        (exc.TimeoutError("QueuePool limit reached"), True),
        (OSError(111, "Connection refused"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (asyncpg.ConnectionDoesNotExistError("closed mid-operation"), True),
        (asyncpg.InterfaceError("connection is closed"), True),
        (asyncpg.TooManyConnectionsError("too many"), True),
        (asyncpg.UniqueViolationError("dup"), False),
        (ValueError("bug"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_error_mapping(error: Exception, expected: bool) -> None:
    mapped = map_error(error)
    assert isinstance(mapped, StoreError)
    assert isinstance(mapped, StoreUnavailable) is expected


# -- The bridge -----------------------------------------------------------------------------


async def test_waiting_callers_hold_no_thread() -> None:
    async with open_asyncio_thread() as bridge:
        token = trio.lowlevel.current_trio_token()
        callers = 100
        started: list[None] = []
        all_started = trio.Event()
        gate: dict[str, asyncio.Event] = {}

        async def wait_at_gate() -> int:
            gate.setdefault("event", asyncio.Event())
            started.append(None)
            if len(started) == callers:
                token.run_sync_soon(all_started.set)
            await gate["event"].wait()
            return 1

        async def open_gate() -> None:
            gate["event"].set()

        limiter = trio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 1
        results: list[int] = []

        async def call() -> None:
            results.append(await bridge.run(wait_at_gate()))

        threads_before = threading.active_count()
        with trio.fail_after(10):
            # Hold Trio's only worker thread: the bridge must not need one.
            async with limiter, trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(call)
                await all_started.wait()
                assert threading.active_count() == threads_before
                await bridge.run(open_gate())
        assert results == [1] * callers


async def test_store_calls_hold_no_thread(store: Store) -> None:
    limiter = trio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = 1
    with trio.fail_after(20):
        async with limiter, trio.open_nursery() as nursery:
            for i in range(20):
                create = functools.partial(
                    store.create_conversation, user=LOCAL_USER_ID, model=None, system=None
                )
                nursery.start_soon(functools.partial(create, title=str(i)))
    assert len(await store.list_conversations(user=LOCAL_USER_ID)) == 20


@contextlib.asynccontextmanager
async def observer(url: str) -> AsyncIterator[Callable[[str], Awaitable[Any]]]:
    """A connection of the test's own to PostgreSQL, beside the store's: ``fetchval(query)``."""
    async with open_asyncio_thread(name="test-observer") as bridge:
        conn = await bridge.run(asyncpg.connect(plain_url(url), timeout=10))
        try:

            async def fetchval(query: str) -> Any:
                return await bridge.run(conn.fetchval(query))

            yield fetchval
        finally:
            await bridge.run(conn.close(timeout=5))


async def wait_for_backends(fetchval: Callable[[str], Awaitable[Any]], where: str, n: int) -> None:
    """Poll until ``n`` other backends of this database match ``where`` in pg_stat_activity
    (bounded by the caller: what asyncpg does on its own thread, Trio cannot wait on)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        f"AND pid <> pg_backend_pid() AND {where}"
    )
    while await fetchval(query) < n:  # noqa: ASYNC110 (the state is PostgreSQL's: no Event)
        await trio.sleep(0.01)


async def test_slow_postgresql_calls_run_concurrently(postgresql_url: str) -> None:
    """Ten calls that each wait for a lock the test holds are all waiting at once, each on a
    connection of its own. Counted in pg_stat_activity, not timed: calls run one after the
    other would never have more than one waiting."""
    lock = "pg_advisory_xact_lock_shared(4242)"
    async with Store.open(postgresql_url, pool_size=10) as store, observer(postgresql_url) as db:
        await db("SELECT pg_advisory_lock(4242)")
        limiter = trio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 1
        with trio.fail_after(20):
            async with limiter, trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(execute, store, f"SELECT {lock}")
                waiting = f"wait_event_type = 'Lock' AND query = 'SELECT {lock}'"
                await wait_for_backends(db, waiting, 10)
                await db("SELECT pg_advisory_unlock(4242)")


async def test_cancelling_the_caller_cancels_the_asyncio_task_without_waiting() -> None:
    async with open_asyncio_thread() as bridge:
        token = trio.lowlevel.current_trio_token()
        started = trio.Event()
        seen: dict[str, Any] = {}

        async def stubborn() -> None:
            seen["release"], seen["unwound"] = asyncio.Event(), asyncio.Event()
            token.run_sync_soon(started.set)
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen["cancelled"] = True
                # Unwinds only once the Trio side has returned: the caller must not wait.
                await seen["release"].wait()
                seen["unwound"].set()
                raise

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge.run, stubborn())
                await started.wait()
                nursery.cancel_scope.cancel()
            bridge.loop.call_soon_threadsafe(seen["release"].set)

            async def unwound() -> bool:
                await seen["unwound"].wait()
                return bool(seen.get("cancelled"))

            assert await bridge.run(unwound())


async def test_cancelled_postgresql_query_leaves_the_store_usable(postgresql_url: str) -> None:
    async with Store.open(postgresql_url, pool_size=1) as store, observer(postgresql_url) as db:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(execute, store, "SELECT pg_sleep(30)")
                # Cancelled once the query runs on the server, not while it connects.
                running = "state = 'active' AND query = 'SELECT pg_sleep(30)'"
                await wait_for_backends(db, running, 1)
                nursery.cancel_scope.cancel()
        # The pool's one connection was busy with the query: it must be usable again (or
        # replaced) well before the query would have ended.
        with trio.fail_after(15):
            await store.ping()
            await new_turn(store)


async def test_results_and_errors_cross_the_bridge() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        raise KeyError("on the loop")

    with trio.fail_after(10):
        async with open_asyncio_thread() as bridge:
            assert await bridge.run(answer()) == 42
            with pytest.raises(KeyError, match="on the loop"):
                await bridge.run(fail())


async def test_unsubmitted_coroutines_are_closed() -> None:
    bridge = AsyncioThread()
    coro = asyncio.sleep(0)
    with trio.CancelScope() as scope:
        scope.cancel()
        await bridge.run(coro)
    assert scope.cancelled_caught
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED

    with trio.fail_after(10):
        await bridge.aclose()
    assert not bridge.thread.is_alive()
    coro = asyncio.sleep(0)
    with pytest.raises(BridgeClosed):
        await bridge.run(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    gc.collect()  # a leaked coroutine would warn "never awaited" here


async def test_closing_the_bridge_fails_calls_in_flight() -> None:
    async with open_asyncio_thread() as bridge:
        token = trio.lowlevel.current_trio_token()
        started = trio.Event()

        async def forever() -> None:
            token.run_sync_soon(started.set)
            await asyncio.sleep(60)

        async def call() -> None:
            with pytest.raises(BridgeClosed):
                await bridge.run(forever())

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await started.wait()
                await bridge.aclose()


async def test_close_stops_the_loop_thread(database_url: str) -> None:
    with trio.fail_after(20):
        async with Store.open(database_url) as store:
            await store.ping()
            thread = store._bridge.thread
            assert thread.is_alive()
        assert not thread.is_alive()
        assert thread not in threading.enumerate()
        with pytest.raises(StoreError, match="closed"):
            await store.ping()
    gc.collect()


async def test_a_store_closes_at_once_after_a_statement_was_cancelled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shutdown cancels a recovery round while its statement waits for SQLite's write lock;
    the driver then closes that connection on the loop, behind the waiting statement. Stopping
    the loop must let that close finish rather than cancel it halfway: aiosqlite's close then
    never returned, and the shutdown waited out the store's timeout and abandoned its thread."""
    path = tmp_path / "chatsrv.db"
    executing = threading.Event()

    def executing_soon(*_: Any) -> None:  # on the asyncio thread, as the statement goes out
        executing.set()

    with trio.fail_after(20):
        async with Store.open(f"sqlite+aiosqlite:///{path}", timeout_s=5.0) as store:
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # holds the write lock the sweep waits for
            event.listen(store._engine.sync_engine, "before_cursor_execute", executing_soon)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.sweep, "someone")
                await trio.to_thread.run_sync(executing.wait)
                nursery.cancel_scope.cancel()
            blocker.execute("COMMIT")
            blocker.close()
            closing = trio.current_time()
        # Well under the store's timeout, which the close used to wait out.
        assert trio.current_time() - closing < 3.0
        assert not store._bridge.thread.is_alive()
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
