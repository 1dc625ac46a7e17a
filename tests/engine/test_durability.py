"""Durability inside one running server: checkpoints while a reply streams, idempotent sends,
readiness, and two servers sharing a database without taking each other's rows. What a request
wrote, or did not, is counted in the database itself (``Chatsrv.count_rows``)."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from sqlalchemy import event

from chatsrv.store import LOCAL_USER_ID
from chatsrv.store._store import BACKGROUND_BUSY_MS
from tests.processes import chatsrv_environment, start_hypercorn
from tests.server import ApiClient, Chatsrv, StartChatsrv, rows

TOKENS = [f"t{i} " for i in range(40)]


async def wait_for_checkpoint(chatsrv: Chatsrv, message_id: str, content: str) -> None:
    """Poll the row until a checkpoint has written ``content`` (bounded by the caller)."""
    while True:
        message = (await chatsrv.client.get(f"/v1/messages/{message_id}")).json()
        if message["content"] == content:
            assert message["status"] == "streaming"
            return
        await trio.sleep(0.05)


async def test_a_streaming_reply_is_checkpointed(
    start_chatsrv: StartChatsrv, upstream: Any
) -> None:
    chatsrv = await start_chatsrv(checkpoint_interval_s=0.2)
    upstream.script.tokens = TOKENS[:6]
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream.release(3)
            stream = await chatsrv.stream_until(
                nursery, conversation_id, lambda s: s.text == "".join(TOKENS[:3])
            )
            await wait_for_checkpoint(chatsrv, stream.message_id, "".join(TOKENS[:3]))
            upstream.release(3)

    assert stream.done is not None and stream.done["status"] == "complete"
    message = (await chatsrv.client.get(f"/v1/messages/{stream.message_id}")).json()
    assert (message["status"], message["content"]) == ("complete", "".join(TOKENS[:6]))


async def post(chatsrv: Chatsrv, conversation_id: str, content: str, key: str) -> httpx.Response:
    response = await chatsrv.client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"content": content},
        headers={"Idempotency-Key": key},
    )
    await response.aread()
    return response


def events(response: httpx.Response) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body that has been read whole."""
    pairs = []
    for block in response.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            pairs.append((fields["event"], fields["data"]))
    return pairs


async def test_the_same_idempotency_key_sent_again_replays_the_reply(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    upstream.script.tokens = ["Hel", "lo"]
    conversation_id = await chatsrv.new_conversation()
    first = await post(chatsrv, conversation_id, "hi", "key-1")
    second = await post(chatsrv, conversation_id, "hi", "key-1")

    assert first.status_code == second.status_code == 200
    assert second.headers["content-type"].startswith("text/event-stream")
    replayed = events(second)
    assert [name for name, _ in replayed] == ["start", "delta", "done"]
    original = events(first)
    assert orjson.loads(original[0][1]) == orjson.loads(replayed[0][1])
    assert orjson.loads(original[-1][1]) == orjson.loads(replayed[-1][1])
    assert replayed[1] == ("delta", '{"content":"Hello"}')
    assert len(upstream.requests) == 1
    assert await chatsrv.count_rows() == rows(1, 2)


async def test_the_same_idempotency_key_sent_concurrently_generates_once(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    """Five requests with one key: one turn, one generation; the other four attach to it while
    it runs (it is held at its first token until all five stream it) and get the same stream."""
    upstream.script.tokens = TOKENS[:5]
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    responses: list[httpx.Response] = []

    async def send() -> None:
        responses.append(await post(chatsrv, conversation_id, "hi", "key-2"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(send)
            await upstream.wait_requests(1)
            (message_id,) = chatsrv.service.engine.running()
            await chatsrv.wait_attached(message_id, 5)
            upstream.release(5)

    assert [response.status_code for response in responses] == [200] * 5
    streams = [events(response) for response in responses]  # pings aside
    assert all(stream == streams[0] for stream in streams)
    assert orjson.loads(streams[0][0][1])["message_id"] == message_id
    assert "".join(orjson.loads(d)["content"] for n, d in streams[0] if n == "delta") == "".join(
        TOKENS[:5]
    )
    assert len(upstream.requests) == 1
    assert await chatsrv.count_rows() == rows(1, 2)


async def test_an_idempotency_key_reused_for_another_message_is_refused(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    conversation_id = await chatsrv.new_conversation()
    assert (await post(chatsrv, conversation_id, "hi", "key-3")).status_code == 200
    assert await chatsrv.count_rows() == rows(1, 2)
    response = await post(chatsrv, conversation_id, "something else", "key-3")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert await chatsrv.count_rows() == rows(1, 2)
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "bad\x01key"])
async def test_a_malformed_idempotency_key_is_refused(
    chatsrv: Chatsrv, upstream: Any, key: str
) -> None:
    conversation_id = await chatsrv.new_conversation()
    assert await chatsrv.count_rows() == rows(1, 0)
    response = await chatsrv.client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"content": "hi"},
        headers={"Idempotency-Key": key},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_header"
    assert await chatsrv.count_rows() == rows(1, 0)
    assert upstream.requests == []


async def test_readiness(chatsrv: Chatsrv) -> None:
    response = await chatsrv.client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})
    chatsrv.service.engine.drain()
    response = await chatsrv.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
    assert "draining" in response.json()["error"]["message"]


# The sweeper test's lease: renewed every third of it, so a live server loses its row only if its
# renewal runs two thirds of a lease (1 s) late. Both servers share this process's one Trio
# thread, so a stall of the whole process on a loaded 2-core machine counts against that margin;
# 1 s keeps it while the test stays short (about three leases).
LEASE_S = 1.5
SWEEP_INTERVAL_S = 0.1


class SweepCounter:
    """A ``before_each_statement`` hook counting a server's sweeps, for Trio code to wait on.

    The hook runs on the store's asyncio thread; the count is kept on the Trio side."""

    def __init__(self) -> None:
        self.count = 0
        self._token = trio.lowlevel.current_trio_token()
        self._changed = trio.Event()

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "lease_expires_at <" in statement:  # only the sweep's UPDATE compares leases
            self._token.run_sync_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while self.count < count:
            await self._changed.wait()


async def wait_until_swept(chatsrv: Chatsrv, message_id: str) -> dict[str, Any]:
    """Poll the row until it is no longer streaming (bounded by the caller); return it."""
    while True:
        message: dict[str, Any] = (await chatsrv.client.get(f"/v1/messages/{message_id}")).json()
        if message["status"] != "streaming":
            return message
        await trio.sleep(0.05)


async def test_a_sweeper_never_takes_another_live_servers_rows(
    start_chatsrv: StartChatsrv, upstream: Any, database_url: str, tmp_path: Path
) -> None:
    """Two servers on one database, with leases far shorter than the reply, and no checkpoint to
    renew the lease in passing: only the process-wide renewal keeps the live row.

    The streaming server is a hypercorn process of its own, as another worker or host is: a
    stall of this test's event loop (the sweeping server, the fake upstream, the clients) may
    delay sweeps, never the live server's renewals.

    The positive control, under the same conditions: a row of the streaming server's, begun
    after the live one with the same lease, that no running turn holds, so nothing renews it.
    The other server sweeps it; from then on each of its sweeps finds the live row's first lease
    long expired, so "not swept" means the renewals kept it."""
    knobs = {
        "lease_s": LEASE_S,
        "sweep_interval_s": SWEEP_INTERVAL_S,
        "checkpoint_interval_s": 60.0,
    }
    sweeping = await start_chatsrv(**knobs)
    upstream.script.tokens = TOKENS[:3]
    upstream.script.gated = True
    sweeps = SweepCounter()
    env = chatsrv_environment(
        database_url=database_url,
        llm_base_url=upstream.base_url,
        llm_api_key="test-key",
        journal_dir=str(tmp_path / "streaming-journal"),
        log_level="WARNING",
        **{name: str(value) for name, value in knobs.items()},
    )
    async with trio.open_nursery() as servers:
        process = await start_hypercorn(servers, tmp_path, env, graceful_timeout=2.0)
        try:
            async with httpx.AsyncClient(base_url=process.url, timeout=30) as http:
                streaming = ApiClient(http)
                conversation_id = await streaming.new_conversation()
                control_conversation_id = await streaming.new_conversation()
                with sweeping.before_each_statement(sweeps), trio.fail_after(30):
                    async with trio.open_nursery() as nursery:
                        upstream.release(1)
                        stream = await streaming.stream_until(nursery, conversation_id)
                        [live] = (await sweeping.client.get("/v1/turns")).json()["turns"]
                        control = await sweeping.service.store.begin_turn(
                            control_conversation_id,
                            user=LOCAL_USER_ID,
                            content="control",
                            model=None,
                            default_model="m",
                            owner=live["owner"],  # the streaming process's
                            lease_s=LEASE_S,
                            max_streams=sweeping.service.settings.max_streams_per_user,
                        )
                        assert control is not None
                        control_id = control.assistant_message["id"]
                        swept = await wait_until_swept(sweeping, control_id)
                        assert (swept["status"], swept["stop_reason"]) == (
                            "interrupted",
                            "server_crash",
                        )
                        # One more lease's worth of sweeps, each after the live row's first
                        # lease expired.
                        await sweeps.wait_for(sweeps.count + round(LEASE_S / SWEEP_INTERVAL_S))
                        [_, reply] = await sweeping.messages(conversation_id)
                        assert reply["status"] == "streaming"
                        # Not even for a moment: a sweep sets updated_at (as it did on the
                        # control), and a renewal that took the row back afterwards would not
                        # restore it.
                        assert reply["updated_at"] == reply["created_at"]
                        assert swept["updated_at"] != swept["created_at"]
                        upstream.release(2)
            process.process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                await process.exited()
        finally:
            process.kill_all()
    process.log.assert_clean()

    assert stream.done is not None and stream.done["status"] == "complete"
    [_, reply] = await sweeping.messages(conversation_id)
    assert (reply["status"], reply["content"]) == ("complete", "".join(TOKENS[:3]))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_journal_shared_by_two_databases_replays_each_reply_into_its_own(
    start_chatsrv: StartChatsrv, upstream: Any, tmp_path: Path
) -> None:
    """Two deployments on different databases share one journal directory. A reply journaled
    for the first is left alone by the second (which would have found no row for it, counted
    it applied and removed it: the reply lost), and replayed once the first is back."""
    journal_dir = tmp_path / "shared-journal"
    knobs: dict[str, Any] = {
        "journal_dir": journal_dir,
        "persist_retry_s": 0.5,
        "persist_grace_s": 0.5,
        "sweep_interval_s": SWEEP_INTERVAL_S,
    }
    first_url = f"sqlite+aiosqlite:///{tmp_path / 'first.db'}"
    first = await start_chatsrv(database_url=first_url, **knobs)
    upstream.script.tokens = ["kept ", "apart"]
    conversation_id = await first.new_conversation()

    def final_commits_fail(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE MESSAGES") and "owner=" in statement:
            raise sqlite3.OperationalError("database is locked")

    with first.before_each_statement(final_commits_fail), trio.fail_after(30):
        stream = await first.stream(conversation_id)
        assert first.service.journal.holds_records()
        # The first deployment stops with its reply still in the journal.
        first.service.engine.drain()
        first.shutdown.set()
        await first.service.closed.wait()
    [record] = journal_dir.glob("*/*.jsonl")
    assert stream.message_id.encode() in record.read_bytes()

    second = await start_chatsrv(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'second.db'}", **knobs
    )
    sweeps = SweepCounter()
    with second.before_each_statement(sweeps), trio.fail_after(30):
        await sweeps.wait_for(3)  # three recovery rounds, each replaying first
    assert record.exists() and stream.message_id.encode() in record.read_bytes()
    assert record.parent != second.service.journal.directory

    again = await start_chatsrv(database_url=first_url, **knobs)
    with trio.fail_after(30):
        while (await again.message(stream.message_id))["status"] == "streaming":  # noqa: ASYNC110
            await trio.sleep(0.05)
    stored = await again.message(stream.message_id)
    assert (stored["status"], stored["content"]) == ("complete", "kept apart")
    assert stream.text == "kept apart"


class LateStart:
    """An ``after_cursor_execute`` hook that stalls the store's loop after the first turn's
    INSERT has run (on PostgreSQL it is committed then: one statement, autocommit) until the
    engine's bound on the start has passed: a start that commits after its bound."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.stalled = 0

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not self.stalled and "INSERT INTO messages" in statement:
            self.stalled += 1
            time.sleep(self.stall_s)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("retry", ["at once", "after the sweep"])
async def test_a_start_that_commits_after_its_bound_is_as_if_it_never_happened(
    start_chatsrv: StartChatsrv, upstream: Any, retry: str
) -> None:
    chatsrv = await start_chatsrv(db_timeout_s=1.0, lease_s=4.0, sweep_interval_s=0.2)
    upstream.script.tokens = ["started ", "again"]
    conversation_id = await chatsrv.new_conversation()
    late = LateStart(stall_s=1.5)
    engine = chatsrv.service.store._engine.sync_engine
    event.listen(engine, "after_cursor_execute", late)
    try:
        with trio.fail_after(30):
            refused = await post(chatsrv, conversation_id, "hello", "K")
    finally:
        event.remove(engine, "after_cursor_execute", late)
    assert late.stalled == 1
    assert refused.status_code == 503, refused.text
    [_, lost] = await chatsrv.messages(conversation_id)  # committed after the bound all the same
    assert (lost["status"], lost["content"]) == ("streaming", "")
    if retry == "after the sweep":
        # No turn runs it: this process's own sweeper takes it once its lease has expired.
        with trio.fail_after(30):
            swept = await wait_until_swept(chatsrv, lost["id"])
        assert (swept["status"], swept["stop_reason"]) == ("interrupted", "server_crash")

    with trio.fail_after(30):
        stream = await chatsrv.read_events(
            "POST",
            f"/v1/conversations/{conversation_id}/messages",
            json={"content": "hello"},
            headers={"Idempotency-Key": "K"},
        )
    assert stream.done is not None and stream.done["status"] == "complete"
    assert stream.text == "started again"
    messages = await chatsrv.messages(conversation_id)
    assert [(m["role"], m["status"], m["content"]) for m in messages] == [
        ("user", "complete", "hello"),
        ("assistant", "complete", "started again"),
    ]
    assert lost["id"] not in {m["id"] for m in messages}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_stop_during_a_recovery_round_on_a_locked_sqlite_is_quick(
    start_chatsrv: StartChatsrv, database_url: str
) -> None:
    """Another process holds SQLite's write lock while a recovery round waits for it. SQLite's
    wait cannot be interrupted, so a stop would wait it out (the busy timeout, here 5 s) before
    the pool could close; the background tasks' writes wait at most BACKGROUND_BUSY_MS."""
    chatsrv = await start_chatsrv(db_timeout_s=5.0, sweep_interval_s=0.05)
    waiting = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def background_begin(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement == f"PRAGMA busy_timeout={BACKGROUND_BUSY_MS}":  # a background write
            token.run_sync_soon(waiting.set)

    locker = sqlite3.connect(database_url.split(":///", 1)[1], isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        with chatsrv.before_each_statement(background_begin), trio.fail_after(30):
            await waiting.wait()
            await trio.sleep(0.05)  # into SQLite's wait for the lock
            stopping = trio.current_time()
            chatsrv.service.stop()
            await chatsrv.service.closed.wait()
            took = trio.current_time() - stopping
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert took < 2.0, took
