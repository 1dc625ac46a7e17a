"""The HTTP contract, v1, against a real server: routes, shapes, SSE framing, and bad input
answered with a 4xx JSON error that writes nothing (rows counted in the database itself, not
read back through the API)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from tests.server import Chatsrv, rows


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


async def test_healthz(chatsrv: Chatsrv) -> None:
    response = await chatsrv.client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_conversation_lifecycle(chatsrv: Chatsrv) -> None:
    response = await chatsrv.client.post(
        "/v1/conversations", json={"title": "t", "model": "m", "system": "be brief"}
    )
    assert response.status_code == 201
    created = response.json()
    uuid.UUID(created["id"])
    assert (created["title"], created["model"], created["system"]) == ("t", "m", "be brief")

    response = await chatsrv.client.get(f"/v1/conversations/{created['id']}")
    assert response.json() == created
    listed = (await chatsrv.client.get("/v1/conversations")).json()["conversations"]
    assert created in listed

    response = await chatsrv.client.delete(f"/v1/conversations/{created['id']}")
    assert response.status_code == 204
    assert_error(await chatsrv.client.get(f"/v1/conversations/{created['id']}"), 404, "not_found")
    assert_error(
        await chatsrv.client.delete(f"/v1/conversations/{created['id']}"), 404, "not_found"
    )


async def test_complete_turn(chatsrv: Chatsrv, upstream: Any) -> None:
    upstream.script.tokens = ["Hello", ",", " world", "!"]
    conversation_id = await chatsrv.new_conversation(system="You are terse.")

    stream = await chatsrv.stream(conversation_id, "hi there")

    assert stream.status_code == 200
    names = [event.event for event in stream.events]
    assert names[0] == "start" and names[-1] == "done"
    assert set(names[1:-1]) == {"delta"}
    # Each delta's id is the reply's length so far.
    length = 0
    for event in stream.deltas:
        length += len(orjson.loads(event.data)["content"])
        assert event.id == str(length)
    assert stream.text == "Hello, world!"
    assert stream.done is not None
    assert stream.done["message_id"] == stream.message_id
    assert (stream.done["status"], stream.done["stop_reason"]) == ("complete", "stop")
    assert stream.done["usage"]["completion_tokens"] > 0
    assert stream.start["conversation_id"] == conversation_id

    user, assistant = await chatsrv.messages(conversation_id)
    assert (user["id"], user["role"], user["content"], user["status"]) == (
        stream.start["user_message_id"],
        "user",
        "hi there",
        "complete",
    )
    assert (assistant["id"], assistant["role"], assistant["status"]) == (
        stream.message_id,
        "assistant",
        "complete",
    )
    assert assistant["content"] == "Hello, world!"
    assert assistant["stop_reason"] == "stop"
    assert assistant["usage"] == stream.done["usage"]
    response = await chatsrv.client.get(f"/v1/messages/{stream.message_id}")
    assert response.json() == assistant
    # In the database itself: one conversation, one user row, one assistant row. (This also
    # shows that count_rows, which the bad-input tests rely on, sees the server's database.)
    assert await chatsrv.count_rows() == rows(1, 2)

    sent = upstream.requests[-1]
    assert sent["model"] == "fake-model"
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi there"},
    ]


async def test_second_turn_sends_history_and_model(chatsrv: Chatsrv, upstream: Any) -> None:
    upstream.script.tokens = ["one"]
    conversation_id = await chatsrv.new_conversation(model="conversation-model")
    await chatsrv.stream(conversation_id, "first")
    assert upstream.requests[-1]["model"] == "conversation-model"

    upstream.script.tokens = ["two"]
    stream = await chatsrv.stream(conversation_id, "second", model="request-model")

    assert stream.text == "two"
    assert upstream.requests[-1]["model"] == "request-model"
    assert upstream.requests[-1]["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
    ]
    messages = await chatsrv.messages(conversation_id)
    assert [m["content"] for m in messages] == ["first", "one", "second", "two"]
    assert messages[3]["model"] == "request-model"


async def test_sse_headers(chatsrv: Chatsrv) -> None:
    conversation_id = await chatsrv.new_conversation()
    async with chatsrv.client.stream(
        "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": "hi"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        await response.aread()


BAD_MESSAGES = [
    pytest.param(b"{not json", 400, "invalid_json", id="malformed-json"),
    pytest.param(b"[]", 422, "invalid_request", id="not-an-object"),
    pytest.param(b"{}", 422, "invalid_request", id="missing-content"),
    pytest.param(b'{"content": ""}', 422, "invalid_request", id="empty-content"),
    pytest.param(b'{"content": "  \\n"}', 422, "invalid_request", id="blank-content"),
    pytest.param(b'{"content": 5}', 422, "invalid_request", id="content-not-string"),
    pytest.param(b'{"content": null}', 422, "invalid_request", id="content-null"),
    pytest.param(b'{"content": "hi", "model": 7}', 422, "invalid_request", id="model-not-string"),
    pytest.param(b'{"content": "hi", "model": ""}', 422, "invalid_request", id="model-empty"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_MESSAGES)
async def test_bad_message_writes_nothing(
    chatsrv: Chatsrv, upstream: Any, body: bytes, status: int, code: str
) -> None:
    conversation_id = await chatsrv.new_conversation()
    assert await chatsrv.count_rows() == rows(1, 0)
    response = await chatsrv.client.post(
        f"/v1/conversations/{conversation_id}/messages",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert_error(response, status, code)
    assert await chatsrv.count_rows() == rows(1, 0)
    assert upstream.requests == []


async def test_too_long_message_writes_nothing(start_chatsrv: Any, upstream: Any) -> None:
    chatsrv = await start_chatsrv(max_message_chars=10)
    conversation_id = await chatsrv.new_conversation()
    assert await chatsrv.count_rows() == rows(1, 0)
    response = await chatsrv.client.post(
        f"/v1/conversations/{conversation_id}/messages", json={"content": "x" * 11}
    )
    assert_error(response, 422, "invalid_request")
    assert await chatsrv.count_rows() == rows(1, 0)
    assert upstream.requests == []


@pytest.mark.parametrize("conversation_id", [str(uuid.uuid4()), "not-a-uuid"])
async def test_unknown_conversation(chatsrv: Chatsrv, upstream: Any, conversation_id: str) -> None:
    response = await chatsrv.client.post(
        f"/v1/conversations/{conversation_id}/messages", json={"content": "hi"}
    )
    assert_error(response, 404, "not_found")
    assert await chatsrv.count_rows() == rows(0, 0)
    assert_error(await chatsrv.client.get(f"/v1/conversations/{conversation_id}"), 404, "not_found")
    response = await chatsrv.client.get(f"/v1/conversations/{conversation_id}/messages")
    assert_error(response, 404, "not_found")
    assert upstream.requests == []


async def test_unknown_message(chatsrv: Chatsrv) -> None:
    for message_id in (str(uuid.uuid4()), "nope"):
        assert_error(await chatsrv.client.get(f"/v1/messages/{message_id}"), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param(b"{nope", 400, "invalid_json", id="malformed-json"),
        pytest.param(b'{"title": 5}', 422, "invalid_request", id="title-not-string"),
        pytest.param(b'{"system": ["x"]}', 422, "invalid_request", id="system-not-string"),
        pytest.param(b'"title"', 422, "invalid_request", id="not-an-object"),
    ],
)
async def test_bad_conversation_writes_nothing(
    chatsrv: Chatsrv, body: bytes, status: int, code: str
) -> None:
    assert await chatsrv.count_rows() == rows(0, 0)
    response = await chatsrv.client.post(
        "/v1/conversations", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, status, code)
    assert await chatsrv.count_rows() == rows(0, 0)


async def test_unknown_route_and_method_are_json(chatsrv: Chatsrv) -> None:
    assert_error(await chatsrv.client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(await chatsrv.client.put("/v1/conversations"), 405, "method_not_allowed")


async def test_list_limit_is_validated(chatsrv: Chatsrv) -> None:
    for limit in ("0", "-1", "abc", "1001"):
        response = await chatsrv.client.get("/v1/conversations", params={"limit": limit})
        assert_error(response, 422, "invalid_request")
    first = await chatsrv.new_conversation(title="a")
    second = await chatsrv.new_conversation(title="b")
    for limit, expected in (("1", [second]), ("2", [second, first])):
        listed = (await chatsrv.client.get("/v1/conversations", params={"limit": limit})).json()
        assert [c["id"] for c in listed["conversations"]] == expected


async def test_oversized_body_is_refused(start_chatsrv: Any, upstream: Any) -> None:
    chatsrv = await start_chatsrv(max_message_chars=1000)
    conversation_id = await chatsrv.new_conversation()
    assert await chatsrv.count_rows() == rows(1, 0)
    response = await chatsrv.client.post(
        f"/v1/conversations/{conversation_id}/messages",
        content=b'{"content": "' + b"x" * (200 * 1024) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 413, "request_entity_too_large")
    assert await chatsrv.count_rows() == rows(1, 0)
    assert upstream.requests == []


async def test_nul_characters(chatsrv: Chatsrv, upstream: Any) -> None:
    conversation_id = await chatsrv.new_conversation()
    response = await chatsrv.client.post(
        f"/v1/conversations/{conversation_id}/messages", json={"content": "a\x00b"}
    )
    assert_error(response, 422, "invalid_request")
    assert await chatsrv.count_rows() == rows(1, 0)
    assert upstream.requests == []

    # From the upstream, where JSON allows it: replaced, so that what is relayed is stored.
    upstream.script.tokens = ["x\x00", "y"]
    stream = await chatsrv.stream(conversation_id)
    assert stream.text == "x\ufffdy"
    assert (await chatsrv.messages(conversation_id))[1]["content"] == "x\ufffdy"
    assert await chatsrv.count_rows() == rows(1, 2)
