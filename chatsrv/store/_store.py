"""The store: conversations and messages in PostgreSQL or SQLite, behind a Trio-facing API.

The ``Store`` class is the layer's one door: the asyncio loop the engine runs on (an
:class:`~chatsrv.store._aio.AsyncioThread`), the schema's application, and the error boundary:
every driver exception leaves as :class:`~chatsrv._errors.StoreError`, or as
:class:`~chatsrv._errors.StoreUnavailable` when a retry may succeed (``_database.py`` maps them and
builds the engine). The statements themselves are built in ``_statements.py``, a turn's
starting transactions run in ``_starts.py``, and the notifications between processes are
``_bus.py``'s (``Store.bus``).

Every public method is one hop to the asyncio loop running one coroutine, which checks one
connection out of the pool and runs one short transaction: no connection is held across calls,
so thousands of turns share a pool of about ten. Ids are canonical UUID strings; an id that is
not a UUID finds nothing. Timestamps are set here, strictly increasing within the process, and
returned as ISO 8601 UTC strings; messages are ordered by ``(created_at, id)``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import timedelta
from typing import Any, Final, TypeVar

import trio
from sqlalchemy import Executable, RowMapping, insert, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from chatsrv._errors import StoreError

from . import _statements as sql
from ._aio import AsyncioThread, BridgeClosed, open_asyncio_thread
from ._bus import Bus
from ._database import create_engine, map_error
from ._records import (
    CLOCK,
    Conversation,
    Message,
    NewTurn,
    RunningReply,
    TurnStart,
    conversation_record,
    message_record,
    parse_id,
    running_record,
)
from ._starts import Starts, select_conversation
from ._tables import MESSAGE_STATUSES, TABLE_NAMES, conversations
from ._tables import schema_statements as _schema_statements

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The key of the transaction-scoped advisory lock that serialises schema application between
# workers starting at once on PostgreSQL (any constant int64: "chatsrv1" in ASCII).
_SCHEMA_LOCK_KEY: Final = 0x6368617473727631


# Rows per lease-renewing UPDATE (a bound on the statement's parameters).
_LEASE_BATCH: Final = 500


class Store:
    """The database, for Trio code. Build it with :meth:`open`."""

    def __init__(self, bridge: AsyncioThread, engine: AsyncEngine, *, timeout_s: float) -> None:
        self._bridge = bridge
        self._engine = engine
        self._postgresql = engine.dialect.name == "postgresql"
        # Notifications between processes: PostgreSQL's LISTEN/NOTIFY; SQLite has none.
        self.bus = (
            Bus(bridge, engine, timeout_s=timeout_s, call=self._call) if self._postgresql else None
        )
        # Writes take SQLite's write lock at BEGIN (_database.configure_sqlite); no-op on PG.
        self._writer = engine.execution_options(chatsrv_begin="IMMEDIATE")
        # A write that is one statement is atomic by itself: on PostgreSQL it runs without
        # BEGIN and COMMIT, two round trips fewer (a turn's start, checkpoints and final commit).
        self._one_statement = (
            engine.execution_options(isolation_level="AUTOCOMMIT")
            if self._postgresql
            else self._writer
        )
        self._starts = Starts(engine, one_statement=self._one_statement, writer=self._writer)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = 10,
        timeout_s: float = 10.0,
        init_schema: bool = True,
    ) -> AsyncIterator[Store]:
        """Start the asyncio thread and the engine, apply the schema if it is missing, and close
        everything (shielded, bounded by ``timeout_s``) when the block exits."""
        async with open_asyncio_thread(close_timeout_s=timeout_s) as bridge:
            engine = create_engine(url, pool_size=pool_size, timeout_s=timeout_s)
            store = cls(bridge, engine, timeout_s=timeout_s)
            try:
                if init_schema:
                    await store.init_schema()
                yield store
            finally:
                # Shielded: the pool's connections must be closed on their loop before it stops.
                with trio.move_on_after(timeout_s, shield=True) as scope:
                    try:
                        if store.bus is not None:
                            await bridge.run(store.bus.aclose())
                        await bridge.run(store._engine.dispose())
                    except Exception:
                        logger.exception("disposing of the database engine failed")
                if scope.cancelled_caught:
                    logger.warning("disposing of the database engine took over %.1f s", timeout_s)

    async def init_schema(self) -> bool:
        """Apply ``schema.sql`` if a table is missing; return whether it was applied."""
        return await self._call(self._init_schema(_schema_statements()))

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers ``SELECT 1``."""
        await self._call(self._ping())

    async def create_conversation(
        self, *, title: str | None, model: str | None, system: str | None
    ) -> Conversation:
        return await self._call(self._create_conversation(title, model, system))

    async def list_conversations(self, *, limit: int = 100) -> list[Conversation]:
        """The newest ``limit`` conversations, newest first."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        rows = await self._call(self._read(lambda: sql.newest_conversations(limit)))
        return [conversation_record(row) for row in rows]

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        return await self._by_id(conversation_id, self._get_conversation, None)

    async def delete_conversation(self, conversation_id: str) -> bool:
        """Delete a conversation and (by cascade) its messages; return whether it existed."""

        def delete(cid: str) -> Coroutine[Any, Any, int]:
            return self._write(lambda: sql.delete_conversation(cid))

        return await self._by_id(conversation_id, delete, 0) > 0

    async def list_messages(self, conversation_id: str) -> list[Message] | None:
        """A conversation's messages in creation order; None if the conversation does not exist."""
        return await self._by_id(conversation_id, self._list_messages, None)

    async def get_message(self, message_id: str) -> Message | None:
        return await self._by_id(message_id, self._get_message, None)

    async def begin_turn(
        self,
        conversation_id: str,
        *,
        content: str,
        model: str | None,
        default_model: str,
        owner: str,
        lease_s: float,
        idempotency_key: str | None = None,
    ) -> TurnStart | None:
        """In one transaction: read the history and insert the user message ('complete') and the
        assistant message ('streaming', empty, owned by ``owner`` for ``lease_s``). None, and
        nothing written, if the conversation does not exist. The reply's model is ``model``, else
        the conversation's, else ``default_model``; the assistant message records it.

        With an ``idempotency_key`` that already names a turn of this conversation (concurrent
        requests included), nothing is written and that turn is returned with ``existing``.
        """

        def begin(cid: str) -> Coroutine[Any, Any, TurnStart | None]:
            return self._starts.begin_turn(
                NewTurn(cid, content, model, default_model, owner, lease_s, idempotency_key)
            )

        return await self._by_id(conversation_id, begin, None)

    async def begin_continuation(
        self, message_id: str, *, owner: str, lease_s: float
    ) -> TurnStart | Message | None:
        """In one transaction: put an assistant message that ended early (``CONTINUABLE``) back to
        'streaming', owned by ``owner`` for ``lease_s``, and read the prompt that continues it:
        the conversation up to the message, the message excluded. The TurnStart's assistant
        message holds the content so far. A message that cannot be continued is returned as it
        is (nothing written); None if there is no such message."""
        return await self._by_id(
            message_id, lambda mid: self._starts.begin_continuation(mid, owner, lease_s), None
        )

    async def checkpoint(
        self, message_id: str, *, content: str, owner: str, lease_s: float
    ) -> bool:
        """Save a streaming reply's content so far and renew its lease, in one UPDATE that only
        touches a row still 'streaming' and still ours (a final commit is never overwritten)."""

        def checkpoint(mid: str) -> Coroutine[Any, Any, int]:
            return self._write(lambda: sql.checkpoint(mid, content, owner, lease_s, CLOCK.now()))

        return await self._by_id(message_id, checkpoint, 0) > 0

    async def renew_leases(self, owner: str, message_ids: list[str], *, lease_s: float) -> int:
        """Extend the lease of the rows ``owner`` is streaming now; return how many.

        Only the ids given: a row whose turn never started (its insert outlived a timeout)
        must be left to expire and be swept.
        """
        ids = [mid for mid in map(parse_id, message_ids) if mid is not None]
        if not ids:
            await trio.lowlevel.checkpoint()
            return 0
        return await self._call(self._renew_leases(owner, ids, lease_s))

    async def sweep(self, sweeper: str) -> int:
        """Mark streaming rows of other processes whose lease expired (their process died)
        'interrupted' with stop_reason 'server_crash', keeping their checkpointed content.
        Return how many replies were swept."""
        return await self._call(self._write(lambda: sql.sweep(sweeper, CLOCK.now())))

    async def running_replies(self) -> list[RunningReply]:
        """The replies streamed now by live processes (whose lease runs), oldest first."""
        rows = await self._call(self._read(lambda: sql.streaming_replies(CLOCK.now())))
        return [running_record(row) for row in rows]

    async def request_cancel(self, message_id: str) -> Message | None:
        """Mark a streaming reply for its owner to cancel (see ``cancel_requests``); return
        the message as it is then, or None if there is no such message."""
        return await self._by_id(message_id, self._request_cancel, None)

    async def cancel_requests(self, owner: str) -> list[str]:
        """The ids of ``owner``'s streaming replies that a client asked to cancel."""
        rows = await self._call(self._read(lambda: sql.cancel_requests(owner)))
        return [str(row["id"]) for row in rows]

    async def forget_idempotency_keys(self) -> None:
        """Forget the Idempotency-Keys older than 24 h."""
        await self._call(self._write(lambda: sql.forget_keys(CLOCK.now())))

    async def finish_reply(
        self,
        message_id: str,
        *,
        content: str,
        status: str,
        stop_reason: str | None,
        error: str | None = None,
        usage: dict[str, Any] | None = None,
    ) -> bool:
        """Set an assistant message's final values in one UPDATE; return whether it existed.

        Idempotent: a retry after :class:`StoreUnavailable` updates the same row again.
        """
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"unknown message status {status!r}")
        values = {
            "content": content,
            "status": status,
            "stop_reason": stop_reason,
            "error": error,
            "usage": usage,
            "owner": None,
            "lease_expires_at": None,
        }

        def finish(mid: str) -> Coroutine[Any, Any, int]:
            return self._write(lambda: sql.finish_reply(mid, values, CLOCK.now()))

        return await self._by_id(message_id, finish, 0) > 0

    # -- The bridge and the error boundary ------------------------------------------------------

    async def _by_id(
        self, value: str, run: Callable[[str], Coroutine[Any, Any, T]], missing: T
    ) -> T:
        """``run(id)`` on the loop, or ``missing`` without a query if ``value`` is no UUID."""
        parsed = parse_id(value)
        if parsed is None:
            await trio.lowlevel.checkpoint()
            return missing
        return await self._call(run(parsed))

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one coroutine on the loop: the one hop of a public method."""
        try:
            return await self._bridge.run(coro)
        except BridgeClosed as error:
            raise StoreError("the store is closed") from error
        except Exception as error:
            raise map_error(error) from error

    # -- On the asyncio loop: one checkout, one transaction each ---------------------------------

    async def _init_schema(self, statements: list[str]) -> bool:
        async with self._writer.begin() as conn:
            if self._postgresql:
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY}
                )
            if await conn.run_sync(_has_tables):
                return False
            for statement in statements:
                await conn.exec_driver_sql(statement)
        logger.info("applied the database schema")
        return True

    async def _ping(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def _create_conversation(
        self, title: str | None, model: str | None, system: str | None
    ) -> Conversation:
        row = {
            "id": str(uuid.uuid4()),
            "title": title,
            "model": model,
            "system_prompt": system,
            "created_at": CLOCK.now(),
        }
        async with self._one_statement.begin() as conn:
            await conn.execute(insert(conversations), row)
        return conversation_record(row)

    # The statement is built here, on the loop's thread, like every statement: the Trio thread,
    # which relays every token, pays only for the hop (building an UPDATE costs 0.1 to 0.2 ms).

    async def _read(self, build: Callable[[], Executable]) -> list[RowMapping]:
        async with self._engine.begin() as conn:
            return list((await conn.execute(build())).mappings())

    async def _write(self, build: Callable[[], Executable]) -> int:
        """Run one statement that writes; how many rows it changed."""
        async with self._one_statement.begin() as conn:
            return (await conn.execute(build())).rowcount

    async def _get_conversation(self, cid: str) -> Conversation | None:
        async with self._engine.begin() as conn:
            row = await select_conversation(conn, cid)
        return None if row is None else conversation_record(row)

    async def _get_message(self, mid: str) -> Message | None:
        rows = await self._read(lambda: sql.message(mid))
        return message_record(rows[0]) if rows else None

    async def _list_messages(self, cid: str) -> list[Message] | None:
        async with self._engine.begin() as conn:
            if await select_conversation(conn, cid) is None:
                return None
            rows = await conn.execute(sql.messages_of(cid))
            return [message_record(row) for row in rows.mappings()]

    async def _renew_leases(self, owner: str, ids: list[str], lease_s: float) -> int:
        expires = CLOCK.now() + timedelta(seconds=lease_s)
        renewed = 0
        async with self._writer.begin() as conn:
            for start in range(0, len(ids), _LEASE_BATCH):
                batch = ids[start : start + _LEASE_BATCH]
                renewed += (await conn.execute(sql.renew_leases(owner, batch, expires))).rowcount
        return renewed

    async def _request_cancel(self, mid: str) -> Message | None:
        async with self._writer.begin() as conn:
            await conn.execute(sql.request_cancel(mid))
            row = (await conn.execute(sql.message(mid))).first()
        return None if row is None else message_record(row._mapping)


def _has_tables(conn: Connection) -> bool:
    inspector = inspect(conn)
    return all(inspector.has_table(name) for name in TABLE_NAMES)
