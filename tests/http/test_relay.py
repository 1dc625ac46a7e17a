"""The relay on its own: a Turn fed by hand, read as SSE bytes. Deterministic (autojump clock)."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import trio
import trio.testing

from chatsrv.engine import Outcome, Status, Turn
from chatsrv.http import PING, keep_alive, relay
from chatsrv.store import LOCAL_USER_ID


def make_turn(deserted: list[Turn] | None = None) -> Turn:
    return Turn(
        conversation_id="c",
        user=LOCAL_USER_ID,
        user_message_id="u",
        message_id="m",
        model="x",
        deadline=trio.current_time() + 600,
        started_at="2026-01-01T00:00:00.000000+00:00",
        on_deserted=(deserted if deserted is not None else []).append,
    )


def finish(turn: Turn, status: Status = Status.COMPLETE, stop_reason: str = "stop") -> None:
    turn.outcome = Outcome(status, stop_reason)
    turn.persisted = True
    turn.finish()


async def test_waiting_deltas_go_out_as_one_event() -> None:
    turn = make_turn()
    events = relay(turn)
    assert (await events.__anext__()).startswith(b"event: start\n")
    for text in ("a", "bc", "déf"):
        turn.extend([text])
    delta = await events.__anext__()
    assert delta == b'id: 6\nevent: delta\ndata: {"content":"abcd\xc3\xa9f"}\n\n'
    finish(turn)
    done = await events.__anext__()
    assert done == (
        b'event: done\ndata: {"message_id":"m","status":"complete","stop_reason":"stop"}\n\n'
    )
    await events.aclose()


async def test_relays_before_and_after_a_fold_get_the_same_text() -> None:
    """Reading ``content`` (the persister does, at each checkpoint) folds the deltas received so
    far into one string; a relay that had read part of them, and one that had read none, go on
    from where they were."""
    turn = make_turn()
    early, late = relay(turn), relay(turn)
    await early.__anext__()
    await late.__anext__()
    turn.extend(["a", "bc"])
    assert await early.__anext__() == b'id: 3\nevent: delta\ndata: {"content":"abc"}\n\n'
    turn.extend(["dé"])
    assert turn.content == "abcdé"  # the fold
    turn.extend(["f"])
    assert await early.__anext__() == b'id: 6\nevent: delta\ndata: {"content":"d\xc3\xa9f"}\n\n'
    assert await late.__anext__() == b'id: 6\nevent: delta\ndata: {"content":"abcd\xc3\xa9f"}\n\n'
    turn.extend(["g"])
    assert turn.content == "abcdéfg"  # a fold with both relays past the previous one
    for events in (early, late):
        assert await events.__anext__() == b'id: 7\nevent: delta\ndata: {"content":"g"}\n\n'

    finish(turn)
    for events in (early, late):
        assert (await events.__anext__()).startswith(b"event: done\n")
        await events.aclose()


async def test_relay_does_not_wait_to_batch(autojump_clock: trio.testing.MockClock) -> None:
    turn = make_turn()
    events = relay(turn)
    await events.__anext__()
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def read_one() -> None:
            received.append(await events.__anext__())

        nursery.start_soon(read_one)
        await trio.testing.wait_all_tasks_blocked()
        turn.extend(["x"])
        start = trio.current_time()
    assert received == [b'id: 1\nevent: delta\ndata: {"content":"x"}\n\n']
    assert trio.current_time() == start
    await events.aclose()


async def test_keep_alive_pings_only_quiet_streams(autojump_clock: trio.testing.MockClock) -> None:
    """keep_alive looks every heartbeat / 2: a stream quiet since its last look gets a ping, so
    none stays silent longer than the heartbeat; a stream with deltas gets none."""
    busy, quiet = make_turn(), make_turn()
    received: dict[Turn, list[tuple[float, bytes]]] = {busy: [], quiet: []}

    async def read(turn: Turn) -> None:
        async for event in relay(turn):
            received[turn].append((trio.current_time(), event))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(keep_alive, lambda: [busy, quiet], heartbeat_s=10))
        nursery.start_soon(read, busy)
        nursery.start_soon(read, quiet)
        # A delta every 3 s: each of keep_alive's 5 s windows holds one strictly inside it, so
        # the look at t = 15, due with a delta, finds the stream busy whichever runs first.
        for _ in range(9):
            await trio.sleep(3)
            busy.extend(["x"])
        await trio.sleep(1)  # t = 28
        finish(busy)
        finish(quiet)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert [at for at, event in received[quiet] if event == PING] == [10, 15, 20, 25]
    quiet_times = [at for at, _ in received[quiet]]
    assert max(b - a for a, b in itertools.pairwise(quiet_times)) == 10  # the heartbeat
    assert [event for _, event in received[busy] if event == PING] == []
    for turn in (busy, quiet):
        assert received[turn][-1][1].startswith(b"event: done\n")


async def test_only_the_last_relay_leaving_deserts_the_turn(autojump_clock: Any) -> None:
    turn = make_turn()
    first, second = relay(turn), relay(turn)
    await first.__anext__()
    await second.__anext__()
    assert turn.relays == 2
    with trio.fail_after(60):  # virtual time
        await turn.wait_attended()
        await first.aclose()
        with trio.move_on_after(10) as still_attended:
            await turn.wait_deserted()
        assert still_attended.cancelled_caught and turn.relays == 1
        await second.aclose()
        await turn.wait_deserted()
    assert turn.relays == 0


async def test_the_last_relay_leaving_tells_the_engine_at_once_unless_the_turn_ended() -> None:
    deserted: list[Turn] = []
    turn = make_turn(deserted)
    first, second = relay(turn), relay(turn)
    await first.__anext__()
    await second.__anext__()
    await first.aclose()
    assert deserted == []
    await second.aclose()  # in the leaving relay's own step: no task switch before the stop
    assert deserted == [turn]
    ended: list[Turn] = []
    finished = make_turn(ended)
    events = relay(finished)
    finish(finished)
    assert (await events.__anext__()).startswith(b"event: start\n")
    await events.aclose()
    assert ended == []


async def test_a_resumed_relay_starts_after_its_offset_then_goes_on_live() -> None:
    turn = make_turn()
    turn.extend(["ab", "cdé"])
    turn.content  # noqa: B018  (a fold, as a checkpoint makes: the offset crosses it)
    turn.extend(["f"])
    events = relay(turn, after=3)
    assert await events.__anext__() == b'id: 6\nevent: delta\ndata: {"content":"d\xc3\xa9f"}\n\n'
    turn.extend(["gh"])
    assert await events.__anext__() == b'id: 8\nevent: delta\ndata: {"content":"gh"}\n\n'
    finish(turn)
    assert (await events.__anext__()).startswith(b"event: done\n")
    await events.aclose()
    at_the_end = [chunk async for chunk in relay(turn, after=8)]
    assert len(at_the_end) == 1 and at_the_end[0].startswith(b"event: done\n")


async def test_failed_turn_sends_error_then_done() -> None:
    turn = make_turn()
    turn.extend(["partial"])
    turn.outcome = Outcome(Status.FAILED, "upstream_error", "upstream_status", "HTTP 500")
    turn.persisted = True
    turn.finish()
    body = b"".join([chunk async for chunk in relay(turn)])
    events = body.split(b"\n\n")[:-1]
    assert [event.split(b"\n")[0] for event in events] == [
        b"event: start",
        b"id: 7",
        b"event: error",
        b"event: done",
    ]
    assert b'"code":"upstream_status"' in events[2]
