"""CORS for browser clients on other origins: off by default, and with ``CHATSRV_CORS_ORIGINS``
the origins listed (only those) may call every route, with the headers a chat page needs
(``Content-Type``, ``Idempotency-Key``, ``Last-Event-ID`` for a resumed ``EventSource``,
``Authorization``)."""

from __future__ import annotations

from typing import Any

import trio

from tests.server import StartChatsrv

PAGE = "https://chat.example.com"


def preflight(method: str, headers: str) -> dict[str, str]:
    return {
        "Origin": PAGE,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


async def test_no_origin_is_allowed_by_default(start_chatsrv: StartChatsrv, upstream: Any) -> None:
    chatsrv = await start_chatsrv()
    with trio.fail_after(10):
        response = await chatsrv.client.get("/v1/conversations", headers={"Origin": PAGE})
        options = await chatsrv.client.options(
            "/v1/conversations", headers=preflight("POST", "content-type")
        )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in options.headers


async def test_a_listed_origin_may_post_stream_and_resume(
    start_chatsrv: StartChatsrv, upstream: Any
) -> None:
    chatsrv = await start_chatsrv(cors_origins=[PAGE, "http://localhost:5173"])
    conversation_id = await chatsrv.new_conversation()
    path = f"/v1/conversations/{conversation_id}/messages"
    with trio.fail_after(20):
        options = await chatsrv.client.options(
            path,
            headers=preflight("POST", "content-type,idempotency-key,last-event-id,authorization"),
        )
        stream = await chatsrv.client.post(path, json={"content": "hi"}, headers={"Origin": PAGE})
        other = await chatsrv.client.get(
            "/v1/conversations", headers={"Origin": "https://elsewhere.example"}
        )
    assert options.status_code == 200
    assert options.headers["access-control-allow-origin"] == PAGE
    allowed = {
        h.strip().lower() for h in options.headers["access-control-allow-headers"].split(",")
    }
    assert {"content-type", "idempotency-key", "last-event-id", "authorization"} <= set(allowed)
    assert "POST" in options.headers["access-control-allow-methods"]
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["access-control-allow-origin"] == PAGE
    assert "access-control-allow-credentials" not in stream.headers
    assert "access-control-allow-origin" not in other.headers
