"""How a turn starts in the database, on the store's asyncio loop: a new turn's two rows with its
prompt, an Idempotency-Key that names a turn already started, and a reply that ended early put
back to streaming to be continued. ``Store`` calls these, one transaction each (its public
methods document what they return); nothing here touches Trio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatsrv._errors import StoreError, TooManyStreams

from . import _statements as sql
from ._records import CLOCK, Message, NewTurn, TurnStart, message_record


class Starts:
    """The turn-starting transactions. ``engine`` reads; ``one_statement`` writes one statement
    (without BEGIN on PostgreSQL); ``writer`` writes several (SQLite's write lock at BEGIN)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        one_statement: AsyncEngine,
        writer: AsyncEngine,
    ) -> None:
        self._engine = engine
        self._one_statement = one_statement
        self._writer = writer
        self._postgresql = engine.dialect.name == "postgresql"

    async def begin_turn(self, turn: NewTurn) -> TurnStart | None:
        if turn.idempotency_key is not None:
            existing = await self._keyed_turn(turn.cid, turn.user, turn.idempotency_key)
            if existing is not None:
                return existing
        try:
            return await self._insert_turn(turn)
        except exc.IntegrityError:
            # Either a concurrent request with the same key inserted its turn first (the unique
            # index), or the conversation was deleted since it was read (the foreign key).
            if turn.idempotency_key is not None:
                existing = await self._keyed_turn(turn.cid, turn.user, turn.idempotency_key)
                if existing is not None:
                    return existing
            async with self._engine.begin() as conn:
                if await select_conversation(conn, turn.cid, turn.user) is None:
                    return None
            raise

    async def _insert_turn(self, turn: NewTurn) -> TurnStart | None:
        """A turn starts with one read of the conversation, its history and how many replies its
        user streams, and one INSERT of its two messages: one statement on PostgreSQL (the
        INSERT rides along in a WITH), two on SQLite. Nothing is locked: a conversation deleted
        meanwhile fails the INSERT's foreign key check, which :meth:`begin_turn` answers as not
        found. (On PostgreSQL, two turns of one user starting at the same moment may both see
        room for one more stream: the limit can be passed by the turns that race for it.)"""
        cid = turn.cid
        now = CLOCK.now()
        read = sql.conversation_and_history(cid, turn.user, now)
        # One statement on PostgreSQL; SQLite's two share a transaction.
        async with self._one_statement.begin() as conn:
            if self._postgresql:
                # The INSERT selects the conversation's row itself, so that it inserts nothing
                # when there is none, or no room; the read's snapshot does not see the new
                # rows. (So a turn started concurrently in the same conversation may be stored
                # before this one and still be missing from its prompt.)
                user, assistant = sql.turn_messages(turn, CLOCK.now(), CLOCK.now())
                insert_turn = sql.insert_messages_of(cid, [user, assistant], turn, now)
                rows = (await conn.execute(read.add_cte(insert_turn.cte("turn")))).all()
            else:
                rows = (await conn.execute(read)).all()
                # Stamped under the write lock, after the read: stored order is prompt order.
                user, assistant = sql.turn_messages(turn, CLOCK.now(), CLOCK.now())
            if not rows or rows[0][0] != 0:  # no conversation of the user's
                return None
            (_, conversation_model, system_prompt, running), *earlier = rows
            if running >= turn.max_streams:  # nothing was inserted
                raise TooManyStreams(turn.max_streams)
            assistant["model"] = sql.reply_model(turn, conversation_model)
            if not self._postgresql:
                await conn.execute(sql.insert_messages([user, assistant]))
        history = _history(system_prompt, earlier)
        history.append({"role": "user", "content": turn.content})
        return TurnStart(message_record(user), message_record(assistant), history)

    async def _keyed_turn(self, cid: str, user_id: str, key: str) -> TurnStart | None:
        """The turn ``key`` names, if there is one. A turn whose reply ended empty in a crash is
        forgotten instead (both its messages deleted), as if it never happened: its start was
        lost before anything was generated (its process died, or the start outlived its bound
        and no turn ever ran it), so a retry with its key starts it again rather than replay
        an empty reply."""
        async with self._engine.begin() as conn:
            conv = await select_conversation(conn, cid, user_id)
            if conv is None:
                return None
            assistant = (await conn.execute(sql.keyed_reply(cid, key, CLOCK.now()))).first()
            if assistant is None:
                return None
            user = (await conn.execute(sql.message(assistant._mapping["parent_id"]))).first()
        if user is None:  # the schema cannot say so, but nothing deletes one message alone
            raise StoreError(f"the user message of turn {assistant._mapping['id']} is missing")
        reply = assistant._mapping
        if (reply["status"], reply["stop_reason"], reply["content"]) == (
            "interrupted",
            "server_crash",
            "",
        ):
            async with self._writer.begin() as conn:
                await conn.execute(sql.forget_turn(user._mapping["id"], reply["id"]))
            return None
        return TurnStart(
            message_record(user._mapping),
            message_record(reply),
            [],
            existing=True,
            owner=reply["owner"] if reply["status"] == "streaming" else None,
        )

    async def begin_continuation(
        self, mid: str, user: str, owner: str, lease_s: float, max_streams: int
    ) -> TurnStart | Message | None:
        async with self._writer.begin() as conn:
            row = (await conn.execute(sql.message(mid, user))).first()
            if row is None or row._mapping["role"] != "assistant":
                return None
            reply = row._mapping
            if reply["status"] not in sql.CONTINUABLE:
                return message_record(reply)
            now = CLOCK.now()
            read = sql.conversation_and_history(
                reply["conversation_id"], user, now, before=(reply["created_at"], reply["id"])
            )
            (_, _, system_prompt, running), *earlier = (await conn.execute(read)).all()
            if running >= max_streams:
                raise TooManyStreams(max_streams)
            if not (await conn.execute(sql.reopen(mid, owner, lease_s, now))).rowcount:
                # Another request continued it since the read (PostgreSQL; SQLite's write
                # lock is held from BEGIN): it is as that one left it.
                row = (await conn.execute(sql.message(mid))).first()
                assert row is not None, "a message cannot go away inside a transaction"
                return message_record(row._mapping)
            parent = (await conn.execute(sql.message(reply["parent_id"]))).first()
        if parent is None:  # the schema cannot say so, but nothing deletes one message alone
            raise StoreError(f"the user message of reply {mid} is missing")
        history = _history(system_prompt, earlier)
        return TurnStart(message_record(parent._mapping), message_record(reply), history)


def _history(
    system_prompt: str | None, earlier: Sequence[Row[int, str | None, str | None, int]]
) -> list[dict[str, str]]:
    """The prompt's messages from ``conversation_and_history``'s rows after the first."""
    # Typed as nullable by the conversation's columns; a message's role and content never are.
    history = [{"role": str(role), "content": str(content)} for _, role, content, _ in earlier]
    if system_prompt:
        history.insert(0, {"role": "system", "content": system_prompt})
    return history


async def select_conversation(conn: AsyncConnection, cid: str, user: str | None) -> Row[Any] | None:
    row: Row[Any] | None = (await conn.execute(sql.conversation(cid, user))).first()
    return row
