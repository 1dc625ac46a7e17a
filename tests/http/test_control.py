"""Control over a running reply, against a real server on both stores: cancel (here and from
another server), the disconnect policies, and the list of running turns.

Rules: every stream is read with a real HTTP client and SSE parser; exact points come from the
gated fake upstream (tokens go out as the test releases them); every test has a time limit.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import httpx
import pytest
import trio

from tests.server import Chatsrv, StartChatsrv, Stream

TOKENS = [f"w{i} " for i in range(12)]
TEXT = "".join(TOKENS)


async def post(chatsrv: Chatsrv, path: str) -> httpx.Response:
    return await chatsrv.client.post(path)


# --- cancel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_ms", [0.0, 40.0])
@pytest.mark.parametrize("where", ["here", "on another server"])
async def test_cancel_stops_the_reply_and_keeps_the_servers_copy(
    start_chatsrv: StartChatsrv, upstream: Any, where: str, frame_ms: float
) -> None:
    start = partial(start_chatsrv, checkpoint_interval_s=0.05, frame_ms=frame_ms)
    owner = await start()
    canceller = owner if where == "here" else await start()
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    conversation_id = await owner.new_conversation()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            upstream.release(5)
            first = await owner.stream_until(nursery, conversation_id, lambda s: len(s.text) > 0)
            await upstream.wait_tokens_sent(5)
            response = await post(canceller, f"/v1/messages/{first.message_id}/cancel")
    assert response.status_code == 200
    message = response.json()
    assert (message["status"], message["stop_reason"]) == ("cancelled", "user_cancelled")
    if frame_ms:
        # The server's copy: every token it had read when the cancel came. The frame's wait
        # is cut short, so those the upstream sent within the frame's last wait are not read.
        kept = message["content"]
        assert kept in {"".join(TOKENS[:n]) for n in range(1, 6)}, kept
    else:
        # The server's full copy: every token the upstream sent before the cancel.
        assert message["content"] == "".join(TOKENS[:5])
    # Whatever the client got, the server holds: no more, no less.
    assert first.text == message["content"]
    assert first.done is not None
    assert (first.done["status"], first.done["stop_reason"]) == ("cancelled", "user_cancelled")
    again = await post(canceller, f"/v1/messages/{first.message_id}/cancel")
    assert again.status_code == 200 and again.json() == message


async def test_cancel_of_a_finished_reply_changes_nothing(chatsrv: Chatsrv, upstream: Any) -> None:
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        first = await chatsrv.stream(conversation_id)
        before = await chatsrv.message(first.message_id)
        response = await post(chatsrv, f"/v1/messages/{first.message_id}/cancel")
    assert response.status_code == 200
    assert response.json() == before
    assert before["status"] == "complete"


async def test_cancel_of_no_reply_is_a_404(chatsrv: Chatsrv, upstream: Any) -> None:
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        first = await chatsrv.stream(conversation_id)
        user = await post(chatsrv, f"/v1/messages/{first.start['user_message_id']}/cancel")
        missing = await post(chatsrv, "/v1/messages/00000000-0000-4000-8000-000000000000/cancel")
        not_an_id = await post(chatsrv, "/v1/messages/nope/cancel")
    for response in (user, missing, not_an_id):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


# --- disconnect policies -----------------------------------------------------------------------


async def leave_after_first_delta(
    chatsrv: Chatsrv, conversation_id: str, on_disconnect: Any
) -> Stream:
    stream = await chatsrv.read_events(
        "POST",
        f"/v1/conversations/{conversation_id}/messages",
        json={"content": "hi", "on_disconnect": on_disconnect},
        until=lambda stream: bool(stream.deltas),
    )
    assert stream.deltas, stream.events
    return stream


async def test_finish_generates_to_the_end_without_a_client(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        upstream.release(1)
        gone = await leave_after_first_delta(chatsrv, conversation_id, "finish")
        turn = chatsrv.service.engine.turn(gone.message_id, user=None)
        assert turn is not None
        await turn.wait_deserted()  # the server has seen its only client leave
        upstream.release(len(TOKENS))
        await chatsrv.wait_finished(gone.message_id)
    message = await chatsrv.message(gone.message_id)
    assert (message["status"], message["stop_reason"], message["content"]) == (
        "complete",
        "stop",
        TEXT,
    )


async def test_a_grace_keeps_the_turn_for_a_client_that_comes_back(
    chatsrv: Chatsrv, upstream: Any
) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        upstream.release(1)
        gone = await leave_after_first_delta(chatsrv, conversation_id, {"grace_s": 30})
        back = Stream(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(chatsrv.resume, gone.message_id, len(gone.text), into=back))
            upstream.release(len(TOKENS))
    assert gone.text + back.text == TEXT
    assert back.done is not None and back.done["status"] == "complete"


async def test_a_grace_that_expires_stops_the_turn(chatsrv: Chatsrv, upstream: Any) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        upstream.release(2)
        gone = await leave_after_first_delta(chatsrv, conversation_id, {"grace_s": 0.5})
        turn = chatsrv.service.engine.turn(gone.message_id, user=None)
        assert turn is not None
        await turn.wait_deserted()
        left_at = trio.current_time()
        await chatsrv.wait_finished(gone.message_id)
        # Not at once, as "cancel" would: only once the grace has passed.
        assert trio.current_time() - left_at >= 0.4
    message = await chatsrv.message(gone.message_id)
    assert (message["status"], message["stop_reason"]) == ("interrupted", "resume_grace_expired")
    assert message["content"].startswith(gone.text)


@pytest.mark.parametrize(
    "policy", ["later", {"grace_s": 0}, {"grace_s": -1}, {"grace_s": "5"}, {"seconds": 5}, 5]
)
async def test_a_bad_disconnect_policy_is_a_422_that_writes_nothing(
    chatsrv: Chatsrv, upstream: Any, policy: Any
) -> None:
    conversation_id = await chatsrv.new_conversation()
    response = await chatsrv.client.post(
        f"/v1/conversations/{conversation_id}/messages",
        json={"content": "hi", "on_disconnect": policy},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert await chatsrv.messages(conversation_id) == []


# --- the running turns ---------------------------------------------------------------------


async def test_running_turns_are_listed_with_their_offsets(chatsrv: Chatsrv, upstream: Any) -> None:
    upstream.script.tokens = TOKENS
    upstream.script.gated = True
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            upstream.release(3)
            first = await chatsrv.stream_until(
                nursery, conversation_id, lambda s: s.text == "".join(TOKENS[:3])
            )
            listed = (await chatsrv.client.get("/v1/turns")).json()
            upstream.release(len(TOKENS))
        after = (await chatsrv.client.get("/v1/turns")).json()
    (turn,) = listed["turns"]
    assert turn["message_id"] == first.message_id
    assert turn["conversation_id"] == conversation_id
    assert turn["offset"] == len("".join(TOKENS[:3]))
    assert turn["owner"] == chatsrv.service.engine.owner
    assert turn["started_at"] == (await chatsrv.message(first.message_id))["created_at"]
    assert after == {"turns": []}


# --- continue ------------------------------------------------------------------------------------

MORE = [f"m{i} " for i in range(6)]


async def end_early(start_chatsrv: StartChatsrv, upstream: Any, how: str) -> tuple[Chatsrv, str]:
    """A server and the id of a reply that ended early, as ``how`` says, after two tokens."""
    chatsrv = await start_chatsrv(turn_deadline_s=2.0 if how == "timed_out" else 600.0)
    upstream.script.tokens = TOKENS
    upstream.script.gated = how != "failed"
    if how == "failed":
        upstream.script.fail_after = 2
    conversation_id = await chatsrv.new_conversation(system="be brief")
    with trio.fail_after(20):
        if how == "interrupted":
            upstream.release(2)
            gone = await leave_after_first_delta(chatsrv, conversation_id, "cancel")
            message_id = gone.message_id
        else:
            async with trio.open_nursery() as nursery:
                upstream.release(2)
                first = await chatsrv.stream_until(
                    nursery, conversation_id, lambda s: s.text == TEXT[: len(TOKENS[0]) * 2]
                )
                message_id = first.message_id
                if how == "cancelled":
                    await upstream.wait_tokens_sent(2)
                    await post(chatsrv, f"/v1/messages/{message_id}/cancel")
        await chatsrv.wait_finished(message_id)
    message = await chatsrv.message(message_id)
    assert message["status"] == how, message
    upstream.script = type(upstream.script)(tokens=MORE)
    return chatsrv, message_id


async def continue_reply(
    chatsrv: Chatsrv, message_id: str, *, leave_at_first_delta: bool = False, **body: Any
) -> Stream:
    return await chatsrv.read_events(
        "POST",
        f"/v1/messages/{message_id}/continue",
        json=body,
        until=(lambda stream: bool(stream.deltas)) if leave_at_first_delta else None,
    )


@pytest.mark.parametrize("how", ["interrupted", "cancelled", "timed_out", "failed"])
async def test_a_reply_that_ended_early_continues_in_the_same_message(
    start_chatsrv: StartChatsrv, upstream: Any, how: str
) -> None:
    chatsrv, message_id = await end_early(start_chatsrv, upstream, how)
    before = await chatsrv.message(message_id)
    prefix = before["content"]
    assert prefix.startswith("".join(TOKENS[:2])) or (how == "interrupted" and prefix)
    with trio.fail_after(20):
        more = await continue_reply(chatsrv, message_id)
    assert more.status_code == 200
    assert more.start["message_id"] == message_id
    assert more.text == "".join(MORE)
    assert more.ids[0] > len(prefix) and more.ids[-1] == len(prefix) + len("".join(MORE))
    assert more.done is not None
    assert (more.done["status"], more.done["stop_reason"]) == ("complete", "stop")
    after = await chatsrv.message(message_id)
    assert after["content"] == prefix + "".join(MORE)
    assert (after["status"], after["error"], after["created_at"]) == (
        "complete",
        None,
        before["created_at"],
    )
    # The upstream was given the conversation with the partial reply, and asked to go on.
    prompt = upstream.requests[-1]["messages"]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert prompt[2]["content"] == prefix
    assert "Continue" in prompt[3]["content"]
    # One message, grown: the conversation reads as one question and one answer.
    messages = await chatsrv.messages(before["conversation_id"])
    assert [m["role"] for m in messages] == ["user", "assistant"]
    # And the whole reply resumes like any other.
    whole = await chatsrv.resume(message_id)
    assert whole.text == after["content"]


async def test_a_reply_with_nothing_yet_is_asked_again(
    start_chatsrv: StartChatsrv, upstream: Any
) -> None:
    chatsrv = await start_chatsrv()
    upstream.script.tokens = TOKENS
    upstream.script.fail_after = 0  # broken before the first token
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        failed = await chatsrv.stream(conversation_id, "hi")
        upstream.script = type(upstream.script)(tokens=MORE)
        more = await continue_reply(chatsrv, failed.message_id)
    assert failed.done is not None and failed.done["status"] == "failed"
    assert more.text == "".join(MORE) and more.ids[-1] == len("".join(MORE))
    assert [m["role"] for m in upstream.requests[-1]["messages"]] == ["user"]


async def test_a_continuation_cut_short_keeps_what_its_client_got(
    start_chatsrv: StartChatsrv, upstream: Any
) -> None:
    chatsrv, message_id = await end_early(start_chatsrv, upstream, "cancelled")
    prefix = (await chatsrv.message(message_id))["content"]
    upstream.script.gated = True
    with trio.fail_after(20):
        upstream.release(2)
        gone = await continue_reply(chatsrv, message_id, leave_at_first_delta=True)
        await chatsrv.wait_finished(message_id)
    stored = await chatsrv.message(message_id)
    assert (stored["status"], stored["stop_reason"]) == ("interrupted", "client_disconnected")
    assert stored["content"].startswith(prefix + gone.text)
    assert len(gone.text) > 0


async def test_only_a_reply_that_ended_early_can_continue(chatsrv: Chatsrv, upstream: Any) -> None:
    upstream.script.tokens = TOKENS
    conversation_id = await chatsrv.new_conversation()
    with trio.fail_after(20):
        done = await chatsrv.stream(conversation_id)
        before = await chatsrv.count_rows()
        complete = await post(chatsrv, f"/v1/messages/{done.message_id}/continue")
        user = await post(chatsrv, f"/v1/messages/{done.start['user_message_id']}/continue")
        missing = await post(chatsrv, "/v1/messages/00000000-0000-4000-8000-000000000000/continue")
        bad = await chatsrv.client.post(
            f"/v1/messages/{done.message_id}/continue", json={"on_disconnect": "later"}
        )
    assert complete.status_code == 409
    assert complete.json()["error"]["code"] == "not_continuable"
    assert [user.status_code, missing.status_code, bad.status_code] == [404, 404, 422]
    assert await chatsrv.count_rows() == before
    assert (await chatsrv.message(done.message_id))["status"] == "complete"
    assert len(upstream.requests) == 1


async def test_one_continuation_at_a_time(start_chatsrv: StartChatsrv, upstream: Any) -> None:
    chatsrv, message_id = await end_early(start_chatsrv, upstream, "cancelled")
    upstream.script.gated = True
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            first = Stream(0)
            nursery.start_soon(partial(_continue_into, chatsrv, message_id, first))
            await upstream.wait_requests(2)
            second = await post(chatsrv, f"/v1/messages/{message_id}/continue")
            upstream.release(len(MORE))
    assert second.status_code == 409 and second.json()["error"]["code"] == "not_continuable"
    assert first.text == "".join(MORE)


async def _continue_into(chatsrv: Chatsrv, message_id: str, into: Stream) -> None:
    stream = await continue_reply(chatsrv, message_id)
    into.events.extend(stream.events)
    into.status_code = stream.status_code
