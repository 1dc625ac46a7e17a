"""Tests of the schema's migrations (``chatsrv/store/migrations``), on SQLite and on PostgreSQL.

Every test starts from databases of its own, made empty for it (``new_database``): the session's
PostgreSQL database that ``database_url`` names is only emptied of rows between tests, and these
tests need databases without tables. The schemas chatsrv had before it had migrations are kept
beside this file as they were released: ``first_schema.sql`` (revision 0001, ``schema.sql`` at
b0c536f) and ``durability_schema.sql`` (revision 0002, ``schema.sql`` at e8ff2ed).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
import secrets
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trio
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection, Engine, make_url

from chatsrv._errors import SchemaMismatch
from chatsrv.store import Store
from chatsrv.store._migrate import _script, head
from chatsrv.store._store import _SCHEMA_LOCK_KEY
from chatsrv.store._tables import schema_path, schema_statements
from tests.db import asyncpg_url, plain_url, run_asyncpg

HERE = Path(__file__).resolve().parent
FIRST_SCHEMA = HERE / "first_schema.sql"
DURABILITY_SCHEMA = HERE / "durability_schema.sql"
LOCAL_USER_ID = "00000000-0000-0000-0000-000000000000"


# -- Databases ------------------------------------------------------------------------------


@pytest.fixture
def new_database(database_url: str, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Make empty databases of ``database_url``'s kind: a new SQLite file, or a new database on
    the PostgreSQL server (dropped at the end)."""
    made: list[str] = []

    def make() -> str:
        name = f"chatsrv_test_{secrets.token_hex(6)}"
        if make_url(database_url).get_backend_name() == "sqlite":
            return f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}"
        run_asyncpg(plain_url(database_url), f'CREATE DATABASE "{name}"')
        made.append(name)
        return asyncpg_url(plain_url(database_url, database=name))

    yield make
    for name in made:
        run_asyncpg(
            plain_url(database_url),
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
            f'DROP DATABASE IF EXISTS "{name}"',
        )


async def execute(store: Store, *statements: str) -> list[list[dict[str, Any]]]:
    """Run raw SQL through the store's own engine and bridge, in one transaction; the rows of
    each statement (an empty list for one that returns none)."""

    async def run() -> list[list[dict[str, Any]]]:
        results = []
        async with store._engine.begin() as conn:
            for statement in statements:
                result = await conn.exec_driver_sql(statement)
                rows = [dict(row) for row in result.mappings()] if result.returns_rows else []
                results.append(rows)
        return results

    return await store._call(run())


async def scalar(store: Store, statement: str) -> Any:
    [[row]] = await execute(store, statement)
    [value] = row.values()
    return value


async def on_connection(store: Store, run: Callable[[Connection], Any]) -> Any:
    """``run`` on a synchronous connection of the store's engine, in one transaction."""

    async def call() -> Any:
        async with store._engine.begin() as conn:
            return await conn.run_sync(run)

    return await store._call(call())


async def apply(url: str, sql: str) -> None:
    async with Store.open(url, init_schema=False) as store:
        await execute(store, *schema_statements(sql))


async def stamp(url: str, revision: str) -> None:
    """Record ``revision`` in ``alembic_version``, as chatsrv does for an unversioned schema."""
    async with Store.open(url, init_schema=False) as store:
        await on_connection(
            store, lambda conn: MigrationContext.configure(conn).stamp(_script(), revision)
        )


# -- The schema, reflected ------------------------------------------------------------------


def _sql(value: Any) -> str:
    """SQL text without its layout: one space between words, none inside parentheses."""
    text = re.sub(r"\s+", " ", str(value)).strip()
    return re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", text))


def describe(conn: Connection) -> list[str]:
    """The schema, one line a fact, sorted: tables, columns, keys, indexes, constraints."""
    inspector = inspect(conn)
    dialect = conn.dialect
    facts: list[str] = []
    for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
        facts.append(f"{table}")
        for column in inspector.get_columns(table):
            facts.append(
                f"{table} column {column['name']}: {column['type'].compile(dialect=dialect)}"
                f"{'' if column['nullable'] else ' NOT'} NULL, default {column['default']}"
            )
        primary = inspector.get_pk_constraint(table)
        facts.append(f"{table} primary key {primary['constrained_columns']}")
        for key in inspector.get_foreign_keys(table):
            facts.append(
                f"{table} foreign key {key['name']} {key['constrained_columns']} -> "
                f"{key['referred_table']} {key['referred_columns']} "
                f"{sorted(key['options'].items())}"
            )
        for index in inspector.get_indexes(table):
            where = {
                option: _sql(value)
                for option, value in index.get("dialect_options", {}).items()
                if option.endswith("_where")
            }
            facts.append(
                f"{table} {'unique ' if index['unique'] else ''}index {index['name']} "
                f"{index['column_names']} {where}"
            )
        for unique in inspector.get_unique_constraints(table):
            facts.append(f"{table} unique {unique['name']} {unique['column_names']}")
        for check in inspector.get_check_constraints(table):
            facts.append(f"{table} check {check['name']} {_sql(check['sqltext'])}")
        if dialect.name == "sqlite":
            facts.extend(_sqlite_facts(conn, table))
    return sorted(facts)


def _sqlite_facts(conn: Connection, table: str) -> list[str]:
    """What SQLAlchemy does not reflect on SQLite: the declared types (it shows their affinity)
    and the actions of a column's REFERENCES (it reads them only from FOREIGN KEY clauses)."""
    facts = [
        f"{table} column {name} declared {declared}"
        for _, name, declared, *_ in conn.exec_driver_sql(f"PRAGMA table_info({table})")
    ]
    facts.extend(
        f"{table} references {key.table} ({key.to}) from {key._mapping['from']}: "
        f"on update {key.on_update}, on delete {key.on_delete}, match {key.match}"
        for key in conn.exec_driver_sql(f"PRAGMA foreign_key_list({table})")
    )
    return facts


async def reflect(url: str) -> list[str]:
    async with Store.open(url, init_schema=False) as store:
        facts: list[str] = await on_connection(store, describe)
        return facts


async def written_and_migrated(
    new_database: Callable[[], str], sql: str
) -> tuple[list[str], list[str]]:
    """The schema ``sql`` makes, and the migrations', each reflected from a new database."""
    written, migrated = new_database(), new_database()
    await apply(written, sql)
    async with Store.open(migrated) as store:
        assert await store.schema_revision() == head()
    return await reflect(written), await reflect(migrated)


def differences(written: list[str], migrated: list[str]) -> str:
    diff = difflib.unified_diff(written, migrated, "schema.sql", "migrations", n=0, lineterm="")
    return "schema.sql and the migrations disagree:\n" + "\n".join(diff)


# -- schema.sql is the migrations' head -----------------------------------------------------


async def test_schema_file_is_the_migrations_head(new_database: Callable[[], str]) -> None:
    written, migrated = await written_and_migrated(
        new_database, await trio.Path(schema_path()).read_text("utf-8")
    )
    assert written == migrated, differences(written, migrated)
    # The comparison sees what it should.
    assert [fact for fact in written if " " not in fact] == [
        "api_keys",
        "conversations",
        "database_identity",
        "messages",
        "users",
    ]
    assert any(
        fact.startswith("messages index messages_streaming ['lease_expires_at'] {")
        and "status = 'streaming'" in fact
        for fact in written
    )


async def test_a_schema_file_that_disagrees_is_caught(new_database: Callable[[], str]) -> None:
    sql = await trio.Path(schema_path()).read_text("utf-8")
    edits = {
        "revoked_at TIMESTAMPTZ NULL": "revoked_at TIMESTAMPTZ NOT NULL",
        "WHERE idempotency_key IS NOT NULL": "WHERE owner IS NOT NULL",
        "REFERENCES conversations (id) ON DELETE CASCADE": "REFERENCES conversations (id)",
        "'timed_out', ": "",
        "parent_id UUID NULL": "parent_id TEXT NULL",
        "digest TEXT NOT NULL UNIQUE": "digest TEXT NOT NULL",
        "ON conversations (user_id, created_at, id)": "ON conversations (user_id, created_at)",
    }
    for old, new in edits.items():
        assert old in sql
        sql = sql.replace(old, new)
    written, migrated = await written_and_migrated(new_database, sql)
    diff = differences(written, migrated)
    assert "api_keys column revoked_at" in diff
    assert "index messages_idempotency" in diff
    assert "CASCADE" in diff
    assert "timed_out" in diff
    assert "messages column parent_id" in diff
    assert "api_keys unique" in diff
    assert "index conversations_of_user" in diff


# -- Upgrading the schemas chatsrv had before migrations ------------------------------------

C1, C2 = "0c6b1c7e-0d5a-4f0e-9a53-5a4c8f0e1a01", "0c6b1c7e-0d5a-4f0e-9a53-5a4c8f0e1a02"


def _m(n: int) -> str:
    return f"7d2e5b1a-3c4f-4a6b-8e9d-1f2a3b4c5d{n:02d}"


def _values(*values: str | int | None) -> str:
    """A row of SQL literals: a str is quoted, an int is the timestamp numbered so."""

    def literal(value: str | int | None) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, int):
            # SQLAlchemy's text for a timestamp on SQLite; PostgreSQL parses it (in the session's
            # time zone: the tests only compare values before and after an upgrade).
            return f"'2024-05-01 10:00:{value:02d}.{value:06d}'"
        return "'" + value.replace("'", "''") + "'"

    return "(" + ", ".join(map(literal, values)) + ")"


CONVERSATION_ROWS = [
    _values(C1, "Crème brûlée", "m1", "Réponds en français — 日本語も", 1),
    _values(C2, None, None, None, 2),
]
MESSAGE_ROWS = [
    # id, conversation_id, role, content, status, stop_reason, error, model, usage, created, updated
    _values(_m(1), C1, "user", "Bonjour, ça va ? 🙂", "complete", None, None, "m1", None, 3, 3),
    _values(
        _m(2),
        C1,
        "assistant",
        "Très bien, merci ! ✓",
        "complete",
        "stop",
        None,
        "m1",
        '{"input_tokens": 5, "output_tokens": 7}',
        4,
        6,
    ),
    _values(_m(3), C1, "user", "Et l'été ?", "complete", None, None, "m1", None, 7, 7),
    _values(_m(4), C1, "assistant", "L'été est chaud…", "streaming", None, None, "m1", None, 8, 9),
    _values(_m(5), C2, "system", "You are terse.", "complete", None, None, None, None, 10, 10),
    _values(_m(6), C2, "user", "ping", "complete", None, None, None, None, 11, 11),
    _values(_m(7), C2, "assistant", "", "failed", None, "upstream_error", "x", None, 12, 13),
]
DATA = [
    "INSERT INTO conversations (id, title, model, system_prompt, created_at) VALUES "
    + ", ".join(CONVERSATION_ROWS),
    "INSERT INTO messages (id, conversation_id, role, content, status, stop_reason, error, "
    "model, usage, created_at, updated_at) VALUES " + ", ".join(MESSAGE_ROWS),
]
# The columns the durability schema added, on the replies.
DURABILITY_DATA = [
    f"UPDATE messages SET parent_id = '{_m(1)}', idempotency_key = 'key-1' WHERE id = '{_m(2)}'",
    f"UPDATE messages SET parent_id = '{_m(3)}', idempotency_key = 'clé-2', owner = 'worker-1', "
    f"lease_expires_at = '2024-05-01 10:00:30.000000' WHERE id = '{_m(4)}'",
]

UNVERSIONED = [
    pytest.param(FIRST_SCHEMA, "0001", DATA, id="first"),
    pytest.param(DURABILITY_SCHEMA, "0002", DATA + DURABILITY_DATA, id="durability"),
]


async def unversioned_database(
    new_database: Callable[[], str], schema: Path, data: list[str]
) -> str:
    url = new_database()
    async with Store.open(url, init_schema=False) as store:
        await execute(store, *schema_statements(await trio.Path(schema).read_text("utf-8")), *data)
    return url


async def snapshot(url: str) -> dict[str, Any]:
    """A database as a test compares it: its schema, its version table, its rows."""
    async with Store.open(url, init_schema=False) as store:
        versioned = await on_connection(
            store, lambda conn: inspect(conn).has_table("alembic_version")
        )
        conversations, messages = await execute(
            store,
            "SELECT id, title, model, system_prompt, created_at FROM conversations ORDER BY id",
            "SELECT * FROM messages ORDER BY id",
        )
        return {
            "schema": await on_connection(store, describe),
            "revision": await store.schema_revision(),
            "alembic_version": (await execute(store, "SELECT * FROM alembic_version"))[0]
            if versioned
            else None,
            "conversations": conversations,
            "messages": messages,
        }


@pytest.mark.parametrize(("schema", "revision", "data"), UNVERSIONED)
async def test_an_unversioned_schema_is_upgraded_to_head_keeping_every_row(
    new_database: Callable[[], str],
    caplog: pytest.LogCaptureFixture,
    schema: Path,
    revision: str,
    data: list[str],
) -> None:
    caplog.set_level(logging.INFO, logger="chatsrv.store._migrate")
    url = await unversioned_database(new_database, schema, data)
    before = await snapshot(url)
    assert before["revision"] == revision  # recognised by its columns
    assert before["alembic_version"] is None
    assert len(before["conversations"]) == 2
    assert len(before["messages"]) == len(MESSAGE_ROWS)

    with trio.fail_after(30):
        async with Store.open(url, upgrade=True) as store:
            assert await store.schema_revision() == head() == "0004"
            owners, users = await execute(
                store,
                "SELECT CAST(id AS TEXT) AS id, CAST(user_id AS TEXT) AS user_id "
                "FROM conversations ORDER BY id",
                "SELECT CAST(id AS TEXT) AS id, name FROM users",
            )
            if store._engine.dialect.name == "sqlite":
                # The rebuilt conversations table broke no reference, and the store's own
                # connections check foreign keys again (the migration ran without).
                assert await execute(store, "PRAGMA foreign_key_check") == [[]]
                assert await scalar(store, "PRAGMA foreign_keys") == 1
    applied = [r.getMessage() for r in caplog.records if r.getMessage().startswith("applied")]
    later = ["0002", "0003", "0004"] if revision == "0001" else ["0003", "0004"]
    assert applied == [f"applied migration {step}" for step in later]

    after = await snapshot(url)
    assert after["revision"] == head()
    assert after["alembic_version"] == [{"version_num": head()}]
    # Every row is there, unchanged: dropping the old conversations table on SQLite deleted no
    # message by cascade.
    assert after["conversations"] == before["conversations"]
    columns = before["messages"][0].keys()  # those of the first schema gained NULL columns
    assert [{c: row[c] for c in columns} for row in after["messages"]] == before["messages"]
    assert len(after["messages"]) == len(MESSAGE_ROWS)
    assert owners == [{"id": C1, "user_id": LOCAL_USER_ID}, {"id": C2, "user_id": LOCAL_USER_ID}]
    assert users == [{"id": LOCAL_USER_ID, "name": "local"}]
    # And the schema is the one the migrations make on an empty database.
    fresh = new_database()
    async with Store.open(fresh):
        pass
    assert after["schema"] == (await snapshot(fresh))["schema"]


@pytest.mark.parametrize(("schema", "revision", "data"), UNVERSIONED)
async def test_messages_still_cascade_with_their_conversation_after_the_upgrade(
    new_database: Callable[[], str], schema: Path, revision: str, data: list[str]
) -> None:
    url = await unversioned_database(new_database, schema, data)
    async with Store.open(url) as store:
        counts = await execute(
            store,
            f"DELETE FROM conversations WHERE id = '{C2}'",
            "SELECT conversation_id, count(*) AS n FROM messages GROUP BY conversation_id",
        )
    assert [(str(row["conversation_id"]), row["n"]) for row in counts[1]] == [(C1, 4)]


# -- Refusals -------------------------------------------------------------------------------


async def durability_stamped(new_database: Callable[[], str]) -> str:
    url = await unversioned_database(new_database, DURABILITY_SCHEMA, DATA + DURABILITY_DATA)
    await stamp(url, "0002")
    return url


async def first_unversioned(new_database: Callable[[], str]) -> str:
    return await unversioned_database(new_database, FIRST_SCHEMA, DATA)


@pytest.mark.parametrize(
    ("make", "revision"),
    [
        pytest.param(first_unversioned, "0001", id="unversioned-0001"),
        pytest.param(durability_stamped, "0002", id="stamped-0002"),
    ],
)
async def test_a_schema_behind_is_refused_unchanged_without_upgrade(
    new_database: Callable[[], str],
    make: Callable[[Callable[[], str]], Awaitable[str]],
    revision: str,
) -> None:
    url = await make(new_database)
    before = await snapshot(url)
    assert before["revision"] == revision
    with trio.fail_after(30), pytest.raises(SchemaMismatch) as refused:
        async with Store.open(url, upgrade=False):
            pytest.fail("the store opened on a schema behind")
    message = str(refused.value)
    assert f"revision {revision} " in message
    assert f"needs {head()}" in message
    assert "`chatsrv db upgrade`" in message
    assert await snapshot(url) == before  # not even stamped


async def test_a_schema_from_a_newer_chatsrv_is_refused_even_with_upgrade(
    new_database: Callable[[], str],
) -> None:
    url = new_database()
    async with Store.open(url) as store:
        await execute(store, "UPDATE alembic_version SET version_num = 'ffff'")
        assert await store.schema_revision() == "ffff"
    before = await snapshot(url)
    for upgrade in (True, False):
        with trio.fail_after(30), pytest.raises(SchemaMismatch) as refused:
            async with Store.open(url, upgrade=upgrade):
                pytest.fail("the store opened on a newer schema")
        message = str(refused.value)
        assert "revision ffff" in message
        assert "newer chatsrv" in message
        assert await snapshot(url) == before

    async with Store.open(url, init_schema=False) as store:
        with trio.fail_after(30), pytest.raises(SchemaMismatch, match="newer chatsrv"):
            await store.upgrade_schema()  # as `chatsrv db upgrade` does
    assert await snapshot(url) == before


async def test_tables_made_without_the_migrations_are_refused_unchanged(
    new_database: Callable[[], str],
) -> None:
    url = new_database()
    await apply(url, schema_path().read_text("utf-8"))
    before = await snapshot(url)
    for upgrade in (True, False):
        with trio.fail_after(30), pytest.raises(SchemaMismatch, match="no migration version"):
            async with Store.open(url, upgrade=upgrade):
                pytest.fail("the store opened on tables it cannot place")
    assert await snapshot(url) == before


# -- Workers starting at once ---------------------------------------------------------------


def hold_schema_lock(url: str, held: threading.Event, release: threading.Event) -> None:
    """Take the lock chatsrv's migrations take on ``url`` (SQLite's write lock, PostgreSQL's
    advisory lock), set ``held``, and keep it until ``release``."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        conn = sqlite3.connect(str(parsed.database), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            held.set()
            release.wait()
            conn.execute("COMMIT")
        finally:
            conn.close()
        return

    async def main() -> None:
        conn = await asyncpg.connect(plain_url(url), timeout=10)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", _SCHEMA_LOCK_KEY)
            held.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait)
        finally:
            await conn.close()  # and the lock is released

    asyncio.run(main())


async def test_stores_opening_an_empty_database_at_once_migrate_it_once(
    new_database: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatsrv.store._migrate")
    url = new_database()
    database = make_url(url).database
    token = trio.lowlevel.current_trio_token()
    held, release = threading.Event(), threading.Event()
    both_wait_for_the_lock, both_open = trio.Event(), trio.Event()
    waiting: list[str] = []
    guard = threading.Lock()

    def seen(conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        # Each store's first statement that waits for the lock: its reading of the version.
        if conn.engine.url.database == database and (
            statement.startswith("BEGIN IMMEDIATE") or "pg_advisory_xact_lock" in statement
        ):
            with guard:
                waiting.append(statement)
                if len(waiting) == 2:
                    token.run_sync_soon(both_wait_for_the_lock.set)

    revisions: list[str | None] = []

    async def worker() -> None:
        async with Store.open(url) as store:
            revisions.append(await store.schema_revision())
            if len(revisions) == 2:
                both_open.set()
            await both_open.wait()  # both are open at once before either closes

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                try:
                    nursery.start_soon(
                        trio.to_thread.run_sync, hold_schema_lock, url, held, release
                    )
                    await trio.to_thread.run_sync(held.wait, abandon_on_cancel=True)
                    nursery.start_soon(worker)
                    nursery.start_soon(worker)
                    await both_wait_for_the_lock.wait()
                finally:
                    release.set()
    finally:
        event.remove(Engine, "before_cursor_execute", seen)

    assert revisions == [head(), head()]
    applied = [r.getMessage() for r in caplog.records if r.getMessage().startswith("applied")]
    assert applied == [f"applied migration {step}" for step in ("0001", "0002", "0003", "0004")]
    async with Store.open(url, init_schema=False) as store:
        [users] = await execute(store, "SELECT CAST(id AS TEXT) AS id, name FROM users")
        assert users == [{"id": LOCAL_USER_ID, "name": "local"}]
        assert await execute(store, "SELECT * FROM alembic_version") == [[{"version_num": head()}]]


@pytest.mark.parametrize(("schema", "revision", "data"), UNVERSIONED)
async def test_turns_run_on_an_upgraded_database(
    new_database: Callable[[], str], schema: Path, revision: str, data: list[str]
) -> None:
    url = await unversioned_database(new_database, schema, data)
    with trio.fail_after(30):
        async with Store.open(url, upgrade=True) as store:
            before = await store.list_messages(C1, user=LOCAL_USER_ID)
            assert before is not None
            begun = await store.begin_turn(
                C1,
                user=LOCAL_USER_ID,
                content="after the upgrade",
                model=None,
                default_model="m",
                owner="upgraded",
                lease_s=30,
                max_streams=10,
            )
            assert begun is not None
            # The prompt is the conversation as it was before the upgrade, then the new message.
            history = [m["content"] for m in before if m["content"]]
            assert [m["content"] for m in begun.history][-len(history) - 1 :] == [
                *history,
                "after the upgrade",
            ]
            assert await store.finish_reply(
                begun.assistant_message["id"], content="done", status="complete", stop_reason="stop"
            )
            after = await store.list_messages(C1, user=LOCAL_USER_ID)
            assert after is not None
            assert after[: len(before)] == before
            assert [m["content"] for m in after[len(before) :]] == ["after the upgrade", "done"]
            # A key made now reaches nothing of the local user's.
            _, key = await store.create_key("alice")
            alice = await store.key_user(key)
            assert alice is not None and alice != LOCAL_USER_ID
            assert await store.get_conversation(C1, user=alice) is None


async def test_a_database_at_head_opens_while_another_process_holds_the_schema_lock(
    new_database: Callable[[], str],
) -> None:
    """Only an upgrade takes the lock: a start on a database at head reads its version and goes
    on, however long a writer (on SQLite, any writer) holds it."""
    url = new_database()
    async with Store.open(url):
        pass
    held, release = threading.Event(), threading.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, hold_schema_lock, url, held, release)
            try:
                await trio.to_thread.run_sync(held.wait, abandon_on_cancel=True)
                with trio.fail_after(2):  # the lock's holder keeps it past this
                    async with Store.open(url, timeout_s=5) as store:
                        assert await store.schema_revision() == head()
            finally:
                release.set()
