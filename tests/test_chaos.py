"""Chaos: real processes and real faults — a fault proxy in front of PostgreSQL that cuts, refuses
and restores connections, ``pg_terminate_backend``, and SIGKILL or SIGTERM to a real hypercorn.

Each scenario checks that nothing was lost: the stored content starts with everything the client
received (or, after a kill, holds at least what was checkpointed), there is exactly one assistant
row per turn, and it has a final status.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from tests.db import terminate_backend
from tests.faultproxy import ProxiedDatabase
from tests.processes import chatsrv_environment, start_hypercorn
from tests.server import ApiClient, Chatsrv, StartChatsrv, Stream

TOKENS = [f"w{i} " for i in range(2000)]
only_postgresql = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


async def the_reply(api: ApiClient, conversation_id: str) -> dict[str, Any]:
    messages = await api.messages(conversation_id)
    replies = [m for m in messages if m["role"] == "assistant"]
    assert len(replies) == 1, messages
    return replies[0]


async def wait_until_final(api: ApiClient, conversation_ids: list[str]) -> list[dict[str, Any]]:
    """Poll until every conversation's reply has a final status (the caller bounds the time)."""
    while True:
        replies = [await the_reply(api, cid) for cid in conversation_ids]
        if all(reply["status"] != "streaming" for reply in replies):
            return replies
        await trio.sleep(0.1)


@only_postgresql
async def test_database_unreachable_for_five_seconds_mid_stream(
    start_chatsrv: StartChatsrv, upstream: Any, pg_proxy: ProxiedDatabase
) -> None:
    chatsrv = await start_chatsrv(
        database_url=pg_proxy.url, checkpoint_interval_s=0.5, db_timeout_s=1.0
    )
    upstream.script.tokens = TOKENS[:200]
    upstream.script.interval_s = 0.04  # 8 s of reply
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            stream = await chatsrv.stream_until(
                nursery, conversation_id, lambda s: len(s.deltas) == 20
            )
            pg_proxy.proxy.down()
            before = len(stream.text)
            await trio.sleep(5)  # the outage: connections cut, new ones refused
            during = len(stream.text) - before
            pg_proxy.proxy.heal()

    assert during > 0, "the client waited on the database"
    assert stream.done is not None and stream.done["status"] == "complete"
    reply = await the_reply(chatsrv, conversation_id)
    assert (reply["status"], reply["content"]) == ("complete", "".join(TOKENS[:200]))


@only_postgresql
async def test_connection_killed_during_a_checkpoint(
    start_chatsrv: StartChatsrv, upstream: Any, database_url: str
) -> None:
    chatsrv = await start_chatsrv(checkpoint_interval_s=0.2)
    upstream.script.tokens = TOKENS[:60]
    upstream.script.interval_s = 0.03
    conversation_id = await chatsrv.new_conversation()
    checkpoints: list[int] = []  # the backend pid each checkpoint ran on; the first is killed

    def kill_first_checkpoint(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        head = statement.split("WHERE", 1)[0]
        # A checkpoint sets the content and the lease; only the final commit sets `error`.
        if head.startswith("UPDATE messages SET content") and "error=" not in head:
            checkpoints.append(pid := conn.connection.driver_connection.get_server_pid())
            if len(checkpoints) == 1:
                terminate_backend(database_url, pid)

    with chatsrv.before_each_statement(kill_first_checkpoint), trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            stream = await chatsrv.stream_until(nursery, conversation_id)
            # The killed checkpoint saved nothing: content in the row while it still streams
            # is a later checkpoint, on a fresh connection, that landed.
            while True:
                row = (await chatsrv.client.get(f"/v1/messages/{stream.message_id}")).json()
                if row["status"] == "streaming" and row["content"]:
                    break
                assert row["status"] == "streaming", "the reply ended before a checkpoint landed"
                await trio.sleep(0.05)
            assert len(checkpoints) >= 2

    assert stream.done is not None and stream.done["status"] == "complete"
    reply = await the_reply(chatsrv, conversation_id)
    assert (reply["status"], reply["content"]) == ("complete", "".join(TOKENS[:60]))


@only_postgresql
async def test_database_down_past_the_retry_budget_is_journaled_then_replayed(
    start_chatsrv: StartChatsrv, upstream: Any, pg_proxy: ProxiedDatabase
) -> None:
    chatsrv = await start_chatsrv(
        database_url=pg_proxy.url, persist_retry_s=1.0, sweep_interval_s=0.3, db_timeout_s=0.5
    )
    upstream.script.tokens = TOKENS[:5]
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream.release(2)
            stream = await chatsrv.stream_until(nursery, conversation_id)
            pg_proxy.proxy.down()
            upstream.release(3)
        # The client got its `done` once the reply was safe in the journal.
        assert stream.done is not None and stream.done["status"] == "complete"
        assert chatsrv.service.journal.holds_records()
        pg_proxy.proxy.heal()
        [reply] = await wait_until_final(chatsrv, [conversation_id])

    assert (reply["status"], reply["content"]) == ("complete", "".join(TOKENS[:5]))
    assert not chatsrv.service.journal.holds_records()


async def read_until_gone(
    api: ApiClient, conversation_id: str, stream: Stream, on_delta: Callable[[int], Awaitable[None]]
) -> None:
    """Read a stream until it ends or the server goes away."""
    with contextlib.suppress(httpx.RemoteProtocolError, httpx.ReadError):
        await api.stream(conversation_id, on_delta=on_delta, into=stream)


async def test_sigkill_with_twenty_streams_then_restart(
    start_chatsrv: StartChatsrv, upstream: Any, database_url: str, tmp_path: Path
) -> None:
    interval_s = 0.5
    upstream.script.tokens = TOKENS
    upstream.script.interval_s = 0.02
    env = chatsrv_environment(
        database_url=database_url,
        llm_base_url=upstream.base_url,
        llm_api_key="test-key",
        checkpoint_interval_s=str(interval_s),
        lease_s="1.0",
        log_level="WARNING",
        journal_dir=str(tmp_path / "journal-killed"),
    )
    streams: dict[str, Stream] = {}
    progress: dict[str, list[tuple[float, int]]] = {}  # (time, characters received)
    all_streaming = trio.Event()  # every stream has had a delta
    async with trio.open_nursery() as nursery:
        server = await start_hypercorn(nursery, tmp_path, env, graceful_timeout=1.0)
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                api = ApiClient(http)
                conversations = [await api.new_conversation() for _ in range(20)]
                with trio.fail_after(30):
                    async with trio.open_nursery() as clients:
                        for cid in conversations:
                            stream = streams[cid] = Stream(0)
                            progress[cid] = []

                            async def seen(
                                _: int, s: Stream = stream, p: list[Any] = progress[cid]
                            ) -> None:
                                p.append((trio.current_time(), len(s.text)))
                                if all(progress.values()):
                                    all_streaming.set()

                            clients.start_soon(read_until_gone, api, cid, stream, seen)
                        # Let several checkpoint intervals pass with all twenty streaming.
                        await all_streaming.wait()
                        await trio.sleep(3 * interval_s)
                        killed_at = trio.current_time()
                        server.kill_all()
        finally:
            nursery.cancel_scope.cancel()
    assert await server.process.wait() == -signal.SIGKILL

    restarted = await start_chatsrv(lease_s=1.0, sweep_interval_s=0.2)
    with trio.fail_after(15):
        replies = await wait_until_final(restarted, conversations)

    for cid, reply in zip(conversations, replies, strict=True):
        assert (reply["status"], reply["stop_reason"]) == ("interrupted", "server_crash")
        received = streams[cid].text
        assert received.startswith(reply["content"])
        # At least what the client had one checkpoint interval (plus a write's time) earlier.
        cutoff = killed_at - interval_s - 0.25
        checkpointed = max((n for t, n in progress[cid] if t <= cutoff), default=0)
        assert checkpointed > 0 and len(reply["content"]) >= checkpointed


@only_postgresql
async def test_sigterm_with_the_database_unreachable_journals_then_replays_after_restart(
    start_chatsrv: StartChatsrv, upstream: Any, pg_proxy: ProxiedDatabase, tmp_path: Path
) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.interval_s = 0.02
    journal_dir = tmp_path / "journal"
    env = chatsrv_environment(
        database_url=pg_proxy.url,
        llm_base_url=upstream.base_url,
        llm_api_key="test-key",
        shutdown_grace_s="0.5",
        persist_grace_s="1.0",
        db_timeout_s="1.0",
        log_level="WARNING",
        journal_dir=str(journal_dir),
    )
    streams: dict[str, Stream] = {}
    async with trio.open_nursery() as nursery:
        server = await start_hypercorn(nursery, tmp_path, env, graceful_timeout=5.0)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            api = ApiClient(http)
            conversations = [await api.new_conversation() for _ in range(5)]
            with trio.fail_after(40):
                async with trio.open_nursery() as clients:
                    streaming = trio.Semaphore(0)
                    for cid in conversations:
                        stream = streams[cid] = Stream(0)

                        async def seen(received: int) -> None:
                            if received == 1:
                                streaming.release()

                        clients.start_soon(partial(api.stream, cid, on_delta=seen, into=stream))
                    for _ in conversations:
                        await streaming.acquire()
                    pg_proxy.proxy.down()
                    server.process.send_signal(signal.SIGTERM)
                assert await server.process.wait() == 0, server.output()
        nursery.cancel_scope.cancel()

    [journal] = journal_dir.glob("*.jsonl")
    records = [orjson.loads(line) for line in journal.read_bytes().splitlines()]
    assert sorted(r["message_id"] for r in records) == sorted(
        s.message_id for s in streams.values()
    )
    for stream in streams.values():
        assert stream.done is not None
        assert (stream.done["status"], stream.done["stop_reason"]) == (
            "interrupted",
            "server_shutdown",
        )

    pg_proxy.proxy.heal()
    restarted: Chatsrv = await start_chatsrv(journal_dir=journal_dir)
    with trio.fail_after(15):
        replies = await wait_until_final(restarted, conversations)
    for cid, reply in zip(conversations, replies, strict=True):
        assert (reply["status"], reply["stop_reason"]) == ("interrupted", "server_shutdown")
        assert reply["content"].startswith(streams[cid].text) and streams[cid].text
    assert not restarted.service.journal.holds_records()


@only_postgresql
async def test_while_the_database_is_down_new_turns_get_503_and_readiness_fails(
    start_chatsrv: StartChatsrv, upstream: Any, pg_proxy: ProxiedDatabase
) -> None:
    chatsrv = await start_chatsrv(database_url=pg_proxy.url, db_timeout_s=1.0)
    conversation_id = await chatsrv.new_conversation()
    pg_proxy.proxy.down()
    with trio.fail_after(10):
        response = await chatsrv.client.post(
            f"/v1/conversations/{conversation_id}/messages", json={"content": "hi"}
        )
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert response.headers["content-type"].startswith("application/json")
        # What the driver said is for the operator's log, not for the client.
        assert response.json()["error"] == {
            "code": "storage_unavailable",
            "message": "the database is unavailable; retry later",
        }
        ready = await chatsrv.client.get("/readyz")
        assert ready.status_code == 503
        assert "database" in ready.json()["error"]["message"]
    assert upstream.requests == []

    pg_proxy.proxy.heal()
    with trio.fail_after(10):
        assert (await chatsrv.client.get("/readyz")).status_code == 200
        assert await chatsrv.messages(conversation_id) == []
