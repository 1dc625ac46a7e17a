"""The turn engine driven directly, with a scripted provider and a real SQLite store: what is
hard to reach exactly through HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from chatsrv._settings import Settings
from chatsrv.engine import Journal, Persister, Turn, TurnEngine, TurnRequest
from chatsrv.http import relay
from chatsrv.store import LOCAL_USER_ID, Store
from chatsrv.upstream import Completion, Prompt


class BurstProvider:
    """Emits every token at once, as an upstream does when several lines arrive in one read."""

    name = "burst"

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    async def generate(self, prompt: Prompt, emit: Callable[[str], None]) -> Completion:
        for token in self.tokens:
            emit(token)
        await trio.lowlevel.checkpoint()
        return Completion("stop", None)

    async def aclose(self) -> None:
        pass


class GatedStore:
    """The real store, except that ``begin_turn`` waits at a gate the test opens."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.entered = trio.Event()
        self.gate = trio.Event()

    async def begin_turn(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        await self.gate.wait()
        return await self.store.begin_turn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[GatedStore]:
    async with Store.open(f"sqlite:///{tmp_path / 'engine.db'}") as store:
        gated = GatedStore(store)
        gated.gate.set()
        yield gated


@pytest.fixture
async def engine(store: GatedStore, tmp_path: Path) -> AsyncIterator[TurnEngine]:
    settings = Settings(database_url="sqlite:///unused.db", journal_dir=tmp_path)
    journal = Journal(tmp_path, "test")
    await journal.open()
    try:
        real = cast(Store, store)
        persister = Persister(real, journal, settings, owner="test")
        engine = TurnEngine(real, BurstProvider(list("abcde")), persister, settings, "test")
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.serve)
            yield engine
            engine.drain()
    finally:
        await journal.close()


async def new_request(store: GatedStore) -> TurnRequest:
    conversation = await store.create_conversation(
        user=LOCAL_USER_ID, title=None, model=None, system=None
    )
    return TurnRequest(conversation["id"], "hi", "m", user=LOCAL_USER_ID)


async def final_reply(store: GatedStore, conversation_id: str) -> dict[str, Any]:
    """The assistant row once it is final (polled; the caller bounds the time)."""
    while True:
        messages = await store.list_messages(conversation_id, user=LOCAL_USER_ID)
        assert messages is not None
        replies = [m for m in messages if m["role"] == "assistant"]
        if replies and replies[0]["status"] != "streaming":
            return dict(replies[0])
        await trio.sleep(0.01)


async def test_deltas_that_arrive_together_go_out_as_one_event(
    engine: TurnEngine, store: GatedStore
) -> None:
    with trio.fail_after(10):
        turn = await engine.start_turn(await new_request(store))
        events = [event async for event in relay(turn)]
    deltas = [event for event in events if b"event: delta" in event]
    assert deltas == [b'id: 5\nevent: delta\ndata: {"content":"abcde"}\n\n']


async def test_a_client_that_leaves_while_its_turn_starts_is_a_disconnect(
    engine: TurnEngine, store: GatedStore
) -> None:
    request = await new_request(store)
    store.gate = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client = trio.CancelScope()

            async def post() -> None:
                with client:
                    await engine.start_turn(request)

            nursery.start_soon(post)
            await store.entered.wait()
            client.cancel()  # the client goes away while the rows are being inserted
            await trio.testing.wait_all_tasks_blocked()
            store.gate.set()
        reply = await final_reply(store, request.conversation_id)
    assert (reply["status"], reply["stop_reason"]) == ("interrupted", "client_disconnected")


async def test_a_turn_starting_when_the_drain_begins_gets_its_grace(
    engine: TurnEngine, store: GatedStore
) -> None:
    request = await new_request(store)
    store.gate = trio.Event()
    turns: list[Turn] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def post() -> None:
                turns.append(await engine.start_turn(request))

            nursery.start_soon(post)
            await store.entered.wait()
            engine.drain()
            store.gate.set()
        events = [event async for event in relay(turns[0])]
    assert events[-1].startswith(b'event: done\ndata: {"message_id"')
    assert b'"status":"complete"' in events[-1]
