"""Database fixtures: every store test runs on SQLite and on a real PostgreSQL.

- ``postgresql_url`` (session): a fresh database ``chatsrv_test_<hex>`` on the server named by
  ``CHATSRV_TEST_DATABASE_URL`` (what CI sets), or, when that is unset, on a throwaway
  PostgreSQL 18 (``tests/embedded_postgres.py``); dropped at the end. PostgreSQL is never
  skipped.
- ``database_url`` (function, ``sqlite``/``postgresql``): a SQLite file in ``tmp_path``, or the
  PostgreSQL database emptied for this test.
- ``store``: a :class:`~chatsrv.store.Store` opened on ``database_url``.

The setup code is synchronous (it runs before the test's Trio run), so it drives asyncpg with a
plain ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from chatsrv.store import LOCAL_USER_ID, Store
from tests.embedded_postgres import DATABASE_URL_VARIABLE, embedded_postgresql


def plain_url(url: str, *, database: str | None = None) -> str:
    """``url`` as a libpq/asyncpg DSN (no ``+asyncpg``), optionally naming another database."""
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def asyncpg_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def run_asyncpg(dsn: str, *statements: str) -> None:
    """Run ``statements`` on a new asyncpg connection to ``dsn``, from synchronous code.

    Runs in a thread of its own, so that it works even when called on a running asyncio loop
    (e.g. from a SQLAlchemy event listener inside the store).
    """

    async def main() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    _in_a_thread(main)


def _in_a_thread(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="test-asyncpg")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def terminate_backend(url: str, pid: int) -> None:
    """Terminate the PostgreSQL backend ``pid`` from a connection of our own, and wait until
    it is gone (callable from any thread, including the store's asyncio thread)."""

    async def main() -> None:
        conn = await asyncpg.connect(plain_url(url), timeout=10)
        try:
            await conn.execute(f"SELECT pg_terminate_backend({int(pid)})")
            for _ in range(500):
                if not await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
                ):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"backend {pid} survived pg_terminate_backend")
        finally:
            await conn.close()

    _in_a_thread(main)


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    server = os.environ.get(DATABASE_URL_VARIABLE)
    if server:
        yield from _fresh_database(server)
        return
    with embedded_postgresql() as embedded:
        yield from _fresh_database(embedded.url)


def _fresh_database(server_url: str) -> Iterator[str]:
    name = f"chatsrv_test_{secrets.token_hex(6)}"
    admin = plain_url(server_url)
    run_asyncpg(admin, f'CREATE DATABASE "{name}"')
    try:
        yield asyncpg_url(plain_url(server_url, database=name))
    finally:
        run_asyncpg(
            admin,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
            f'DROP DATABASE IF EXISTS "{name}"',
        )


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'chatsrv.db'}"
    url: str = request.getfixturevalue("postgresql_url")
    # One database per session, emptied before each test that uses it: every row but the user
    # 'local', which the migrations create once and every request is when CHATSRV_AUTH=off.
    run_asyncpg(
        plain_url(url),
        "DO $$ BEGIN "
        "IF to_regclass('messages') IS NOT NULL THEN TRUNCATE messages, conversations; END IF; "
        "IF to_regclass('api_keys') IS NOT NULL THEN TRUNCATE api_keys; END IF; "
        "IF to_regclass('users') IS NOT NULL THEN "
        f"DELETE FROM users WHERE id <> '{LOCAL_USER_ID}'; END IF; "
        "END $$",
    )
    return url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    async with Store.open(database_url) as opened:
        yield opened
