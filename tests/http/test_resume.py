"""Streams a client can come back to, against a real server on both stores: resuming with
``Last-Event-ID`` (live, followed from another server, replayed when finished), and an
idempotent retry attaching to its turn (``test_control.py`` has cancel, the disconnect policies
and the list of running turns).

Rules: every stream is read with a real HTTP client and SSE parser; exact points come from the
gated fake upstream (tokens go out as the test releases them); every test has a time limit.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from chatsrv.store import LOCAL_USER_ID
from tests.server import Chatsrv, StartChatsrv, Stream

TOKENS = [f"w{i} " for i in range(12)]
TEXT = "".join(TOKENS)


async def post(chatsrv: Chatsrv, path: str, **kwargs: Any) -> httpx.Response:
    return await chatsrv.client.post(path, **kwargs)


# --- a finished reply -----------------------------------------------------------------------


async def test_a_finished_reply_resumes_at_every_offset(chatsrv: Chatsrv, upstream: Any) -> None:
    upstream.script.tokens = TOKENS
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(30):
        first = await chatsrv.stream(conversation_id)
        assert first.text == TEXT
        for after in range(len(TEXT) + 1):
            resumed = await chatsrv.resume(first.message_id, after)
            assert resumed.status_code == 200
            assert [event.event for event in resumed.events][-1] == "done"
            assert "start" not in [event.event for event in resumed.events]
            assert resumed.text == TEXT[after:], after
            assert resumed.done == first.done
            if after < len(TEXT):
                assert resumed.ids == [len(TEXT)]


async def test_without_last_event_id_a_stream_starts_with_its_start_event(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    upstream.script.tokens = TOKENS
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        first = await chatsrv.stream(conversation_id)
        again = await chatsrv.resume(first.message_id)
    assert again.start == first.start
    assert again.text == TEXT
    assert again.done == first.done


async def test_the_header_wins_over_the_query_parameter(chatsrv: Chatsrv, upstream: Any) -> None:
    # An EventSource opened with ?last_event_id=N sends the newer Last-Event-ID when it
    # reconnects, with the same URL.
    upstream.script.tokens = TOKENS
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        first = await chatsrv.stream(conversation_id)
        by_query = await chatsrv.resume(first.message_id, query=3)
        both = await chatsrv.resume(first.message_id, 7, query=3)
    assert by_query.text == TEXT[3:]
    assert both.text == TEXT[7:]


@pytest.mark.parametrize("value", ["x", "-1", "1.5", "١٢", "9" * 16])
async def test_an_offset_that_is_not_a_number_is_a_400(
    chatsrv: Chatsrv, upstream: Any, value: str
) -> None:
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        first = await chatsrv.stream(conversation_id)
        by_header = await chatsrv.client.get(
            f"/v1/messages/{first.message_id}/events",
            headers={b"Last-Event-ID": value.encode()},  # as UTF-8, as a browser would not
        )
        by_query = await chatsrv.client.get(
            f"/v1/messages/{first.message_id}/events", params={"last_event_id": value}
        )
    for response in (by_header, by_query):
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_last_event_id"


async def test_an_offset_past_a_finished_reply_is_a_400(chatsrv: Chatsrv, upstream: Any) -> None:
    upstream.script.tokens = TOKENS
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        first = await chatsrv.stream(conversation_id)
        response = await chatsrv.client.get(
            f"/v1/messages/{first.message_id}/events",
            headers={"Last-Event-ID": str(len(TEXT) + 1)},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "offset_out_of_range"


async def test_only_an_existing_assistant_message_has_a_stream(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        first = await chatsrv.stream(conversation_id)
        missing = await chatsrv.client.get(
            "/v1/messages/00000000-0000-4000-8000-000000000000/events"
        )
        not_an_id = await chatsrv.client.get("/v1/messages/nope/events")
        user = await chatsrv.client.get(f"/v1/messages/{first.start['user_message_id']}/events")
    for response in (missing, not_an_id, user):
        assert response.status_code == 404
        assert response.json() == {"error": {"code": "not_found", "message": "message not found"}}


# --- a running turn, on the server that runs it ---------------------------------------------


async def test_a_running_reply_resumes_live_at_random_offsets(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    """While the reply streams, clients come in at random offsets already sent and leave at
    random points; each receives exactly the characters after its offset, up to where it left.
    The POST's own client stays to the end, so the turn never loses its last client."""
    tokens = [f"t{i} " for i in range(60)]
    full = "".join(tokens)
    upstream.script.tokens = tokens
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    rng = random.Random(9)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            upstream.release(3)
            length = len("".join(tokens[:3]))
            first = await chatsrv.stream_until(
                nursery, conversation_id, lambda s: len(s.text) == length
            )
            released = 3
            while released < len(tokens):
                step = min(rng.randint(1, 9), len(tokens) - released)
                upstream.release(step)
                released += step
                target = len("".join(tokens[:released]))
                after = rng.randint(0, length)  # an offset some client has seen
                piece = await resume_until(chatsrv, first.message_id, after, target)
                assert piece.text == full[after:target], (after, target)
                assert piece.ids[-1] == target
                length = target
            tail = await chatsrv.resume(first.message_id, length)
    assert tail.text == "" and tail.done is not None and tail.done["status"] == "complete"
    assert first.text == full and first.done == tail.done
    assert (await chatsrv.message(first.message_id))["content"] == full


async def resume_until(chatsrv: Chatsrv, message_id: str, after: int, target: int) -> Stream:
    """Resume after ``after``, read until the delta with id ``target``, then leave."""
    return await chatsrv.resume(
        message_id, after, until=lambda stream: bool(stream.ids) and stream.ids[-1] >= target
    )


async def test_an_offset_past_a_running_reply_is_a_400(chatsrv: Chatsrv, upstream: Any) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            upstream.release(2)
            first = await chatsrv.stream_until(
                nursery, conversation_id, lambda s: s.text == "".join(TOKENS[:2])
            )
            response = await chatsrv.client.get(
                f"/v1/messages/{first.message_id}/events",
                headers={"Last-Event-ID": str(len(first.text) + 1)},
            )
            upstream.release(len(TOKENS))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "offset_out_of_range"
    assert first.text == TEXT


# --- a running turn, from another server on the same database --------------------------------


async def test_a_reply_resumes_on_another_server(
    start_chatsrv: StartChatsrv, upstream: Any
) -> None:
    """Server B follows the reply server A streams: on PostgreSQL through A's notifications
    (which foreign ones on the same channel do not disturb), on SQLite through A's checkpoints."""
    owner = await start_chatsrv(checkpoint_interval_s=0.05)
    other = await start_chatsrv(checkpoint_interval_s=0.05)
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    conversation_id = await owner.new_conversation()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream.release(4)
            first = await owner.stream_until(
                nursery, conversation_id, lambda s: s.text == "".join(TOKENS[:4])
            )
            after = len(TOKENS[0])
            piece = await resume_until(other, first.message_id, after, len(first.text))
            assert piece.text == first.text[after:]
            rest = Stream(0)
            nursery.start_soon(partial(other.resume, first.message_id, len(first.text), into=rest))
            upstream.release(1)
            while not rest.deltas:  # noqa: ASYNC110  (a client's progress, seen from outside)
                await trio.sleep(0.01)
            bus = owner.service.store.bus
            if bus is not None:
                channel = "chatsrv_reply_" + first.message_id.replace("-", "")
                for junk in ("junk", "[1]", '{"at": "x", "text": 1}', '{"at": 0, "text": "zz"}'):
                    await bus.notify(channel, junk)
            upstream.release(len(TOKENS))
    assert rest.text == TEXT[len("".join(TOKENS[:4])) :]
    assert rest.done is not None and rest.done == first.done
    assert (await other.message(first.message_id))["content"] == TEXT


async def test_a_reply_whose_process_died_resumes_to_its_swept_end(
    start_chatsrv: StartChatsrv, upstream: Any
) -> None:
    """A 'streaming' row whose owner stopped renewing its lease: the resumed stream gets the
    last checkpoint, then a done with the swept status."""
    chatsrv = await start_chatsrv(checkpoint_interval_s=0.05, lease_s=0.5)
    store = chatsrv.service.store
    conversation = await store.create_conversation(
        user=LOCAL_USER_ID, title=None, model=None, system=None
    )
    begun = await store.begin_turn(
        conversation["id"],
        user=LOCAL_USER_ID,
        content="hi",
        model=None,
        default_model="m",
        owner="a-process-that-died",
        lease_s=0.5,
        max_streams=chatsrv.service.settings.max_streams_per_user,
    )
    assert begun is not None
    message_id = begun.assistant_message["id"]
    assert await store.checkpoint(
        message_id, content="saved so far", owner="a-process-that-died", lease_s=0.5
    )
    with trio.fail_after(20):
        resumed = await chatsrv.resume(message_id, 5)
    assert resumed.text == "saved so far"[5:]
    assert resumed.done is not None
    assert (resumed.done["status"], resumed.done["stop_reason"]) == (
        "interrupted",
        "server_crash",
    )


# --- an idempotent retry attaches to its turn ------------------------------------------------


async def post_keyed(
    chatsrv: Chatsrv, conversation_id: str, key: str, after: int | None = None
) -> Stream:
    headers = {"Idempotency-Key": key}
    if after is not None:
        headers["Last-Event-ID"] = str(after)
    return await chatsrv.read_events(
        "POST",
        f"/v1/conversations/{conversation_id}/messages",
        json={"content": "hi"},
        headers=headers,
    )


async def test_a_retry_of_a_running_turn_attaches_to_it(chatsrv: Chatsrv, upstream: Any) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    streams: list[Stream] = []

    async def send(after: int | None = None) -> None:
        streams.append(await post_keyed(chatsrv, conversation_id, "key-1", after))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await upstream.wait_requests(1)
            upstream.release(3)
            await upstream.wait_tokens_sent(3)
            for after in (None, None, 2):
                nursery.start_soon(send, after)
            (message_id,) = chatsrv.service.engine.running()
            await chatsrv.wait_attached(message_id, 4)  # the retries attached while it runs
            upstream.release(len(TOKENS))
    assert len(upstream.requests) == 1
    assert [stream.status_code for stream in streams] == [200] * 4
    whole = [stream for stream in streams if stream.events[0].event == "start"]
    assert len(whole) == 3
    assert all(stream.text == TEXT and stream.done == whole[0].done for stream in whole)
    (resumed,) = [stream for stream in streams if stream.events[0].event != "start"]
    assert resumed.text == TEXT[2:]
    assert len(await chatsrv.messages(conversation_id)) == 2
