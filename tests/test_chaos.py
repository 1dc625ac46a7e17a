"""Chaos: real processes and real faults — a fault proxy in front of PostgreSQL that cuts, refuses
and restores connections, ``pg_terminate_backend``, and SIGKILL or SIGTERM to a real hypercorn.

Each scenario checks that nothing was lost: the stored content starts with everything the client
received (or, after a kill, holds at least what was seen checkpointed before it), there is exactly
one assistant row per turn, and it has a final status. A real hypercorn's log must hold no
traceback and no error but those the scenario causes on purpose, each allowed by name.

Waiting is on observed facts (a delta received, a row seen checkpointed, a failure logged), never
on a margin of wall-clock time; the only clock is the length of an outage and the pace of tokens.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
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


class LogWatch(logging.Handler):
    """The records a logger emits, as they come, for a test to wait on. Only for loggers that
    log from the Trio thread (the Trio event is not thread-safe): chatsrv's persister does."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()  # set, then replaced, whenever a record arrives

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    def count(self, prefix: str) -> int:
        """How many of the records' messages start with ``prefix``."""
        return sum(record.getMessage().startswith(prefix) for record in self.records)

    async def wait_count(self, prefix: str, n: int) -> None:
        """Until ``n`` records' messages start with ``prefix``."""
        while self.count(prefix) < n:
            await self._changed.wait()


@contextlib.contextmanager
def watching(logger_name: str) -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger(logger_name)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)


@only_postgresql
async def test_database_unreachable_for_five_seconds_mid_stream(
    start_chatsrv: StartChatsrv, upstream: Any, pg_proxy: ProxiedDatabase
) -> None:
    chatsrv = await start_chatsrv(
        database_url=pg_proxy.url, checkpoint_interval_s=0.5, db_timeout_s=1.0
    )
    tokens = TOKENS[:200]
    upstream.script.tokens = tokens
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    pacer = trio.CancelScope()
    released = 0

    async def pace() -> None:
        """A token every 40 ms, as a model streams, whatever the database does. The last one
        waits for the test: the reply is still streaming while the test looks for the first
        checkpoint after the outage."""
        nonlocal released
        with pacer:
            while released < len(tokens) - 1:
                upstream.release()
                released += 1
                await trio.sleep(0.04)

    with trio.fail_after(40), watching("chatsrv.persister") as persister_log:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pace)
            stream = await chatsrv.stream_until(
                nursery, conversation_id, lambda s: len(s.deltas) == 20
            )
            turn = chatsrv.service.engine.turn(stream.message_id, user=None)
            assert turn is not None
            checkpoint_failed = f"turn {stream.message_id}: checkpoint failed"
            failed_before = persister_log.count(checkpoint_failed)
            pg_proxy.proxy.down()
            down_at = trio.current_time()
            # No checkpoint from before the outage can hold more than the turn has now.
            saved_at_most = turn.length
            before = len(stream.text)
            # The outage: connections cut, new ones refused. It lasts 5 s, and at least until a
            # checkpoint has failed (the persister logs each failure as a warning).
            await persister_log.wait_count(checkpoint_failed, failed_before + 1)
            await trio.sleep_until(down_at + 5)
            at_heal = len(stream.text)
            pg_proxy.proxy.heal()

            # A checkpoint landed after the outage: the row, still streaming, holds all that
            # the client had received when the database came back, more than any checkpoint
            # from before the outage could hold.
            while True:
                response = await chatsrv.client.get(f"/v1/messages/{stream.message_id}")
                assert response.status_code in (200, 503), response.text
                if response.status_code == 200:  # 503 while the pool reconnects
                    row = response.json()
                    assert row["status"] == "streaming"
                    if len(row["content"]) >= at_heal:
                        break
                await trio.sleep(0.05)
            pacer.cancel()
            upstream.release(len(tokens) - released)
        reply = await the_reply(chatsrv, conversation_id)

    assert at_heal > before, "the client waited on the database"
    assert at_heal > saved_at_most
    assert stream.done is not None and stream.done["status"] == "complete"
    assert (reply["status"], reply["content"]) == ("complete", "".join(tokens))


@only_postgresql
async def test_connection_killed_during_a_checkpoint(
    start_chatsrv: StartChatsrv, upstream: Any, database_url: str
) -> None:
    chatsrv = await start_chatsrv(checkpoint_interval_s=0.2)
    upstream.script.tokens = TOKENS[:60]
    # All but the last token now; the last one once a checkpoint has been seen, so that the
    # reply cannot end first, however slow the machine.
    upstream.script.gated = True
    upstream.release(59)
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
                assert row["status"] == "streaming"
                await trio.sleep(0.05)
            assert len(checkpoints) >= 2
            upstream.release()
        reply = await the_reply(chatsrv, conversation_id)

    assert stream.done is not None and stream.done["status"] == "complete"
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


async def wait_checkpointed(api: ApiClient, received: dict[str, int]) -> dict[str, int]:
    """Poll until the reply of each conversation, still streaming, has been checkpointed with at
    least ``received[conversation]`` characters; what was stored then (the caller bounds the
    time)."""
    while True:
        replies = {cid: await the_reply(api, cid) for cid in received}
        assert all(reply["status"] == "streaming" for reply in replies.values())
        stored = {cid: len(reply["content"]) for cid, reply in replies.items()}
        if all(stored[cid] >= n for cid, n in received.items()):
            return stored
        await trio.sleep(0.1)


async def test_sigkill_with_twenty_streams_then_restart(
    start_chatsrv: StartChatsrv, upstream: Any, database_url: str, tmp_path: Path
) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.interval_s = 0.02
    env = chatsrv_environment(
        database_url=database_url,
        llm_base_url=upstream.base_url,
        llm_api_key="test-key",
        checkpoint_interval_s="0.5",
        lease_s="1.0",
        log_level="WARNING",
        journal_dir=str(tmp_path / "journal-killed"),
    )
    streams: dict[str, Stream] = {}
    async with trio.open_nursery() as nursery:
        server = await start_hypercorn(nursery, tmp_path, env, graceful_timeout=1.0)
        try:
            with trio.fail_after(40):
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                    api = ApiClient(http)
                    conversations = [await api.new_conversation() for _ in range(20)]
                    streaming = trio.Semaphore(0)

                    async def seen(received: int) -> None:
                        if received == 1:
                            streaming.release()

                    async with trio.open_nursery() as clients:
                        for cid in conversations:
                            stream = streams[cid] = Stream(0)
                            clients.start_soon(read_until_gone, api, cid, stream, seen)
                        for _ in conversations:
                            await streaming.acquire()
                        # What each client has received by now, once checkpoints have saved it
                        # (seen in the database, not assumed from the clock), is what the kill
                        # must not lose.
                        received = {cid: len(streams[cid].text) for cid in conversations}
                        checkpointed = await wait_checkpointed(api, received)
                        server.kill_all()
                assert await server.exited() == -signal.SIGKILL
        finally:
            server.kill_all()  # only if a failure above left it running
    # Everything it wrote before it was killed.
    server.log.assert_clean()

    restarted = await start_chatsrv(lease_s=1.0, sweep_interval_s=0.2)
    with trio.fail_after(15):
        replies = await wait_until_final(restarted, conversations)

    for cid, reply in zip(conversations, replies, strict=True):
        assert (reply["status"], reply["stop_reason"]) == ("interrupted", "server_crash")
        assert streams[cid].text.startswith(reply["content"])
        assert len(reply["content"]) >= checkpointed[cid] >= received[cid] > 0


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
        try:
            with trio.fail_after(40):
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                    api = ApiClient(http)
                    conversations = [await api.new_conversation() for _ in range(5)]
                    streaming = trio.Semaphore(0)

                    async def seen(received: int) -> None:
                        if received == 1:
                            streaming.release()

                    async with trio.open_nursery() as clients:
                        for cid in conversations:
                            stream = streams[cid] = Stream(0)
                            clients.start_soon(partial(api.stream, cid, on_delta=seen, into=stream))
                        for _ in conversations:
                            await streaming.acquire()
                        pg_proxy.proxy.down()
                        server.process.send_signal(signal.SIGTERM)
                assert await server.exited() == 0, server.output()
        finally:
            server.kill_all()  # only if a failure above left it running
    # With the database down, no final commit can succeed within the persist grace: the
    # persister says so, at ERROR, for each reply it journals instead.
    server.log.assert_clean(r" ERROR chatsrv\.persister: turn \S+: no final commit within ")

    [journal] = journal_dir.glob("*/*.jsonl")
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
