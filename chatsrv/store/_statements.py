"""The SQL the store runs, built with SQLAlchemy Core: functions of plain values that return a
statement (or the rows to insert; or, for a statement run often, the statement built once and
its parameters). Nothing here does I/O or reads the clock; ``_store.py`` runs
these on its asyncio loop, one short transaction each, and passes in the time.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final

import orjson
from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Delete,
    Insert,
    ScalarSelect,
    Select,
    Text,
    Update,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
    union_all,
    update,
)

from ._records import NewTurn, new_message
from ._tables import api_keys, conversations, messages, users

# How long an Idempotency-Key names its turn.
IDEMPOTENCY_WINDOW: Final = timedelta(hours=24)

# A streaming row's stop_reason while a client's cancel request waits for its owner.
CANCEL_REQUESTED: Final = "user_cancelled"

# The statuses of a reply that can be continued: it ended before the upstream finished it.
CONTINUABLE: Final = ("interrupted", "cancelled", "timed_out", "failed")


# -- Conversations and messages ------------------------------------------------------------------
#
# ``user`` scopes a statement to one user's conversations (a conversation or message of another
# user is not there); None, for the engine's own reads, to every user's.


def conversation(cid: str, user: str | None) -> Select[Any]:
    return select(conversations).where(conversations.c.id == cid, *_of(user))


def newest_conversations(user: str, limit: int) -> Select[Any]:
    return (
        select(conversations)
        .where(conversations.c.user_id == user)
        .order_by(conversations.c.created_at.desc(), conversations.c.id.desc())
        .limit(limit)
    )


def delete_conversation(cid: str, user: str) -> Delete:
    """Its messages go with it (ON DELETE CASCADE)."""
    return delete(conversations).where(conversations.c.id == cid, conversations.c.user_id == user)


def messages_of(cid: str) -> Select[Any]:
    return (
        select(messages)
        .where(messages.c.conversation_id == cid)
        .order_by(messages.c.created_at, messages.c.id)
    )


def message(mid: str, user: str | None = None) -> Select[Any]:
    return select(messages).where(messages.c.id == mid, *_message_of(user))


def _of(user: str | None) -> list[ColumnElement[bool]]:
    return [] if user is None else [conversations.c.user_id == user]


def _message_of(user: str | None) -> list[ColumnElement[bool]]:
    if user is None:
        return []
    theirs = select(conversations.c.id).where(conversations.c.user_id == user)
    return [messages.c.conversation_id.in_(theirs)]


def running_of(user: str, now: datetime) -> ScalarSelect[int]:
    """How many replies of ``user``'s conversations stream now (their lease runs)."""
    theirs = conversations.alias("theirs")  # never correlated with an enclosing statement's
    return (
        select(func.count())
        .select_from(messages.join(theirs, messages.c.conversation_id == theirs.c.id))
        .where(
            theirs.c.user_id == user,
            messages.c.status == "streaming",
            messages.c.lease_expires_at >= now,
        )
        .scalar_subquery()
    )


# -- Users and their keys ------------------------------------------------------------------------


def user_named(name: str) -> Select[Any]:
    return select(users).where(users.c.name == name)


def key_owner(digest: str) -> Select[Any]:
    """The user of the key whose digest this is, unless it was revoked."""
    return select(api_keys.c.user_id).where(
        api_keys.c.digest == digest, api_keys.c.revoked_at.is_(None)
    )


def all_keys() -> Select[Any]:
    return (
        select(api_keys.c.id, users.c.name, api_keys.c.created_at, api_keys.c.revoked_at)
        .join(users, api_keys.c.user_id == users.c.id)
        .order_by(api_keys.c.created_at, api_keys.c.id)
    )


def revoke_key(key_id: str, now: datetime) -> Update:
    return (
        update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )


# -- A turn's start ------------------------------------------------------------------------------


def conversation_and_history(
    cid: str, user: str, now: datetime, *, before: tuple[datetime, str] | None = None
) -> Select[int, str | None, str | None, int]:
    """The conversation's model and system prompt, then its messages that have content (those
    ordered before ``before``'s ``(created_at, id)``, if given), in order: one statement (a join
    would repeat the system prompt on every row). The conversation's row comes first, with its
    model and system prompt in the role and content columns, and in the last column how many
    replies its user streams now; no row at all means no conversation (of ``user``)."""
    head = select(
        literal(0).label("part"),
        conversations.c.model.label("role"),
        conversations.c.system_prompt.label("content"),
        conversations.c.created_at,
        conversations.c.id,
        running_of(user, now).label("running"),
    ).where(conversations.c.id == cid, conversations.c.user_id == user)
    history = select(
        literal(1),
        messages.c.role,
        messages.c.content,
        messages.c.created_at,
        messages.c.id,
        literal(0),
    ).where(messages.c.conversation_id == cid, messages.c.content != "", *_message_of(user))
    if before is not None:
        at, mid = before
        history = history.where(
            tuple_(messages.c.created_at, messages.c.id)
            < tuple_(literal(at, messages.c.created_at.type), literal(mid, messages.c.id.type))
        )
    ordered = union_all(head, history).subquery()
    return select(ordered.c.part, ordered.c.role, ordered.c.content, ordered.c.running).order_by(
        ordered.c.part, ordered.c.created_at, ordered.c.id
    )


def reopen(mid: str, owner: str, lease_s: float, now: datetime) -> Update:
    """A reply that ended early back to 'streaming', owned by ``owner`` and leased, so that it can
    be continued; only from one of the ``CONTINUABLE`` statuses (so one continuation at a time)."""
    return (
        update(messages)
        .where(
            messages.c.id == mid,
            messages.c.role == "assistant",
            messages.c.status.in_(CONTINUABLE),
        )
        .values(
            status="streaming",
            stop_reason=None,
            error=None,
            owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_s),
            updated_at=now,
        )
    )


def turn_messages(
    turn: NewTurn, user_at: datetime, assistant_at: datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A turn's user message and its assistant message, streaming, leased, its model unset."""
    user = new_message(turn.cid, "user", turn.content, "complete", None, user_at)
    assistant = new_message(turn.cid, "assistant", "", "streaming", None, assistant_at)
    assistant.update(
        parent_id=user["id"],
        idempotency_key=turn.idempotency_key,
        owner=turn.owner,
        lease_expires_at=assistant_at + timedelta(seconds=turn.lease_s),
    )
    return user, assistant


def reply_model(turn: NewTurn, conversation_model: str | None) -> str:
    """The request's model, else the conversation's, else the default (as _model_column)."""
    return turn.model or conversation_model or turn.default_model


def _model_column(turn: NewTurn, conversation_model: ColumnElement[Any]) -> ColumnElement[str]:
    """reply_model in SQL, from the conversation's model column."""
    return func.coalesce(
        literal(turn.model or None, Text),
        func.nullif(conversation_model, ""),
        literal(turn.default_model, Text),
    )


def insert_messages_of(
    cid: str, rows: list[dict[str, Any]], turn: NewTurn, now: datetime
) -> Insert:
    """INSERT ``rows`` if the conversation exists, is the turn's user's, and that user streams
    fewer than ``turn.max_streams`` replies: one SELECT of each row from that check, which is
    made once (a CTE). The assistant's model (its ``None``) is resolved from the conversation's
    row."""
    columns = list(rows[0])
    room = (
        select(conversations.c.model)
        .where(
            conversations.c.id == cid,
            conversations.c.user_id == turn.user,
            running_of(turn.user, now) < turn.max_streams,
        )
        .cte("room")
    )

    def from_conversation(row: dict[str, Any]) -> Select[Any]:
        values = [
            _model_column(turn, room.c.model).label(name)
            if name == "model" and row["role"] == "assistant"
            else literal(row[name], messages.c[name].type).label(name)
            for name in columns
        ]
        return select(*values).select_from(room)

    return insert(messages).from_select(
        columns, union_all(*(from_conversation(row) for row in rows))
    )


def insert_messages(rows: list[dict[str, Any]]) -> Insert:
    """One INSERT with every row (an executemany would be one statement per row)."""
    return insert(messages).values(rows)


def keyed_reply(cid: str, key: str, now: datetime) -> Select[Any]:
    """The assistant message that ``key`` names in the conversation, if the key is recent."""
    return select(messages).where(
        messages.c.conversation_id == cid,
        messages.c.idempotency_key == key,
        messages.c.created_at >= now - IDEMPOTENCY_WINDOW,
    )


# -- A reply while it streams, and its end ------------------------------------------------------


def streaming_replies(user: str, now: datetime) -> Select[Any]:
    """The user's replies being streamed by a live process (their lease runs), oldest first."""
    return (
        select(
            messages.c.id,
            messages.c.conversation_id,
            func.length(messages.c.content).label("offset"),
            messages.c.created_at,
            messages.c.owner,
        )
        .where(
            messages.c.status == "streaming",
            messages.c.lease_expires_at >= now,
            *_message_of(user),
        )
        .order_by(messages.c.created_at, messages.c.id)
    )


def request_cancel(mid: str) -> Update:
    """Ask the owner of a streaming reply to cancel it: it finds ``user_cancelled`` in the row's
    stop_reason (see ``cancel_requests``), stops the turn and commits it ``cancelled``."""
    return (
        update(messages)
        .where(
            messages.c.id == mid,
            messages.c.role == "assistant",
            messages.c.status == "streaming",
        )
        .values(stop_reason=CANCEL_REQUESTED)
    )


def cancel_requests(owner: str) -> Select[Any]:
    """The streaming replies of ``owner`` that a client asked to cancel."""
    return select(messages.c.id).where(
        messages.c.owner == owner,
        messages.c.status == "streaming",
        messages.c.stop_reason == CANCEL_REQUESTED,
    )


def _kept_cancel_request() -> ColumnElement[Any]:
    """A streaming row's stop_reason after a write of its owner: a cancel request stays until
    the final commit; anything else (a sweep's 'server_crash' taken back) is cleared."""
    return case((messages.c.stop_reason == CANCEL_REQUESTED, messages.c.stop_reason), else_=None)


def checkpoint(
    mid: str, content: str, owner: str, lease_s: float, now: datetime
) -> tuple[Update, dict[str, Any]]:
    """The checkpoint UPDATE and its parameters. A turn writes one every checkpoint interval, so
    the statement is built once and only its parameters change: building it (0.27 ms) and
    computing its cache key every time made a checkpoint cost 1.66 ms of CPU in this process,
    against 0.95 ms now (2000 checkpoints on PostgreSQL)."""
    return _CHECKPOINT, {
        "checkpoint_id": mid,
        "checkpoint_content": content,
        "checkpoint_owner": owner,
        "checkpoint_at": now,
        "checkpoint_expires": now + timedelta(seconds=lease_s),
    }


def renew_leases(owner: str, ids: list[str], expires: datetime) -> Update:
    return (
        update(messages)
        .where(messages.c.id.in_(ids), _still_ours(owner))
        .values(status="streaming", stop_reason=_kept_cancel_request(), lease_expires_at=expires)
    )


def sweep(sweeper: str, now: datetime, keep: list[str] | None) -> Update:
    """Expired rows of other processes, and (given ``keep``) of the sweeper's own that are not
    in it: rows whose start outlived its bound, which no turn of the sweeper's runs."""
    # Never our own rows that ``keep`` names (or all of them, without it): this process is
    # alive, whatever their leases say.
    others = messages.c.owner != sweeper
    return (
        update(messages)
        .where(
            messages.c.status == "streaming",
            messages.c.lease_expires_at < now,
            others if keep is None else or_(others, messages.c.id.not_in(keep)),
        )
        # The owner stays: should it be alive after all (stalled past its lease, cut off
        # from the database), its next checkpoint or renewal takes the row back.
        .values(
            status="interrupted",
            stop_reason="server_crash",
            lease_expires_at=None,
            updated_at=now,
        )
    )


def abandon(mid: str, owner: str, now: datetime) -> Update:
    """A reply of ``owner``'s that no turn streams (its start outlived its bound), ended as a
    crash's would be: interrupted/server_crash, with what it holds (nothing)."""
    return (
        update(messages)
        .where(messages.c.id == mid, messages.c.owner == owner, messages.c.status == "streaming")
        .values(
            status="interrupted",
            stop_reason="server_crash",
            lease_expires_at=None,
            updated_at=now,
        )
    )


def forget_turn(user_mid: str, assistant_mid: str) -> Delete:
    """A turn that never was: its user message and its reply, if the reply is still one that
    ended empty in a crash (see ``Starts._keyed_turn``)."""
    reply = messages.alias("reply")  # never correlated with the rows being deleted
    empty = select(reply.c.id).where(
        reply.c.id == assistant_mid,
        reply.c.status == "interrupted",
        reply.c.stop_reason == "server_crash",
        reply.c.content == "",
    )
    return delete(messages).where(messages.c.id.in_([user_mid, assistant_mid]), empty.exists())


def forget_keys(now: datetime) -> Update:
    return (
        update(messages)
        .where(
            messages.c.idempotency_key.is_not(None),
            messages.c.created_at < now - IDEMPOTENCY_WINDOW,
        )
        .values(idempotency_key=None)
    )


def finish_reply(mid: str, values: dict[str, Any], now: datetime) -> Update:
    """Set an assistant message's final values (``values`` may hold NULs; they are replaced)."""
    values = {
        **values,
        # PostgreSQL's text and JSONB cannot hold U+0000. The content is cleaned where it
        # enters (a client already has it); what else an upstream said is cleaned here, so
        # that a final commit is never refused for good.
        "stop_reason": _without_nul(values["stop_reason"]),
        "error": _without_nul(values["error"]),
        "usage": _without_nul_json(values["usage"]),
    }
    return (
        update(messages)
        .where(messages.c.id == mid, messages.c.role == "assistant")
        .values(**values, updated_at=now)
    )


def _still_ours(owner: str | BindParameter[str]) -> ColumnElement[bool]:
    """A reply ``owner`` is streaming: its row is 'streaming', or was swept while ``owner`` was
    cut off from the database (then the owner's next write takes it back)."""
    return and_(
        messages.c.owner == owner,
        or_(
            messages.c.status == "streaming",
            and_(messages.c.status == "interrupted", messages.c.stop_reason == "server_crash"),
        ),
    )


# Built once: see checkpoint().
_CHECKPOINT: Final = (
    update(messages)
    .where(
        messages.c.id == bindparam("checkpoint_id"),
        _still_ours(bindparam("checkpoint_owner")),
    )
    .values(
        content=bindparam("checkpoint_content"),
        status="streaming",
        stop_reason=_kept_cancel_request(),
        updated_at=bindparam("checkpoint_at", type_=messages.c.updated_at.type),
        lease_expires_at=bindparam("checkpoint_expires", type_=messages.c.lease_expires_at.type),
    )
)


def _without_nul(text: str | None) -> str | None:
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


def _without_nul_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    encoded = orjson.dumps(value)
    if b"\\u0000" not in encoded:
        return value
    cleaned: dict[str, Any] = orjson.loads(encoded.replace(b"\\u0000", b"\\ufffd"))
    return cleaned
