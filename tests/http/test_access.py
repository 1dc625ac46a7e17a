"""Access with API keys (``CHATSRV_AUTH=keys``): a request without a valid key is a 401 with
``WWW-Authenticate: Bearer``; a user sees only their own conversations, and another user's id is
answered byte for byte as a missing one on every route; a user's streams are limited; a revoked
key stops working; Idempotency-Keys are each user's own; and with keys off every request is the
user 'local', who owns what was made before keys were turned on.

A real chatsrv on loopback with the fake upstream; keys are made through the store, as
``chatsrv keys create`` makes them (tests/test_cli.py runs the command itself).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from chatsrv.http._auth import FRESH_S
from tests.server import ApiClient, Chatsrv, StartChatsrv, Stream

# Every route a user's request can take, with a placeholder for the id it names.
CONVERSATION_ROUTES = [
    ("GET", "/v1/conversations/{}"),
    ("DELETE", "/v1/conversations/{}"),
    ("GET", "/v1/conversations/{}/messages"),
    ("POST", "/v1/conversations/{}/messages"),
]
MESSAGE_ROUTES = [
    ("GET", "/v1/messages/{}"),
    ("GET", "/v1/messages/{}/events"),
    ("POST", "/v1/messages/{}/cancel"),
    ("POST", "/v1/messages/{}/continue"),
]
LISTS = [("GET", "/v1/conversations"), ("POST", "/v1/conversations"), ("GET", "/v1/turns")]


class User(ApiClient):
    def __init__(self, chatsrv: Chatsrv, key: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=chatsrv.client.base_url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30.0,
        )


@pytest.fixture
async def keyed(start_chatsrv: StartChatsrv) -> Chatsrv:
    return await start_chatsrv(auth="keys")


async def new_user(chatsrv: Chatsrv, name: str) -> AsyncIterator[User]:
    _, key = await chatsrv.service.store.create_key(name)
    user = User(chatsrv, key)
    try:
        yield user
    finally:
        await user.client.aclose()


@pytest.fixture
async def alice(keyed: Chatsrv) -> AsyncIterator[User]:
    async for user in new_user(keyed, "alice"):
        yield user


@pytest.fixture
async def bob(keyed: Chatsrv) -> AsyncIterator[User]:
    async for user in new_user(keyed, "bob"):
        yield user


async def cancel(user: User, message_id: str) -> dict[str, Any]:
    response = await user.client.post(f"/v1/messages/{message_id}/cancel")
    assert response.status_code == 200, response.text
    message: dict[str, Any] = response.json()
    return message


def body_for(method: str) -> dict[str, Any] | None:
    return {"content": "hi"} if method == "POST" else None


# -- Keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Basic YWxpY2U6c2VjcmV0", "Bearer csk_nope_nope", "csk_x"],
)
async def test_a_request_without_a_valid_key_is_a_401_with_a_bearer_challenge_on_every_route(
    keyed: Chatsrv, upstream: Any, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    some_id = str(uuid.uuid4())
    routes = [(method, path.format(some_id)) for method, path in CONVERSATION_ROUTES]
    routes += [(method, path.format(some_id)) for method, path in MESSAGE_ROUTES]
    routes += LISTS
    async with httpx.AsyncClient(base_url=keyed.client.base_url, headers=headers) as client:
        with trio.fail_after(20):
            for method, path in routes:
                response = await client.request(method, path, json=body_for(method))
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["WWW-Authenticate"] == 'Bearer realm="chatsrv"'
                assert response.json()["error"]["code"] == "unauthorized"
            # Probes and the API's description need no key.
            for path in ("/healthz", "/readyz", "/openapi.json"):
                assert (await client.get(path)).status_code == 200, path
    assert await keyed.count_rows() == {"conversations": 0, "messages": 0}
    assert upstream.requests == []


async def test_a_revoked_key_is_refused_within_the_time_a_verdict_is_kept(
    keyed: Chatsrv, alice: User
) -> None:
    keys = await keyed.service.store.list_keys()
    [alices] = [key for key in keys if key["user"] == "alice"]
    with trio.fail_after(20):
        assert (await alice.client.get("/v1/conversations")).status_code == 200
        assert await keyed.service.store.revoke_key(alices["id"])
        revoked_at = trio.current_time()
        await trio.sleep(FRESH_S)
        refused = await alice.client.get("/v1/conversations")
    assert refused.status_code == 401, refused.text
    assert trio.current_time() - revoked_at < 1.0
    assert not await keyed.service.store.revoke_key(alices["id"])  # once only
    [listed] = [key for key in await keyed.service.store.list_keys() if key["id"] == alices["id"]]
    assert listed["revoked_at"] is not None


async def test_a_key_is_stored_only_as_a_digest(keyed: Chatsrv) -> None:
    record, key = await keyed.service.store.create_key("carol")
    assert key.startswith(f"csk_{record['id']}_")
    assert len(key) > 40
    dump = await keyed.service.store._call(_dump_api_keys(keyed))
    assert key not in dump
    assert key.split("_")[-1] not in dump  # nor its secret part


def _dump_api_keys(chatsrv: Chatsrv) -> Any:
    from sqlalchemy import text

    async def dump() -> str:
        async with chatsrv.service.store._engine.connect() as conn:
            rows = (await conn.execute(text("SELECT * FROM api_keys"))).all()
        return repr(rows)

    return dump()


# -- Isolation -----------------------------------------------------------------------------------


async def test_another_users_ids_are_answered_exactly_as_missing_ones_on_every_route(
    keyed: Chatsrv, alice: User, bob: User, upstream: Any
) -> None:
    upstream.script.tokens = ["a ", "b ", "c ", "d "]
    with trio.fail_after(30):
        conversation = await alice.new_conversation(title="alice's")
        complete = await alice.stream(conversation)
        assert complete.done is not None and complete.done["status"] == "complete"
        cancelled = await _cancelled_reply(alice, conversation, upstream)
        async with trio.open_nursery() as nursery:
            upstream.script.stall_after = 1  # alice's third reply streams until cancelled
            running = await alice.stream_until(nursery, conversation)
            before_rows = await keyed.count_rows()
            before_messages = await alice.messages(conversation)
            ids = [conversation, complete.message_id, cancelled, running.message_id]
            for method, path in CONVERSATION_ROUTES + MESSAGE_ROUTES:
                for alices_id in ids:
                    theirs = await bob.client.request(
                        method, path.format(alices_id), json=body_for(method)
                    )
                    missing = await bob.client.request(
                        method, path.format(uuid.uuid4()), json=body_for(method)
                    )
                    where = (method, path, alices_id)
                    assert theirs.status_code == 404, (where, theirs.text)
                    assert theirs.content == missing.content, where
                    assert theirs.headers["content-type"] == missing.headers["content-type"]
                    assert theirs.headers.get("content-length") == missing.headers.get(
                        "content-length"
                    )
            # Bob's lists hold nothing of alice's; hers hold her own.
            assert (await bob.client.get("/v1/conversations")).json() == {"conversations": []}
            assert (await bob.client.get("/v1/turns")).json() == {"turns": []}
            alices_turns = (await alice.client.get("/v1/turns")).json()["turns"]
            assert [turn["message_id"] for turn in alices_turns] == [running.message_id]
            # Nothing of alice's was written, cancelled or continued by bob's requests.
            assert await keyed.count_rows() == before_rows
            turn = keyed.service.engine.turn(running.message_id, user=None)
            assert turn is not None and turn.stop_reason is None
            assert (await cancel(alice, running.message_id))["status"] == "cancelled"
        upstream.script.stall_after = None
    # Her finished turns are as they were; her running one ended by her own cancel only.
    after_messages = await alice.messages(conversation)
    assert after_messages[:4] == before_messages[:4]
    assert after_messages[4]["content"] == before_messages[4]["content"] == "hello"
    assert after_messages[5]["status"] == "cancelled"
    assert after_messages[5]["content"] == running.text
    assert len(upstream.requests) == 3  # alice's three turns, nothing for bob


async def _cancelled_reply(user: User, conversation: str, upstream: Any) -> str:
    """A reply of ``user``'s stopped after its first delta: a message that can be continued."""
    upstream.script.stall_after = 1
    async with trio.open_nursery() as nursery:
        stream = await user.stream_until(nursery, conversation)
        await cancel(user, stream.message_id)
    upstream.script.stall_after = None
    assert stream.done is not None and stream.done["status"] == "cancelled"
    return stream.message_id


async def test_a_user_works_only_on_their_own_conversations(
    keyed: Chatsrv, alice: User, bob: User
) -> None:
    with trio.fail_after(30):
        alices = await alice.new_conversation(title="a")
        bobs = await bob.new_conversation(title="b")
        assert await bob.stream(bobs) is not None
        listed = (await alice.client.get("/v1/conversations")).json()["conversations"]
        assert [c["id"] for c in listed] == [alices]
        listed = (await bob.client.get("/v1/conversations")).json()["conversations"]
        assert [c["id"] for c in listed] == [bobs]
        assert (await bob.client.delete(f"/v1/conversations/{alices}")).status_code == 404
        assert (await alice.client.get(f"/v1/conversations/{alices}")).status_code == 200
        assert (await bob.client.delete(f"/v1/conversations/{bobs}")).status_code == 204
    assert await keyed.count_rows() == {"conversations": 1, "messages": 0}


async def test_idempotency_keys_are_each_users_own(
    keyed: Chatsrv, alice: User, bob: User, upstream: Any
) -> None:
    headers = {"Idempotency-Key": "same-key"}
    with trio.fail_after(30):
        alices = await alice.new_conversation()
        bobs = await bob.new_conversation()
        first = await alice.read_events(
            "POST", f"/v1/conversations/{alices}/messages", json={"content": "hi"}, headers=headers
        )
        mine = await bob.read_events(
            "POST", f"/v1/conversations/{bobs}/messages", json={"content": "hi"}, headers=headers
        )
        # Bob naming alice's conversation with her key finds nothing to replay.
        theirs = await bob.client.post(
            f"/v1/conversations/{alices}/messages", json={"content": "hi"}, headers=headers
        )
        again = await alice.read_events(
            "POST", f"/v1/conversations/{alices}/messages", json={"content": "hi"}, headers=headers
        )
    assert mine.message_id != first.message_id
    assert theirs.status_code == 404, (alices, bobs, theirs.text)
    assert again.message_id == first.message_id and again.text == first.text
    assert len(upstream.requests) == 2


# -- Limits --------------------------------------------------------------------------------------


async def test_a_users_streams_past_the_limit_are_a_429_that_writes_nothing(
    start_chatsrv: StartChatsrv, upstream: Any
) -> None:
    chatsrv = await start_chatsrv(auth="keys", max_streams_per_user=2)
    upstream.script.tokens = ["a ", "b "]
    upstream.script.stall_after = 1
    async for alice in new_user(chatsrv, "alice"):
        async for bob in new_user(chatsrv, "bob"):
            with trio.fail_after(30):
                conversations = [await alice.new_conversation() for _ in range(3)]
                bobs = await bob.new_conversation()
                async with trio.open_nursery() as nursery:
                    streams = [await alice.stream_until(nursery, c) for c in conversations[:2]]
                    before = await chatsrv.count_rows()
                    refused = await alice.client.post(
                        f"/v1/conversations/{conversations[2]}/messages", json={"content": "hi"}
                    )
                    after = await chatsrv.count_rows()
                    # The limit is alice's: bob may still stream.
                    bobs_stream = await bob.stream_until(nursery, bobs)
                    for stream in [*streams, bobs_stream]:
                        await cancel(alice if stream in streams else bob, stream.message_id)
                upstream.script.stall_after = None
                # Her replies have ended: there is room again, for a new one or a continuation.
                continued = await alice.read_events(
                    "POST", f"/v1/messages/{streams[0].message_id}/continue"
                )
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_streams"
    assert refused.headers["Retry-After"] == "2"
    assert after == before
    assert continued.done is not None and continued.done["status"] == "complete"


async def test_a_continuation_past_the_users_limit_is_a_429_that_changes_nothing(
    start_chatsrv: StartChatsrv, upstream: Any
) -> None:
    chatsrv = await start_chatsrv(auth="keys", max_streams_per_user=1)
    upstream.script.tokens = ["a ", "b "]
    async for alice in new_user(chatsrv, "alice"):
        with trio.fail_after(30):
            conversation = await alice.new_conversation()
            cancelled = await _cancelled_reply(alice, conversation, upstream)
            before = await alice.message(cancelled)
            upstream.script.stall_after = 1
            async with trio.open_nursery() as nursery:
                running = await alice.stream_until(nursery, await alice.new_conversation())
                refused = await alice.client.post(f"/v1/messages/{cancelled}/continue")
                await cancel(alice, running.message_id)
            upstream.script.stall_after = None
            assert await alice.message(cancelled) == before
    assert refused.status_code == 429, refused.text


# -- Keys off ------------------------------------------------------------------------------------


async def test_with_keys_off_every_request_is_the_local_user_who_keeps_them_when_keys_come(
    start_chatsrv: StartChatsrv, upstream: Any, database_url: str
) -> None:
    keyless = await start_chatsrv()
    with trio.fail_after(30):
        made = await keyless.new_conversation(title="before keys")
        assert (await keyless.stream(made)).done is not None
        # A key sent to a keyless server changes nothing: it is the local user's request.
        listed = await keyless.client.get(
            "/v1/conversations", headers={"Authorization": "Bearer whatever"}
        )
        assert [c["id"] for c in listed.json()["conversations"]] == [made]
        keyed = await start_chatsrv(auth="keys", database_url=database_url)
        async for local in new_user(keyed, "local"):
            listed = await local.client.get("/v1/conversations")
            assert [c["id"] for c in listed.json()["conversations"]] == [made]
            assert len(await local.messages(made)) == 2
        async for alice in new_user(keyed, "alice"):
            assert (await alice.client.get(f"/v1/conversations/{made}")).status_code == 404


async def test_a_stream_read_with_a_key_can_be_resumed_only_with_its_users_key(
    keyed: Chatsrv, alice: User, bob: User, upstream: Any
) -> None:
    upstream.script.tokens = [f"t{i} " for i in range(6)]
    with trio.fail_after(30):
        conversation = await alice.new_conversation()
        first = await alice.stream(conversation, disconnect_after=2)
        await keyed.wait_finished(first.message_id)
        resumed: Stream = await alice.resume(first.message_id, first.ids[-1])
        refused = await bob.client.get(
            f"/v1/messages/{first.message_id}/events",
            headers={"Last-Event-ID": str(first.ids[-1])},
        )
    assert resumed.status_code == 200 and resumed.done is not None
    assert refused.status_code == 404


async def test_the_published_contract_says_which_routes_need_a_key(
    keyed: Chatsrv, chatsrv: Chatsrv
) -> None:
    spec = (await keyed.client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["security"] == [{"apiKey": []}]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path in ("/healthz", "/readyz"):
                assert operation["security"] == [], path
                assert "401" not in operation["responses"], path
            else:
                assert "401" in operation["responses"], (method, path)
    for path in (
        "/v1/conversations/{conversation_id}/messages",
        "/v1/messages/{message_id}/continue",
    ):
        assert "429" in spec["paths"][path]["post"]["responses"]
    keyless = (await chatsrv.client.get("/openapi.json")).json()
    assert "security" not in keyless and "securitySchemes" not in keyless["components"]
