"""Two chatsrv processes on one PostgreSQL, as two hypercorn workers or hosts are: a reply is
resumed, kept alive, cancelled and listed from the process that does not run it, and resumed
after the process that ran it was killed.

Rules: real hypercorn subprocesses (``tests/processes.py``) on loopback ports, the fake upstream
through the real SDK, PostgreSQL only (the cross-process path is PostgreSQL's: on SQLite there is
one process). The upstream is paced; every wait is on an observed fact under a time limit; both
servers' logs must be clean.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.processes import Hypercorn, chatsrv_environment, start_hypercorn
from tests.server import ApiClient, Stream

TOKENS = [f"w{i} " for i in range(100)]
TEXT = "".join(TOKENS)


@contextlib.asynccontextmanager
async def two_servers(
    tmp_path: Path, postgresql_url: str, upstream: Any, **settings: str
) -> AsyncIterator[tuple[ApiClient, ApiClient, list[Hypercorn]]]:
    """Two chatsrv processes on the same database; stopped (SIGTERM) and their logs checked on
    the way out."""
    servers: list[Hypercorn] = []
    async with trio.open_nursery() as nursery:
        try:
            for name in ("one", "two"):
                (tmp_path / name).mkdir()
                env = chatsrv_environment(
                    database_url=postgresql_url,
                    llm_base_url=upstream.base_url,
                    llm_api_key="test-key",
                    journal_dir=str(tmp_path / name / "journal"),
                    heartbeat_s="0.5",
                    log_level="WARNING",
                    **settings,
                )
                servers.append(
                    await start_hypercorn(nursery, tmp_path / name, env, graceful_timeout=2.0)
                )
            async with (
                httpx.AsyncClient(base_url=servers[0].url, timeout=30) as one,
                httpx.AsyncClient(base_url=servers[1].url, timeout=30) as two,
            ):
                yield ApiClient(one), ApiClient(two), servers
            for server in servers:
                if server.process.returncode is None:
                    server.process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                for server in servers:
                    await server.exited()
        finally:
            for server in servers:
                server.kill_all()  # only if a failure above left it running


async def test_a_reply_resumes_on_the_other_process_with_the_exact_text(
    tmp_path: Path, postgresql_url: str, upstream: Any
) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.interval_s = 0.02
    async with two_servers(tmp_path, postgresql_url, upstream) as (one, two, servers):
        conversation_id = await one.new_conversation()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                first = await one.stream_until(
                    nursery, conversation_id, lambda s: len(s.deltas) >= 5
                )
                after = first.ids[-1]
                resumed = await two.resume(first.message_id, after)
    assert resumed.status_code == 200
    assert "start" not in [event.event for event in resumed.events]
    assert resumed.text == TEXT[after:]
    assert resumed.ids == sorted(set(resumed.ids)) and resumed.ids[-1] == len(TEXT)
    assert first.text == TEXT and resumed.done == first.done
    for server in servers:
        server.log.assert_clean()


async def test_an_offset_past_the_reply_is_refused_by_the_other_process(
    tmp_path: Path, postgresql_url: str, upstream: Any
) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    async with two_servers(tmp_path, postgresql_url, upstream) as (one, two, servers):
        conversation_id = await one.new_conversation()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                upstream.release(3)
                first = await one.stream_until(
                    nursery, conversation_id, lambda s: s.text == "".join(TOKENS[:3])
                )
                # Past what the owner holds, though nothing is checkpointed yet: it answers.
                past = await two.client.get(
                    f"/v1/messages/{first.message_id}/events",
                    headers={"Last-Event-ID": str(len(first.text) + 1)},
                )
                upstream.release(len(TOKENS))
    assert past.status_code == 400
    assert past.json()["error"]["code"] == "offset_out_of_range"
    for server in servers:
        server.log.assert_clean()


async def test_a_client_resumed_on_the_other_process_keeps_the_turn_going(
    tmp_path: Path, postgresql_url: str, upstream: Any
) -> None:
    """The client leaves the process that runs the turn, with a 1 s grace, and resumes on the
    other: the turn goes on past the grace, to its end."""
    upstream.script.tokens = TOKENS
    upstream.script.interval_s = 0.04  # 4 s in all
    async with two_servers(tmp_path, postgresql_url, upstream) as (one, two, servers):
        conversation_id = await one.new_conversation()
        with trio.fail_after(30):
            gone = await one.read_events(
                "POST",
                f"/v1/conversations/{conversation_id}/messages",
                json={"content": "hi", "on_disconnect": {"grace_s": 1}},
                until=lambda stream: len(stream.deltas) == 3,
            )
            resumed = await two.resume(gone.message_id, gone.ids[-1])
    assert gone.text + resumed.text == TEXT
    assert resumed.done is not None
    assert (resumed.done["status"], resumed.done["stop_reason"]) == ("complete", "stop")
    for server in servers:
        server.log.assert_clean()


async def test_cancel_and_the_turn_list_from_the_other_process(
    tmp_path: Path, postgresql_url: str, upstream: Any
) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    async with two_servers(tmp_path, postgresql_url, upstream) as (one, two, servers):
        conversation_id = await one.new_conversation()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                upstream.release(4)
                first = await one.stream_until(
                    nursery, conversation_id, lambda s: s.text == "".join(TOKENS[:4])
                )
                listed = (await two.client.get("/v1/turns")).json()["turns"]
                cancelled = await two.client.post(f"/v1/messages/{first.message_id}/cancel")
    assert [turn["message_id"] for turn in listed] == [first.message_id]
    assert cancelled.status_code == 200
    message = cancelled.json()
    assert (message["status"], message["stop_reason"]) == ("cancelled", "user_cancelled")
    assert message["content"] == first.text == "".join(TOKENS[:4])
    assert first.done is not None and first.done["status"] == "cancelled"
    for server in servers:
        server.log.assert_clean()


async def test_a_reply_whose_process_was_killed_resumes_to_its_swept_end(
    tmp_path: Path, postgresql_url: str, upstream: Any
) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.interval_s = 0.05
    async with two_servers(
        tmp_path, postgresql_url, upstream, checkpoint_interval_s="0.2", lease_s="1.0"
    ) as (one, two, servers):
        conversation_id = await one.new_conversation()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                first, resumed = Stream(0), Stream(0)
                nursery.start_soon(_post_into, one, conversation_id, first)
                await _until(lambda: len(first.deltas) >= 10)
                nursery.start_soon(partial(two.resume, first.message_id, 0, into=resumed))
                await _until(lambda: len(resumed.deltas) >= 10)  # the follow is under way
                servers[0].kill_all()
                assert await servers[0].exited() == -signal.SIGKILL
        stored = (await two.client.get(f"/v1/messages/{first.message_id}")).json()
    assert resumed.done is not None
    assert (resumed.done["status"], resumed.done["stop_reason"]) == (
        "interrupted",
        "server_crash",
    )
    assert stored["status"] == "interrupted" and stored["content"]
    # What was saved by the last checkpoint; the follower may have been sent more before the
    # kill (as the owner's own clients are), and is told so.
    assert resumed.text.startswith(stored["content"])
    if len(resumed.text) > len(stored["content"]):
        assert [error["code"] for error in resumed.errors] == ["reply_truncated"]
    else:
        assert resumed.errors == []
    for server in servers[1:]:
        server.log.assert_clean()


async def _post_into(api: ApiClient, conversation_id: str, into: Stream) -> None:
    """Read a POST stream until it ends or its server is killed."""
    with contextlib.suppress(httpx.RemoteProtocolError, httpx.ReadError):
        await api.stream(conversation_id, into=into)


async def _until(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds, looking every 10 ms (the caller bounds the time)."""
    while not condition():  # noqa: ASYNC110  (a client's progress, observed from outside)
        await trio.sleep(0.01)


pytestmark = pytest.mark.usefixtures("upstream")


async def test_a_reply_resumes_after_its_server_was_killed_and_restarted(
    tmp_path: Path, postgresql_url: str, upstream: Any
) -> None:
    """The only server is killed mid-reply and a new one starts: a client that resumes from a
    checkpointed offset gets the rest of the last checkpoint and ``done`` with the swept status."""
    upstream.script.tokens = TOKENS
    upstream.script.interval_s = 0.05
    settings = {"checkpoint_interval_s": "0.2", "lease_s": "1.0", "sweep_interval_s": "0.2"}
    async with two_servers(tmp_path, postgresql_url, upstream, **settings) as (one, _, servers):
        servers[1].kill_all()  # this scenario has one server at a time
        assert await servers[1].exited() == -signal.SIGKILL
        conversation_id = await one.new_conversation()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                first = Stream(0)
                nursery.start_soon(_post_into, one, conversation_id, first)
                await _until(lambda: len(first.deltas) >= 10)
                # Polling the row: a checkpoint is a fact of the database, with no event here.
                while len((checkpoint := await one.message(first.message_id))["content"]) < 10:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                servers[0].kill_all()
                assert await servers[0].exited() == -signal.SIGKILL
            (tmp_path / "again").mkdir()
            env = chatsrv_environment(
                database_url=postgresql_url,
                llm_base_url=upstream.base_url,
                llm_api_key="test-key",
                journal_dir=str(tmp_path / "again" / "journal"),
                log_level="WARNING",
                **settings,
            )
            async with trio.open_nursery() as nursery:
                again = await start_hypercorn(nursery, tmp_path / "again", env, graceful_timeout=2)
                try:
                    async with httpx.AsyncClient(base_url=again.url, timeout=30) as http:
                        resumed = await ApiClient(http).resume(first.message_id, 10)
                        stored = await ApiClient(http).message(first.message_id)
                    again.process.send_signal(signal.SIGTERM)
                    assert await again.exited() == 0
                finally:
                    again.kill_all()
    assert resumed.status_code == 200
    assert resumed.done is not None
    assert (resumed.done["status"], resumed.done["stop_reason"]) == (
        "interrupted",
        "server_crash",
    )
    assert stored["content"].startswith(checkpoint["content"])
    assert resumed.text == stored["content"][10:]
    assert first.text.startswith(stored["content"])
    again.log.assert_clean()
