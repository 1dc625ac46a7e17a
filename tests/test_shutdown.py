"""SIGTERM to chatsrv deployed as documented — ``hypercorn -c <config> "chatsrv.app:create_app()"``
in a real subprocess — while 20 replies stream, each longer than hypercorn's graceful_timeout.

Every reply is committed ``interrupted``/``server_shutdown`` with at least what its client
received, and hypercorn exits 0. With the grace shorter than ``graceful_timeout`` (the shipped
configuration) every client also gets its ``done`` event; with it longer, hypercorn closes the
connections first and the replies are committed all the same. Either way hypercorn logs no
traceback and no error.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from chatsrv.store import LOCAL_USER_ID, Store
from tests.processes import chatsrv_environment, start_hypercorn
from tests.server import ApiClient, Stream

STREAMS = 20
TOKENS = [f"w{i} " for i in range(2000)]  # at 20 ms a token: 40 s, far beyond any grace here


@pytest.mark.parametrize(
    ("grace_s", "graceful_timeout", "clients_get_done", "to_the_group"),
    [
        # After the grace, the final commits and the `done` events have 5 s before hypercorn
        # would close the connections: a margin a loaded machine keeps, and it costs nothing,
        # since hypercorn stops as soon as the last connection has closed.
        pytest.param(1.0, 6.0, True, False, id="grace-within-graceful-timeout"),
        pytest.param(5.0, 1.0, False, False, id="graceful-timeout-first"),
        # systemd's default KillMode, `kill -- -PGID`: the worker gets SIGTERM too.
        pytest.param(1.0, 6.0, True, True, id="to-the-process-group"),
    ],
)
async def test_sigterm_commits_every_streaming_reply(
    database_url: str,
    upstream: Any,
    tmp_path: Path,
    grace_s: float,
    graceful_timeout: float,
    clients_get_done: bool,
    to_the_group: bool,
) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.interval_s = 0.02
    env = chatsrv_environment(
        database_url=database_url,
        llm_provider="openai",
        llm_base_url=upstream.base_url,
        llm_api_key="test-key",
        shutdown_grace_s=str(grace_s),
        heartbeat_s="0.5",
        log_level="WARNING",
        journal_dir=str(tmp_path / "journal"),
    )
    streams: dict[str, Stream] = {}
    async with trio.open_nursery() as nursery:
        server = await start_hypercorn(nursery, tmp_path, env, graceful_timeout=graceful_timeout)
        process = server.process
        try:
            with trio.fail_after(45):
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                    api = ApiClient(http)
                    conversations = [await api.new_conversation() for _ in range(STREAMS)]
                    streaming = trio.Semaphore(0)

                    async def client(conversation_id: str) -> None:
                        async def seen(received: int) -> None:
                            if received == 1:
                                streaming.release()

                        stream = Stream(0)
                        streams[conversation_id] = stream
                        try:
                            await api.stream(conversation_id, on_delta=seen, into=stream)
                        except httpx.RemoteProtocolError:
                            assert not clients_get_done, "the connection was cut before `done`"

                    async with trio.open_nursery() as clients:
                        for conversation_id in conversations:
                            clients.start_soon(client, conversation_id)
                        for _ in conversations:
                            await streaming.acquire()
                        if to_the_group:
                            os.killpg(process.pid, signal.SIGTERM)
                        else:
                            process.send_signal(signal.SIGTERM)
                # The client's idle connections are closed now: hypercorn need not wait for them.
                assert await server.exited() == 0, server.output()
        finally:
            server.kill_all()  # only if a failure above left it running
    server.log.assert_clean()

    with trio.fail_after(10):
        async with Store.open(database_url) as store:
            stored = {cid: await store.list_messages(cid, user=LOCAL_USER_ID) for cid in streams}
    for conversation_id, stream in streams.items():
        messages = stored[conversation_id]
        assert messages is not None
        [reply] = [m for m in messages if m["role"] == "assistant"]
        assert (reply["status"], reply["stop_reason"]) == ("interrupted", "server_shutdown")
        assert reply["content"].startswith(stream.text) and stream.text
        if clients_get_done:
            assert stream.done == {
                "message_id": reply["id"],
                "status": "interrupted",
                "stop_reason": "server_shutdown",
            }
