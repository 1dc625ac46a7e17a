"""Connecting to PostgreSQL or SQLite: the async engine, what each database needs on every
connection, and which driver failures are worth a retry.

Only the store imports this module; :func:`map_error` is its error boundary, turning every
driver exception into :class:`~chatsrv._errors.StoreUnavailable` (transient: the connection was
lost or refused, the database was locked, busy or did not answer in time) or
:class:`~chatsrv._errors.StoreError` (anything else).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Final

import asyncpg
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chatsrv._errors import StoreError, StoreUnavailable

# -- Engine -----------------------------------------------------------------------------------


def create_engine(
    url: str, *, pool_size: int, timeout_s: float, foreign_keys: bool = True
) -> AsyncEngine:
    """The async engine for ``url`` (plain postgresql:// and sqlite:// get the async driver).

    ``foreign_keys=False`` is for migrations on SQLite, whose procedure for changing a table
    needs foreign keys off; PostgreSQL always checks them.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    # max_overflow=0: pool_size is a hard cap on connections.
    pool: dict[str, Any] = {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": timeout_s}
    if backend == "postgresql":
        engine = create_async_engine(
            parsed.set(drivername="postgresql+asyncpg"),
            **pool,
            connect_args={
                "timeout": timeout_s,
                "command_timeout": timeout_s,
                "server_settings": {"application_name": "chatsrv"},
            },
        )
    elif backend == "sqlite":
        engine = create_async_engine(parsed.set(drivername="sqlite+aiosqlite"), **pool)
        configure_sqlite(engine, busy_timeout_ms=round(timeout_s * 1000), foreign_keys=foreign_keys)
    else:
        raise ValueError(f"unsupported database URL {parsed!r}: use postgresql:// or sqlite://")
    ping_when_idle(engine, idle_s=PING_AFTER_IDLE_S)
    return engine


# A connection back in use within this many seconds is not pinged at checkout.
PING_AFTER_IDLE_S: Final = 1.0


def ping_when_idle(engine: AsyncEngine, *, idle_s: float) -> None:
    """Ping a connection at checkout only if it sat idle in the pool for ``idle_s`` or more.

    This replaces ``pool_pre_ping``, which pings at every checkout: one more round trip (and,
    logged, a BEGIN and a ROLLBACK) for each of a turn's writes. A connection
    the server dropped while idle is still replaced before it fails a write; one dropped while
    in steady use fails its next statement, which SQLAlchemy answers by discarding the whole
    pool, and which the store reports as :class:`StoreUnavailable` for its callers to retry.
    """

    @event.listens_for(engine.sync_engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["chatsrv_idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("chatsrv_idle_since")
        if idle_since is None or time.monotonic() - idle_since < idle_s:
            return  # new, or in steady use
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            if engine.dialect.is_disconnect(error, dbapi_connection, None):
                # SQLAlchemy's documented way to say "replace this one": the pool retries.
                raise exc.DisconnectionError(str(error)) from error
            raise


def configure_sqlite(engine: AsyncEngine, *, busy_timeout_ms: int, foreign_keys: bool) -> None:
    """WAL, a busy timeout and foreign keys on every connection; SQLAlchemy emits BEGIN."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own transaction handling would not BEGIN before a SELECT, so a read and
        # the write after it would not be one transaction: take BEGIN over (SQLAlchemy's recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        # A background task's transaction waits less for a lock (chatsrv_busy_ms): SQLite's
        # wait cannot be interrupted, so a task cancelled during it (at shutdown) would hold
        # the pool's close for the whole busy timeout. Set only when it changes.
        busy_ms = int(options.get("chatsrv_busy_ms", busy_timeout_ms))
        info = conn.connection.info
        if info.get("chatsrv_busy_ms", busy_timeout_ms) != busy_ms:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={busy_ms}")
            info["chatsrv_busy_ms"] = busy_ms
        # Writers BEGIN IMMEDIATE: they wait (busy_timeout) for the write lock up front instead
        # of failing at once when a read transaction cannot be upgraded. Readers stay deferred.
        conn.exec_driver_sql(f"BEGIN {options.get('chatsrv_begin', 'DEFERRED')}")


# -- Errors -----------------------------------------------------------------------------------

_SQLITE_TRANSIENT: Final = ("locked", "busy", "unable to open", "disk i/o")


def map_error(error: Exception) -> StoreError:
    """The chatsrv error for a driver exception: :class:`StoreUnavailable` if transient."""
    cause = error.orig if isinstance(error, exc.DBAPIError) else error
    detail = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    if _is_transient(error):
        return StoreUnavailable(f"the database is unavailable ({detail})")
    return StoreError(f"the database failed ({detail})")


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, OSError | TimeoutError | exc.TimeoutError):
        return True  # OSError includes ConnectionError; asyncio.TimeoutError is TimeoutError
    if isinstance(error, asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
        return True
    if isinstance(error, asyncpg.PostgresError):
        # Connection (08), resources such as too many connections (53), operator intervention:
        # terminated, shutting down, statement timeout (57), serialization or deadlock (40).
        return str(error.sqlstate)[:2] in {"08", "40", "53", "57"}
    if isinstance(error, sqlite3.OperationalError):
        return any(word in str(error).lower() for word in _SQLITE_TRANSIENT)
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        orig, driver_error = error.orig, (error.orig.__cause__ if error.orig else None)
        if isinstance(orig, sqlite3.Error) or isinstance(driver_error, sqlite3.Error):
            # "no such table" and syntax errors are OperationalError too: only locks are transient.
            sqlite_error = orig if isinstance(orig, sqlite3.Error) else driver_error
            return isinstance(sqlite_error, sqlite3.OperationalError) and _is_transient(
                sqlite_error
            )
        if isinstance(error, exc.InterfaceError | exc.OperationalError):
            return True
        return driver_error is not None and _is_transient(driver_error)
    return False
