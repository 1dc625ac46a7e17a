"""Durability inside one running server: checkpoints while a reply streams, idempotent sends,
readiness, and two servers sharing a database without taking each other's rows."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
import trio

from tests.server import Chatsrv, StartChatsrv

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
    assert len(await chatsrv.messages(conversation_id)) == 2


async def test_the_same_idempotency_key_sent_concurrently_generates_once(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    upstream.script.tokens = TOKENS[:5]
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    responses: list[httpx.Response] = []
    four_answered = trio.Event()

    async def send() -> None:
        responses.append(await post(chatsrv, conversation_id, "hi", "key-2"))
        if len(responses) == 4:
            four_answered.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(send)
            # Four requests are answered while the first turn is held at its first token.
            await four_answered.wait()
            upstream.release(5)

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 409, 409, 409, 409]
    conflict = next(r for r in responses if r.status_code == 409).json()["error"]
    assert conflict["code"] == "turn_in_progress"
    winner = next(r for r in responses if r.status_code == 200)
    assert conflict["message_id"] in winner.text
    assert len(upstream.requests) == 1
    assert len(await chatsrv.messages(conversation_id)) == 2


async def test_an_idempotency_key_reused_for_another_message_is_refused(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    conversation_id = await chatsrv.new_conversation()
    assert (await post(chatsrv, conversation_id, "hi", "key-3")).status_code == 200
    response = await post(chatsrv, conversation_id, "something else", "key-3")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert len(await chatsrv.messages(conversation_id)) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "bad\x01key"])
async def test_a_malformed_idempotency_key_is_refused(
    chatsrv: Chatsrv, upstream: Any, key: str
) -> None:
    conversation_id = await chatsrv.new_conversation()
    response = await chatsrv.client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"content": "hi"},
        headers={"Idempotency-Key": key},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_header"
    assert await chatsrv.messages(conversation_id) == []
    assert upstream.requests == []


async def test_readiness(chatsrv: Chatsrv) -> None:
    response = await chatsrv.client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})
    chatsrv.service.engine.drain()
    response = await chatsrv.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
    assert "draining" in response.json()["error"]["message"]


async def test_a_sweeper_never_takes_another_live_servers_rows(
    start_chatsrv: StartChatsrv, upstream: Any
) -> None:
    # Two servers on one database, with leases far shorter than the reply, and no checkpoint
    # to renew the lease in passing: only the process-wide renewal keeps the row.
    knobs = {"lease_s": 0.5, "sweep_interval_s": 0.1, "checkpoint_interval_s": 60.0}
    streaming, sweeping = await start_chatsrv(**knobs), await start_chatsrv(**knobs)
    upstream.script.tokens = TOKENS[:3]
    upstream.script.gated = True
    conversation_id = await streaming.new_conversation()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            upstream.release(1)
            stream = await streaming.stream_until(nursery, conversation_id)
            # Four lease periods, forty sweeps by the other server: real time has to pass.
            await trio.sleep(2.0)
            [_, reply] = await sweeping.messages(conversation_id)
            assert reply["status"] == "streaming"
            upstream.release(2)

    assert stream.done is not None and stream.done["status"] == "complete"
    [_, reply] = await sweeping.messages(conversation_id)
    assert (reply["status"], reply["content"]) == ("complete", "".join(TOKENS[:3]))
