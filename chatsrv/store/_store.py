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
from functools import partial
from typing import Any, Final, TypeVar

import trio
from sqlalchemy import Executable, RowMapping, insert, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from chatsrv._errors import ChatsrvError, SchemaMismatch, StoreError

from . import _keys, _migrate
from . import _statements as sql
from ._aio import AsyncioThread, BridgeClosed, open_asyncio_thread
from ._bus import Bus
from ._database import create_engine, map_error
from ._records import (
    CLOCK,
    ApiKey,
    Conversation,
    Message,
    NewTurn,
    RunningReply,
    TurnStart,
    conversation_record,
    key_record,
    message_record,
    parse_id,
    running_record,
)
from ._starts import Starts, select_conversation
from ._tables import MESSAGE_STATUSES, api_keys, conversations, users

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The key of the transaction-scoped advisory lock that serialises migrations between
# workers starting at once on PostgreSQL (any constant int64: "chatsrv1" in ASCII).
_SCHEMA_LOCK_KEY: Final = 0x6368617473727631


# How long a background task's write waits for SQLite's write lock (see Store._background).
BACKGROUND_BUSY_MS: Final = 500

# Rows per lease-renewing UPDATE (a bound on the statement's parameters).
_LEASE_BATCH: Final = 500


class Store:
    """The database, for Trio code. Build it with :meth:`open`."""

    def __init__(
        self, bridge: AsyncioThread, engine: AsyncEngine, *, timeout_s: float, url: str
    ) -> None:
        self._bridge = bridge
        self._engine = engine
        self._url = url
        self._timeout_s = timeout_s
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
        # The writes of background tasks (recovery, lease renewal) wait for SQLite's write lock
        # at most BACKGROUND_BUSY_MS: cancelled at shutdown, they do not hold up the close.
        # They fail as StoreUnavailable instead, and their task tries again next round.
        self._background = self._one_statement.execution_options(chatsrv_busy_ms=BACKGROUND_BUSY_MS)
        self._background_writer = self._writer.execution_options(chatsrv_busy_ms=BACKGROUND_BUSY_MS)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = 10,
        timeout_s: float = 10.0,
        init_schema: bool = True,
        upgrade: bool = True,
    ) -> AsyncIterator[Store]:
        """Start the asyncio thread and the engine, make the schema if the database is empty,
        and close everything (shielded, bounded by ``timeout_s``) when the block exits.

        A database whose schema is behind is upgraded if ``upgrade``, else refused with
        :class:`SchemaMismatch` (as is one made by a newer chatsrv); ``init_schema=False``
        looks at nothing.
        """
        async with open_asyncio_thread(close_timeout_s=timeout_s) as bridge:
            engine = create_engine(url, pool_size=pool_size, timeout_s=timeout_s)
            store = cls(bridge, engine, timeout_s=timeout_s, url=url)
            try:
                if init_schema:
                    await store._prepare_schema(upgrade=upgrade)
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

    async def schema_revision(self) -> str | None:
        """The migration the database is at (None: it is empty)."""
        return (await self._call(self._version())).revision

    async def identity(self) -> str:
        """The database's own id (made by its migrations), whatever URL reaches it."""
        rows = await self._call(self._read(lambda: text("SELECT id FROM database_identity")))
        if len(rows) != 1:
            raise StoreError(f"the database has {len(rows)} identities, not one")
        return str(rows[0]["id"])

    async def upgrade_schema(self) -> list[str]:
        """Apply the migrations the database lacks; return their revisions, oldest first."""
        return await self._call(self._migrating(_migrate.upgrade))

    async def _prepare_schema(self, *, upgrade: bool) -> None:
        # Read without a lock: a database at head (every start but the first after an
        # upgrade) costs one read, and waits for no writer. The upgrade reads it again, locked.
        version = await self._call(self._version())
        if version.current:
            return
        behind = version.known and not version.empty
        if behind and not upgrade:
            raise SchemaMismatch(
                f"the database's schema is at revision {version.revision} and this chatsrv "
                f"needs {_migrate.head()}: run `chatsrv db upgrade` (or set "
                "CHATSRV_DB_AUTO_UPGRADE=1)"
            )
        await self.upgrade_schema()  # which refuses a schema newer than ours

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers ``SELECT 1``."""
        await self._call(self._ping())

    async def create_conversation(
        self, *, user: str, title: str | None, model: str | None, system: str | None
    ) -> Conversation:
        return await self._call(self._create_conversation(user, title, model, system))

    async def list_conversations(self, *, user: str, limit: int = 100) -> list[Conversation]:
        """The user's newest ``limit`` conversations, newest first."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        rows = await self._call(self._read(lambda: sql.newest_conversations(user, limit)))
        return [conversation_record(row) for row in rows]

    async def get_conversation(self, conversation_id: str, *, user: str) -> Conversation | None:
        return await self._by_id(conversation_id, partial(self._get_conversation, user=user), None)

    async def delete_conversation(self, conversation_id: str, *, user: str) -> bool:
        """Delete a conversation and (by cascade) its messages; return whether it existed."""

        def delete(cid: str) -> Coroutine[Any, Any, int]:
            return self._write(lambda: sql.delete_conversation(cid, user))

        return await self._by_id(conversation_id, delete, 0) > 0

    async def list_messages(self, conversation_id: str, *, user: str) -> list[Message] | None:
        """A conversation's messages in creation order; None if the conversation does not exist."""
        return await self._by_id(conversation_id, partial(self._list_messages, user=user), None)

    async def get_message(self, message_id: str, *, user: str | None) -> Message | None:
        """The message, if it is in one of ``user``'s conversations (``None``: anyone's)."""
        return await self._by_id(message_id, partial(self._get_message, user=user), None)

    async def begin_turn(
        self,
        conversation_id: str,
        *,
        user: str,
        content: str,
        model: str | None,
        default_model: str,
        owner: str,
        lease_s: float,
        max_streams: int,
        idempotency_key: str | None = None,
    ) -> TurnStart | None:
        """In one transaction: read the history and insert the user message ('complete') and the
        assistant message ('streaming', empty, owned by ``owner`` for ``lease_s``). None, and
        nothing written, if the conversation does not exist or is not ``user``'s. The reply's
        model is ``model``, else the conversation's, else ``default_model``; the assistant
        message records it. :class:`TooManyStreams`, nothing written, if ``user`` streams
        ``max_streams`` replies already.

        With an ``idempotency_key`` that already names a turn of this conversation (concurrent
        requests included), nothing is written and that turn is returned with ``existing``.
        """
        turn = partial(
            NewTurn,
            user=user,
            content=content,
            model=model,
            default_model=default_model,
            owner=owner,
            lease_s=lease_s,
            idempotency_key=idempotency_key,
            max_streams=max_streams,
        )

        def begin(cid: str) -> Coroutine[Any, Any, TurnStart | None]:
            return self._starts.begin_turn(turn(cid))

        return await self._by_id(conversation_id, begin, None)

    async def begin_continuation(
        self, message_id: str, *, user: str, owner: str, lease_s: float, max_streams: int
    ) -> TurnStart | Message | None:
        """In one transaction: put an assistant message that ended early (``CONTINUABLE``) back to
        'streaming', owned by ``owner`` for ``lease_s``, and read the prompt that continues it:
        the conversation up to the message, the message excluded. The TurnStart's assistant
        message holds the content so far. A message that cannot be continued is returned as it
        is (nothing written); None if there is no such message of ``user``'s; and
        :class:`TooManyStreams` as for :meth:`begin_turn`."""

        def begin(mid: str) -> Coroutine[Any, Any, TurnStart | Message | None]:
            return self._starts.begin_continuation(mid, user, owner, lease_s, max_streams)

        return await self._by_id(message_id, begin, None)

    # -- Users and their API keys ---------------------------------------------------------------

    async def create_key(self, user_name: str) -> tuple[ApiKey, str]:
        """A new API key for the user ``user_name`` (made if new): its record, and the key
        itself, which is not stored (only its digest; see ``_keys``) and cannot be shown again."""
        return await self._call(self._create_key(user_name))

    async def list_keys(self) -> list[ApiKey]:
        """Every API key, revoked ones included, oldest first."""
        return [key_record(row) for row in await self._call(self._read(sql.all_keys))]

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke a key from now on; return whether it existed and was not revoked already."""
        return await self._call(self._write(lambda: sql.revoke_key(key_id, CLOCK.now()))) > 0

    async def key_user(self, key: str) -> str | None:
        """The id of the user whose key this is, or None if it is unknown or revoked."""
        rows = await self._call(self._read(lambda: sql.key_owner(_keys.digest(key))))
        return str(rows[0]["user_id"]) if rows else None

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

    async def sweep(self, sweeper: str, *, keep: list[str] | None = None) -> int:
        """Mark streaming rows of other processes whose lease expired (their process died)
        'interrupted' with stop_reason 'server_crash', keeping their checkpointed content; with
        ``keep``, also the sweeper's own expired rows that it does not name (rows whose start
        outlived its bound: no turn streams them). Return how many replies were swept."""
        ids = None if keep is None else [mid for mid in map(parse_id, keep) if mid is not None]
        return await self._call(
            self._write(lambda: sql.sweep(sweeper, CLOCK.now(), ids), background=True)
        )

    async def abandon(self, message_id: str, *, owner: str) -> bool:
        """End a streaming reply of ``owner``'s that no turn streams, as a crash would have
        ended it (interrupted/server_crash); return whether there was one."""

        def abandon(mid: str) -> Coroutine[Any, Any, int]:
            return self._write(lambda: sql.abandon(mid, owner, CLOCK.now()))

        return await self._by_id(message_id, abandon, 0) > 0

    async def running_replies(self, *, user: str) -> list[RunningReply]:
        """The user's replies streamed now by live processes (whose lease runs), oldest first."""
        rows = await self._call(self._read(lambda: sql.streaming_replies(user, CLOCK.now())))
        return [running_record(row) for row in rows]

    async def request_cancel(self, message_id: str, *, user: str) -> Message | None:
        """Mark a streaming reply for its owner to cancel (see ``cancel_requests``); return
        the message as it is then, or None if there is no such message of ``user``'s."""
        return await self._by_id(message_id, partial(self._request_cancel, user=user), None)

    async def cancel_requests(self, owner: str) -> list[str]:
        """The ids of ``owner``'s streaming replies that a client asked to cancel."""
        rows = await self._call(self._read(lambda: sql.cancel_requests(owner)))
        return [str(row["id"]) for row in rows]

    async def forget_idempotency_keys(self) -> None:
        """Forget the Idempotency-Keys older than 24 h."""
        await self._call(self._write(lambda: sql.forget_keys(CLOCK.now()), background=True))

    async def finish_reply(
        self,
        message_id: str,
        *,
        content: str,
        status: str,
        stop_reason: str | None,
        error: str | None = None,
        usage: dict[str, Any] | None = None,
        background: bool = False,
    ) -> bool:
        """Set an assistant message's final values in one UPDATE; return whether it existed.

        Idempotent: a retry after :class:`StoreUnavailable` updates the same row again.
        ``background``: for the journal's replayer, which waits less for SQLite's lock.
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
            return self._write(
                lambda: sql.finish_reply(mid, values, CLOCK.now()), background=background
            )

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
        except ChatsrvError:  # raised on purpose (TooManyStreams)
            raise
        except Exception as error:
            raise map_error(error) from error

    # -- On the asyncio loop: one checkout, one transaction each ---------------------------------

    async def _version(self) -> _migrate.Version:
        async with self._engine.connect() as conn:
            return await conn.run_sync(_migrate.version)

    async def _migrating(self, run: Callable[[Connection], T]) -> T:
        """``run`` on a connection of its own, in one transaction that holds off any other
        process doing the same. On SQLite its foreign keys are off (see ``_migrate``)."""
        engine = create_engine(
            self._url, pool_size=1, timeout_s=self._timeout_s, foreign_keys=False
        )
        try:
            async with engine.execution_options(chatsrv_begin="IMMEDIATE").begin() as conn:
                if self._postgresql:
                    await conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY}
                    )
                return await conn.run_sync(run)
        finally:
            await engine.dispose()

    async def _ping(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def _create_conversation(
        self, user: str, title: str | None, model: str | None, system: str | None
    ) -> Conversation:
        row = {
            "id": str(uuid.uuid4()),
            "user_id": user,
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

    async def _write(
        self,
        build: Callable[[], Executable | tuple[Executable, dict[str, Any]]],
        *,
        background: bool = False,
    ) -> int:
        """Run one statement that writes (with its parameters, if ``build`` gives them); how
        many rows it changed."""
        engine = self._background if background else self._one_statement
        built = build()
        statement, parameters = built if isinstance(built, tuple) else (built, None)
        async with engine.begin() as conn:
            return (await conn.execute(statement, parameters)).rowcount

    async def _get_conversation(self, cid: str, *, user: str) -> Conversation | None:
        async with self._engine.begin() as conn:
            row = await select_conversation(conn, cid, user)
        return None if row is None else conversation_record(row)

    async def _get_message(self, mid: str, *, user: str | None) -> Message | None:
        rows = await self._read(lambda: sql.message(mid, user))
        return message_record(rows[0]) if rows else None

    async def _list_messages(self, cid: str, *, user: str) -> list[Message] | None:
        async with self._engine.begin() as conn:
            if await select_conversation(conn, cid, user) is None:
                return None
            rows = await conn.execute(sql.messages_of(cid))
            return [message_record(row) for row in rows.mappings()]

    async def _create_key(self, user_name: str) -> tuple[ApiKey, str]:
        key_id, key = _keys.new_key()
        async with self._writer.begin() as conn:
            user = (await conn.execute(sql.user_named(user_name))).first()
            if user is None:
                user_id = str(uuid.uuid4())
                await conn.execute(
                    insert(users), {"id": user_id, "name": user_name, "created_at": CLOCK.now()}
                )
            else:
                user_id = str(user._mapping["id"])
            row = {
                "id": key_id,
                "user_id": user_id,
                "digest": _keys.digest(key),
                "created_at": CLOCK.now(),
                "revoked_at": None,
            }
            await conn.execute(insert(api_keys), row)
        return key_record({**row, "name": user_name}), key

    async def _renew_leases(self, owner: str, ids: list[str], lease_s: float) -> int:
        expires = CLOCK.now() + timedelta(seconds=lease_s)
        renewed = 0
        async with self._background_writer.begin() as conn:
            for start in range(0, len(ids), _LEASE_BATCH):
                batch = ids[start : start + _LEASE_BATCH]
                renewed += (await conn.execute(sql.renew_leases(owner, batch, expires))).rowcount
        return renewed

    async def _request_cancel(self, mid: str, *, user: str) -> Message | None:
        async with self._writer.begin() as conn:
            if (await conn.execute(sql.message(mid, user))).first() is None:
                return None
            await conn.execute(sql.request_cancel(mid))
            row = (await conn.execute(sql.message(mid))).first()
        return None if row is None else message_record(row._mapping)
