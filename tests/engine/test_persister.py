"""The persister on its own: a Turn and its delta channel fed by hand, a store that records what
it is asked to write. Deterministic (autojump clock); the real store is tested elsewhere."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, cast

import trio
import trio.testing

from chatsrv._settings import Settings
from chatsrv.engine import Journal, Outcome, Persister, Status, Turn
from chatsrv.http import keep_alive
from chatsrv.store import Store


class RecordingStore:
    """Records each checkpoint (when, what) and the final commit; every write succeeds."""

    def __init__(self) -> None:
        self.checkpoints: list[tuple[float, str]] = []
        self.final: str | None = None

    async def checkpoint(self, message_id: str, *, content: str, **_: Any) -> bool:
        self.checkpoints.append((trio.current_time(), content))
        await trio.lowlevel.checkpoint()
        return True

    async def finish_reply(self, message_id: str, *, content: str, **_: Any) -> bool:
        self.final = content
        await trio.lowlevel.checkpoint()
        return True


async def test_checkpoints_count_from_the_first_delta(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """An upstream slow to answer costs no checkpoint, and one every interval from the first
    delta on: 2.5 intervals of deltas make two checkpoints. The keep-alive pings that wake the
    turn's relays meanwhile do not start the clock."""
    store = RecordingStore()
    settings = Settings(database_url="sqlite:///unused.db", checkpoint_interval_s=1.0)
    persister = Persister(cast(Store, store), Journal(tmp_path, "test"), settings, owner="test")
    turn = Turn(
        conversation_id="c",
        user_message_id="u",
        message_id="m",
        model="x",
        deadline=trio.current_time() + 600,
        on_orphaned=lambda _: None,
    )
    deltas_tx, deltas_rx = trio.open_memory_channel[str](math.inf)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(keep_alive, lambda: [turn], heartbeat_s=1.0))
        nursery.start_soon(persister.run, turn, deltas_rx)
        with deltas_tx:
            await trio.sleep(3.7)  # the upstream takes its time to answer
            first = trio.current_time()
            for i in range(6):
                if i:
                    await trio.sleep(0.5)
                deltas_tx.send_nowait(str(i))
            turn.outcome = Outcome(Status.COMPLETE, "stop")
        await turn.finished.wait()
        nursery.cancel_scope.cancel()
    assert [(at - first, content) for at, content in store.checkpoints] == [
        (1.0, "01"),
        (2.0, "0123"),
    ]
    assert store.final == "012345"
    assert turn.persisted
