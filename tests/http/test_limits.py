"""Limits and ids: the turns one process runs at once (``CHATSRV_MAX_ACTIVE_TURNS``, then 503
before anything is written), and ids that are not UUIDs, which find nothing on every route
(404, never a database error)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.server import Chatsrv, StartChatsrv, rows

NOT_IDS = ["nope", "1", "0" * 36, "00000000-0000-4000-8000-00000000000g", "x" * 5000, "%00"]


async def test_a_turn_past_the_process_limit_is_a_503_that_writes_nothing(
    start_chatsrv: StartChatsrv, upstream: Any
) -> None:
    chatsrv = await start_chatsrv(max_active_turns=2)
    upstream.script.tokens = ["a ", "b "]
    upstream.script.stall_after = 1  # both turns run until they are cancelled
    conversations = [await chatsrv.new_conversation() for _ in range(3)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            first = await chatsrv.stream_until(nursery, conversations[0])
            second = await chatsrv.stream_until(nursery, conversations[1])
            before = await chatsrv.count_rows()
            refused = await chatsrv.client.post(
                f"/v1/conversations/{conversations[2]}/messages", json={"content": "hi"}
            )
            after = await chatsrv.count_rows()
            for stream in (first, second):
                await chatsrv.client.post(f"/v1/messages/{stream.message_id}/cancel")
        upstream.script.stall_after = None
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "too_many_turns"
    assert refused.headers["Retry-After"]
    assert after == before == rows(3, 4)
    assert first.done is not None and second.done is not None
    # The turns have ended: there is room again.
    with trio.fail_after(20):
        third = await chatsrv.stream(conversations[2])
    assert third.done is not None and third.done["status"] == "complete"


@pytest.mark.parametrize("not_an_id", NOT_IDS)
async def test_an_id_that_is_not_a_uuid_finds_nothing_on_every_route(
    chatsrv: Chatsrv, upstream: Any, not_an_id: str
) -> None:
    routes = [
        ("GET", "/v1/conversations/{}"),
        ("DELETE", "/v1/conversations/{}"),
        ("GET", "/v1/conversations/{}/messages"),
        ("POST", "/v1/conversations/{}/messages"),
        ("GET", "/v1/messages/{}"),
        ("GET", "/v1/messages/{}/events"),
        ("POST", "/v1/messages/{}/cancel"),
        ("POST", "/v1/messages/{}/continue"),
    ]
    with trio.fail_after(20):
        for method, path in routes:
            response = await chatsrv.client.request(
                method, path.format(not_an_id), json={"content": "hi"} if method == "POST" else None
            )
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "not_found"
    assert await chatsrv.count_rows() == rows(0, 0)
    assert upstream.requests == []
