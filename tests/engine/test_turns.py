"""How a turn ends, against real components on both stores: each way a reply can be cut short
keeps exactly what the client received (and anything after it), with the right final status."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import pytest
import trio

from chatsrv.engine import _recovery as recovery
from tests.db import terminate_backend
from tests.server import Chatsrv, StartChatsrv

TOKENS = [f"tok{i} " for i in range(40)]


async def assistant_row(chatsrv: Chatsrv, conversation_id: str) -> dict[str, Any]:
    messages = await chatsrv.messages(conversation_id)
    assistants = [m for m in messages if m["role"] == "assistant"]
    assert len(assistants) == 1, messages
    return assistants[0]


@pytest.mark.parametrize("k", [1, 2, 5])
async def test_client_disconnect_after_k_deltas(chatsrv: Chatsrv, upstream: Any, k: int) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()

    async def one_more(received: int) -> None:
        if received < k:
            upstream.release(1)

    upstream.release(1)
    with trio.fail_after(10):
        stream = await chatsrv.stream(conversation_id, disconnect_after=k, on_delta=one_more)
        assert len(stream.deltas) == k
        # Nothing else is released: the server learns of the close from the socket alone.
        await chatsrv.wait_finished(stream.message_id)
        await upstream.wait_disconnected()

    row = await assistant_row(chatsrv, conversation_id)
    assert (row["status"], row["stop_reason"]) == ("interrupted", "client_disconnected")
    assert row["content"].startswith(stream.text)
    assert row["content"] == "".join(TOKENS[:k])


async def test_a_quiet_stream_gets_pings(chatsrv: Chatsrv, upstream: Any) -> None:
    """While the upstream is silent the client receives ``: ping`` comments (heartbeat 0.2 s
    here), then the reply as usual.

    The upstream sends its token only once two pings have arrived, so those two are certain.
    How many more arrive while the token travels, or while the reply is committed, depends on
    the machine's speed: they are allowed anywhere after, and counted nowhere."""
    upstream.script.tokens = TOKENS[:1]
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    body = b""
    released = False
    with trio.fail_after(10):
        async with chatsrv.client.stream(
            "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": "hi"}
        ) as response:
            async for data in response.aiter_bytes():
                body += data
                # Two pings or more: one read may bring several.
                if not released and body.count(b": ping\n\n") >= 2:
                    upstream.release(1)
                    released = True
    events = body.split(b"\n\n")[:-1]
    assert events[0].startswith(b"event: start\n")
    assert events[1:3] == [b": ping", b": ping"]
    assert [event for event in events[3:] if event != b": ping"][:-1] == [
        b'id: %d\nevent: delta\ndata: {"content":"%s"}' % (len(TOKENS[0]), TOKENS[0].encode())
    ]
    assert events[-1].startswith(b"event: done\n")
    assert b'"status":"complete"' in events[-1]


async def test_deadline_keeps_the_partial_reply(start_chatsrv: StartChatsrv, upstream: Any) -> None:
    # The three tokens before the stall cross loopback in milliseconds; the deadline must not
    # cut them, and 2 s leaves that margin to a loaded 2-core machine while the test stays short.
    chatsrv = await start_chatsrv(turn_deadline_s=2.0)
    upstream.script.tokens = TOKENS
    upstream.script.stall_after = 3
    conversation_id = await chatsrv.new_conversation()

    with trio.fail_after(10):
        stream = await chatsrv.stream(conversation_id)
        await upstream.wait_disconnected()

    assert stream.done is not None
    assert (stream.done["status"], stream.done["stop_reason"]) == ("timed_out", "deadline")
    assert stream.text == "".join(TOKENS[:3])
    row = await assistant_row(chatsrv, conversation_id)
    assert (row["status"], row["stop_reason"], row["content"]) == (
        "timed_out",
        "deadline",
        stream.text,
    )


async def test_upstream_breaking_mid_stream_keeps_the_partial(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.fail_after = 4
    conversation_id = await chatsrv.new_conversation()

    with trio.fail_after(10):
        stream = await chatsrv.stream(conversation_id)

    assert stream.text == "".join(TOKENS[:4])
    assert [error["code"] for error in stream.errors] == ["upstream_protocol"]
    assert stream.done is not None
    assert (stream.done["status"], stream.done["stop_reason"]) == ("failed", "upstream_error")
    row = await assistant_row(chatsrv, conversation_id)
    assert (row["status"], row["stop_reason"], row["content"]) == (
        "failed",
        "upstream_error",
        stream.text,
    )
    assert row["error"]


@pytest.mark.parametrize("status", [429, 500])
async def test_upstream_refusing_before_the_first_token(
    chatsrv: Chatsrv, upstream: Any, status: int
) -> None:
    upstream.script.error_status = status
    conversation_id = await chatsrv.new_conversation()

    with trio.fail_after(10):
        stream = await chatsrv.stream(conversation_id)

    assert [event.event for event in stream.events] == ["start", "error", "done"]
    assert [error["code"] for error in stream.errors] == ["upstream_status"]
    assert stream.done is not None
    assert (stream.done["status"], stream.done["stop_reason"]) == ("failed", "upstream_error")
    row = await assistant_row(chatsrv, conversation_id)
    assert (row["status"], row["content"]) == ("failed", "")
    assert str(status) in row["error"]


async def test_drain_interrupts_running_turns_and_tells_their_clients(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    upstream.script.tokens = [f"x{i} " for i in range(400)]
    upstream.script.interval_s = 0.05  # 20 s a reply: none can finish within the 1 s grace
    conversation_ids = [await chatsrv.new_conversation() for _ in range(5)]
    streams: list[Any] = []
    first_delta = trio.Semaphore(0)

    async def client(conversation_id: str) -> None:
        async def seen(received: int) -> None:
            if received == 1:
                first_delta.release()

        streams.append(await chatsrv.stream(conversation_id, on_delta=seen))

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for conversation_id in conversation_ids:
                nursery.start_soon(client, conversation_id)
            for _ in conversation_ids:
                await first_delta.acquire()
            chatsrv.service.engine.drain()
            response = await chatsrv.client.post(
                f"/v1/conversations/{conversation_ids[0]}/messages", json={"content": "late"}
            )
            assert response.status_code == 503
            assert response.headers["retry-after"]
        await chatsrv.service.engine.drained.wait()

    for stream in streams:
        assert stream.done is not None
        assert (stream.done["status"], stream.done["stop_reason"]) == (
            "interrupted",
            "server_shutdown",
        )
    for conversation_id in conversation_ids:
        row = await assistant_row(chatsrv, conversation_id)
        assert (row["status"], row["stop_reason"]) == ("interrupted", "server_shutdown")
        received = next(s.text for s in streams if s.start["conversation_id"] == conversation_id)
        assert row["content"].startswith(received) and received


class _RetryLogged(logging.Handler):
    """Sets ``event`` when the persister logs that it will retry its commit."""

    def __init__(self, event: trio.Event) -> None:
        super().__init__(logging.WARNING)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.event.set()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_connection_killed_during_the_final_commit(
    chatsrv: Chatsrv, upstream: Any, database_url: str
) -> None:
    upstream.script.tokens = TOKENS[:10]
    conversation_id = await chatsrv.new_conversation()
    terminated: list[int] = []

    def kill_before_update(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE MESSAGES") and not terminated:
            pid = conn.connection.driver_connection.get_server_pid()
            terminated.append(pid)
            terminate_backend(database_url, pid)

    with chatsrv.before_each_statement(kill_before_update), trio.fail_after(20):
        stream = await chatsrv.stream(conversation_id)

    assert terminated, "the fault was not injected"
    assert stream.done is not None and stream.done["status"] == "complete"
    assert stream.errors == []
    row = await assistant_row(chatsrv, conversation_id)
    assert (row["status"], row["content"]) == ("complete", "".join(TOKENS[:10]))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_database_locked_during_the_final_commit(
    start_chatsrv: StartChatsrv, upstream: Any, database_url: str
) -> None:
    chatsrv = await start_chatsrv(db_timeout_s=0.2)
    upstream.script.tokens = TOKENS[:3]
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    path = database_url.split(":///", 1)[1]
    retried = trio.Event()
    handler = _RetryLogged(retried)
    logging.getLogger("chatsrv").addHandler(handler)
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                upstream.release(2)
                stream = await chatsrv.stream_until(
                    nursery, conversation_id, lambda s: s.text == "".join(TOKENS[:2])
                )
                locker.execute("BEGIN EXCLUSIVE")
                upstream.release(1)
                await retried.wait()
                # The commit has not happened, so the turn is not finished: no relay may send
                # `done` (asserted on the server; the client alone could just be behind).
                turn = chatsrv.service.engine.turn(stream.message_id, user=None)
                assert turn is not None and turn.outcome is not None
                assert not turn.finished.is_set()
                assert stream.done is None
                locker.execute("ROLLBACK")
    finally:
        logging.getLogger("chatsrv").removeHandler(handler)
        locker.close()

    assert stream.done is not None and stream.done["status"] == "complete"
    row = await assistant_row(chatsrv, conversation_id)
    assert (row["status"], row["content"]) == ("complete", "".join(TOKENS[:3]))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_database_down_past_the_retry_budget_journals_then_replays(
    start_chatsrv: StartChatsrv, upstream: Any, database_url: str
) -> None:
    # The periodic replayer is kept out of the way: the test replays when it chooses.
    chatsrv = await start_chatsrv(db_timeout_s=0.2, persist_retry_s=1.0, sweep_interval_s=3600)
    upstream.script.tokens = TOKENS[:3]
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    locker = sqlite3.connect(database_url.split(":///", 1)[1], isolation_level=None)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                upstream.release(1)
                stream = await chatsrv.stream_until(nursery, conversation_id)
                locker.execute("BEGIN EXCLUSIVE")
                upstream.release(2)
            # The commit gave up after its budget; the reply is in the journal, on disk, and
            # the client was told the turn is done.
            assert stream.done is not None and stream.done["status"] == "complete"
            assert stream.errors == []
            assert chatsrv.service.journal.holds_records()
            response = await chatsrv.client.get("/readyz")
            assert response.status_code == 503
            assert "journal" in response.json()["error"]["message"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    assert await recovery.replay(chatsrv.service.journal, chatsrv.service.store) == 1
    assert not chatsrv.service.journal.holds_records()
    row = await assistant_row(chatsrv, conversation_id)
    assert (row["status"], row["stop_reason"], row["content"]) == (
        "complete",
        "stop",
        "".join(TOKENS[:3]),
    )
    assert (await chatsrv.client.get("/readyz")).status_code == 200


async def test_no_database_write_per_token(start_chatsrv: StartChatsrv, upstream: Any) -> None:
    # Checkpoints and lease renewals are paced by time, not by tokens: a slow machine could fit
    # one into a turn here. Pushed out of reach, they leave a turn's own writes to count.
    chatsrv = await start_chatsrv(checkpoint_interval_s=3600.0, lease_s=3600.0)
    conversation_id = await chatsrv.new_conversation()
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The recovery round (sweep, forgetting old keys) runs beside the turns; it is not
        # the turn's work.
        if "lease_expires_at <" in statement or "idempotency_key IS NOT NULL" in statement:
            return
        kind = statement.lstrip().split(None, 1)[0].upper()
        if kind == "WITH" and "INSERT INTO messages" in statement:
            kind = "INSERT"  # on PostgreSQL, a turn's INSERT rides along with its read
        statements.append(kind)

    per_turn = []
    for tokens in (TOKENS[:2], TOKENS[:40]):
        upstream.script.tokens = tokens
        with chatsrv.before_each_statement(record):
            stream = await chatsrv.stream(conversation_id)
        assert stream.text == "".join(tokens)
        per_turn.append([s for s in statements if s in ("INSERT", "UPDATE", "DELETE")])
        statements.clear()

    # One INSERT of the user and assistant rows at the start, one UPDATE at the end, however
    # long the reply.
    assert per_turn[0] == per_turn[1] == ["INSERT", "UPDATE"]
