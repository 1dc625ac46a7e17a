"""The store's durability primitives, on both databases: checkpoints that never overwrite a final
commit, leases and the sweeper that only takes rows whose process stopped renewing them, and
Idempotency-Keys that name one turn, even under concurrent requests."""

from __future__ import annotations

from typing import Any

import trio

from chatsrv.store import LOCAL_USER_ID, Store


async def begin(
    store: Store, conversation_id: str, *, owner: str, lease_s: float, key: str | None = None
) -> Any:
    turn = await store.begin_turn(
        conversation_id,
        user=LOCAL_USER_ID,
        content="hi",
        model="m",
        default_model="d",
        owner=owner,
        lease_s=lease_s,
        max_streams=100,
        idempotency_key=key,
    )
    assert turn is not None
    return turn


async def new_conversation(store: Store) -> str:
    return (
        await store.create_conversation(user=LOCAL_USER_ID, title=None, model=None, system=None)
    )["id"]


async def test_checkpoint_saves_content_and_never_overwrites_a_final_commit(store: Store) -> None:
    turn = await begin(store, await new_conversation(store), owner="a", lease_s=30)
    mid = turn.assistant_message["id"]

    assert await store.checkpoint(mid, content="par", owner="a", lease_s=30)
    message = await store.get_message(mid, user=LOCAL_USER_ID)
    assert message is not None
    assert (message["status"], message["content"]) == ("streaming", "par")

    # Only the owner checkpoints its row.
    assert not await store.checkpoint(mid, content="other", owner="b", lease_s=30)

    await store.finish_reply(mid, content="partial", status="complete", stop_reason="stop")
    # A checkpoint that arrives after the final commit changes nothing.
    assert not await store.checkpoint(mid, content="par", owner="a", lease_s=30)
    message = await store.get_message(mid, user=LOCAL_USER_ID)
    assert message is not None
    assert (message["status"], message["content"]) == ("complete", "partial")


async def test_sweep_takes_only_rows_whose_lease_expired(store: Store) -> None:
    cid = await new_conversation(store)
    dead = await begin(store, cid, owner="dead", lease_s=0.05)
    alive = await begin(store, cid, owner="alive", lease_s=0.05)
    assert await store.checkpoint(
        dead.assistant_message["id"], content="saved so far", owner="dead", lease_s=0.05
    )
    await trio.sleep(0.1)
    # The live process renews its leases; the dead one does not.
    alive_id = alive.assistant_message["id"]
    assert (
        await store.renew_leases("alive", [alive_id, dead.assistant_message["id"]], lease_s=30) == 1
    )

    assert await store.sweep("sweeper") == 1

    swept = await store.get_message(dead.assistant_message["id"], user=LOCAL_USER_ID)
    assert swept is not None
    assert (swept["status"], swept["stop_reason"], swept["content"]) == (
        "interrupted",
        "server_crash",
        "saved so far",
    )
    untouched = await store.get_message(alive.assistant_message["id"], user=LOCAL_USER_ID)
    assert untouched is not None and untouched["status"] == "streaming"
    assert await store.sweep("sweeper") == 0


async def test_a_sweeper_never_takes_its_own_rows(store: Store) -> None:
    turn = await begin(store, await new_conversation(store), owner="me", lease_s=0.01)
    await trio.sleep(0.05)  # the lease expires (the store's clock is the wall clock)
    assert await store.sweep("me") == 0
    message = await store.get_message(turn.assistant_message["id"], user=LOCAL_USER_ID)
    assert message is not None and message["status"] == "streaming"
    # The control: the lease had expired, and any other sweeper takes the row.
    assert await store.sweep("other") == 1
    message = await store.get_message(turn.assistant_message["id"], user=LOCAL_USER_ID)
    assert message is not None and message["status"] == "interrupted"


async def test_an_owner_cut_off_past_its_lease_takes_its_row_back(store: Store) -> None:
    turn = await begin(store, await new_conversation(store), owner="slow", lease_s=0.01)
    mid = turn.assistant_message["id"]
    await trio.sleep(0.05)
    assert await store.sweep("other") == 1
    # Its next checkpoint finds the row swept, takes it back and saves the content.
    assert await store.checkpoint(mid, content="more", owner="slow", lease_s=30)
    message = await store.get_message(mid, user=LOCAL_USER_ID)
    assert message is not None
    assert (message["status"], message["stop_reason"], message["content"]) == (
        "streaming",
        None,
        "more",
    )
    assert await store.sweep("other") == 0
    # A renewal does the same.
    assert await store.checkpoint(mid, content="more", owner="slow", lease_s=0.01)
    await trio.sleep(0.05)
    assert await store.sweep("other") == 1
    assert await store.renew_leases("slow", [mid], lease_s=30) == 1
    message = await store.get_message(mid, user=LOCAL_USER_ID)
    assert message is not None and message["status"] == "streaming"
    # Nobody else can take a swept row.
    assert not await store.checkpoint(mid, content="no", owner="thief", lease_s=30)


async def test_a_final_commit_after_a_sweep_wins(store: Store) -> None:
    turn = await begin(store, await new_conversation(store), owner="slow", lease_s=0.01)
    mid = turn.assistant_message["id"]
    await trio.sleep(0.05)
    assert await store.sweep("sweeper") == 1
    # The process was alive after all (stalled past its lease): its final commit still lands.
    assert await store.finish_reply(mid, content="all of it", status="complete", stop_reason="stop")
    message = await store.get_message(mid, user=LOCAL_USER_ID)
    assert message is not None
    assert (message["status"], message["content"]) == ("complete", "all of it")


async def test_an_idempotency_key_names_one_turn(store: Store) -> None:
    cid = await new_conversation(store)
    first = await begin(store, cid, owner="a", lease_s=30, key="k1")
    again = await begin(store, cid, owner="a", lease_s=30, key="k1")
    assert not first.existing and again.existing
    assert again.assistant_message["id"] == first.assistant_message["id"]
    assert again.user_message["id"] == first.user_message["id"]
    assert again.assistant_message["parent_id"] == first.user_message["id"]

    # The same key in another conversation is another turn.
    other = await begin(store, await new_conversation(store), owner="a", lease_s=30, key="k1")
    assert not other.existing
    messages = await store.list_messages(cid, user=LOCAL_USER_ID)
    assert messages is not None and len(messages) == 2


async def test_concurrent_requests_with_one_key_make_one_turn(store: Store) -> None:
    cid = await new_conversation(store)
    results: list[Any] = []

    async def send() -> None:
        results.append(await begin(store, cid, owner="a", lease_s=30, key="same"))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(send)

    assert sum(not r.existing for r in results) == 1
    assert len({r.assistant_message["id"] for r in results}) == 1
    messages = await store.list_messages(cid, user=LOCAL_USER_ID)
    assert messages is not None and len(messages) == 2
