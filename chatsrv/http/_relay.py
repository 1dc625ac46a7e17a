"""The relay: one client's view of a turn, written as Server-Sent Events.

The SSE body is an async generator that Quart iterates in the request task. It holds no nursery
and opens no cancel scope: it waits for news from its turn, nothing else, and ``keep_alive`` (one
task for the process) wakes it when a ping is due. It only reads what the turn's persister
already holds, so a client can never receive a character the database will not get.

The same events serve a resumed stream (``GET /v1/messages/{id}/events``): ``relay(turn,
after=N)`` for a turn of this process, ``followed`` for a reply another process writes (what
the engine's ``Follower`` receives from its owner, or reads from its row), ``replayed`` for a
finished one. A resumed stream has no ``start`` event; its first delta carries the characters
after N.

Events, in order (the HTTP contract, v1)::

    event: start   data: {"message_id", "user_message_id", "conversation_id"}
    id: N          event: delta   data: {"content": "..."}   N = characters of the reply so far
    event: error   data: {"error": {"code", "message"}}       when the turn failed (or, on a
                   resumed stream, ``reply_truncated``: its process died after sending more
                   than it had saved)
    event: done    data: {"message_id", "status", "stop_reason", "usage"?}
    : ping         a comment, so that no stream stays silent longer than the heartbeat
                   (proxies close idle connections)

Deltas that are already waiting when the client is ready go out as one event; the relay never
waits in order to batch. A slow reader therefore gets fewer, larger events, and costs no memory
beyond the reply itself.

When the client goes away the generator is cancelled (or closed) wherever it is suspended; its
``finally`` detaches from the turn, synchronously; when the last relay has left, the engine
applies the turn's disconnect policy.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from contextlib import aclosing
from typing import Any

import orjson
import trio

from chatsrv import _metrics as metrics
from chatsrv.engine import Piece, Turn

PING = b": ping\n\n"


def _event(name: str, data: dict[str, Any], *, event_id: int | None = None) -> bytes:
    head = b"" if event_id is None else b"id: %d\n" % event_id
    return head + b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _start(message_id: str, user_message_id: str, conversation_id: str) -> bytes:
    return _event(
        "start",
        {
            "message_id": message_id,
            "user_message_id": user_message_id,
            "conversation_id": conversation_id,
        },
    )


def _error(code: str, message: str) -> bytes:
    return _event("error", {"error": {"code": code, "message": message}})


def _done(
    message_id: str, status: str, stop_reason: str | None, usage: dict[str, Any] | None
) -> bytes:
    done: dict[str, Any] = {"message_id": message_id, "status": status, "stop_reason": stop_reason}
    if usage is not None:
        done["usage"] = usage
    return _event("done", done)


def start_event(turn: Turn) -> bytes:
    return _start(turn.message_id, turn.user_message_id, turn.conversation_id)


def delta_event(text: str, length: int) -> bytes:
    # Once per token: one format of a template, no dict; the bytes _event would build.
    return b'id: %d\nevent: delta\ndata: {"content":%b}\n\n' % (length, orjson.dumps(text))


def closing_events(turn: Turn) -> bytes:
    """The ``error`` (if any) and ``done`` events of a finished turn."""
    outcome = turn.outcome
    assert outcome is not None, "a finished turn has an outcome"
    events = b""
    if outcome.error_code is not None:
        events += _error(outcome.error_code, outcome.error or outcome.error_code)
    if not turn.persisted:
        events += _error(
            "storage_unavailable",
            "the reply could not be saved; it may be incomplete when read back",
        )
    done = _done(turn.message_id, outcome.status.value, outcome.stop_reason, outcome.usage)
    return events + done


def _stored_start(message: Mapping[str, Any]) -> bytes:
    return _start(message["id"], message["parent_id"], message["conversation_id"])


def _stored_end(message: Mapping[str, Any], *, after: int) -> bytes:
    """A stored final reply's characters after ``after``, then its ``error`` and ``done``."""
    content = message["content"]
    events = delta_event(content[after:], len(content)) if len(content) > after else b""
    if len(content) < after:  # its process died after sending more than it had saved
        events += _error(
            "reply_truncated",
            f"the stored reply has {len(content)} characters; what came after was lost",
        )
    if message["status"] == "failed":
        events += _error(message["stop_reason"], message["error"] or "")
    return events + _done(
        message["id"], message["status"], message["stop_reason"], message["usage"]
    )


def replayed(message: Mapping[str, Any], *, after: int | None = None) -> bytes:
    """The events of a finished reply, rebuilt from its stored row: from its ``start`` event
    (``after=None``; the reply comes as one delta), or from character ``after`` on."""
    head = _stored_start(message) if after is None else b""
    return head + _stored_end(message, after=after or 0)


async def followed(
    message: Mapping[str, Any],
    updates: AsyncGenerator[Piece | Mapping[str, Any] | None, None],
    *,
    after: int | None = None,
) -> AsyncGenerator[bytes, None]:
    """Stream a reply that another process writes, from what its follower's ``updates`` yield
    (``Follower.updates``): from its ``start`` event (``after=None``) or from character
    ``after`` on."""
    metrics.SSE_CLIENTS.inc()
    try:
        if after is None:
            yield _stored_start(message)
        sent = after or 0
        # Closed with this generator, wherever the client leaves it: not left to the collector.
        async with aclosing(updates):
            async for update in updates:
                if update is None:
                    yield PING
                elif isinstance(update, Piece):
                    yield delta_event(update.text, update.end)
                    sent = update.end
                else:
                    yield _stored_end(update, after=sent)
                    return
        # The row is gone: its conversation was deleted while the reply streamed.
        yield _error("not_found", "the message was deleted")
    finally:
        metrics.SSE_CLIENTS.dec()


async def relay(
    turn: Turn, *, after: int | None = None, announce: bool = False
) -> AsyncGenerator[bytes, None]:
    """Stream ``turn`` to one client, from its ``start`` event (``after=None``) or from
    character ``after`` on (a resumed stream: ``after`` is at most ``turn.length``; with
    ``announce``, after a ``start`` event all the same: a continued reply), to its ``done``
    event."""
    turn.attach()
    metrics.SSE_CLIENTS.inc()
    try:
        if after is None or announce:
            yield start_event(turn)
        if after is None:
            sent_deltas = sent_length = 0
        else:
            sent_deltas, sent_length = turn.deltas, turn.length
            if sent_length > after:
                yield delta_event(turn.content[after:], sent_length)
        while True:
            if turn.deltas > sent_deltas:
                text = turn.since(sent_deltas, sent_length)
                sent_deltas, sent_length = turn.deltas, turn.length
                yield delta_event(text, sent_length)
                continue
            if turn.finished.is_set():
                break
            await turn.wait_changed()
            if turn.deltas == sent_deltas and not turn.finished.is_set():
                yield PING  # woken with nothing new: by keep_alive
        yield closing_events(turn)
    finally:
        metrics.SSE_CLIENTS.dec()
        turn.detach()


async def keep_alive(turns: Callable[[], Iterable[Turn]], *, heartbeat_s: float) -> None:
    """Ping the relays of every running turn that has been quiet since the last look, every
    ``heartbeat_s / 2``: no stream stays silent longer than ``heartbeat_s``.

    One task for the process instead of a timeout on each relay's wait, which cost a cancel
    scope per token (~7% of a worker's CPU, in the profile of 50 paced streams).
    """
    seen: dict[Turn, int] = {}
    while True:
        await trio.sleep(heartbeat_s / 2)
        looked: dict[Turn, int] = {}
        for turn in turns():
            if seen.get(turn) == turn.changes:
                turn.ping()
            looked[turn] = turn.changes
        seen = looked
