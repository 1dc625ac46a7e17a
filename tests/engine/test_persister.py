"""The persister on its own: a Turn and its delta channel fed by hand, a store that records what
it is asked to write. Deterministic (autojump clock); the real store is tested elsewhere."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from chatsrv._settings import Settings
from chatsrv.engine import Journal, Outcome, Persister, Status, Turn
from chatsrv.http import keep_alive
from chatsrv.store import LOCAL_USER_ID, Store


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


# When each delta arrives, in checkpoint intervals from the first. None coincides with a
# checkpoint (at 1.0 and 2.0): whether a checkpoint due at the same instant as a delta saw that
# delta would hang on float rounding in the sums of the times.
DELTA_OFFSETS = (0.0, 0.6, 1.1, 1.6, 2.1, 2.6)


async def test_checkpoints_count_from_the_first_delta(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """An upstream slow to answer costs no checkpoint, and one every interval from the first
    delta on: 2.6 intervals of deltas make two checkpoints. The keep-alive pings that wake the
    turn's relays meanwhile (every 0.5 s from t = 1.0, six before the first delta) do not start
    the clock: had the first ping started it, checkpoints would fall at 0.3, 1.3 and 2.3."""
    store = RecordingStore()
    settings = Settings(database_url="sqlite:///unused.db", checkpoint_interval_s=1.0)
    persister = Persister(cast(Store, store), Journal(tmp_path, "test"), settings, owner="test")
    turn = Turn(
        conversation_id="c",
        user=LOCAL_USER_ID,
        user_message_id="u",
        message_id="m",
        model="x",
        deadline=trio.current_time() + 600,
        started_at="2026-01-01T00:00:00.000000+00:00",
    )
    deltas_tx, deltas_rx = trio.open_memory_channel[str](math.inf)
    with trio.fail_after(60):  # virtual time: a hang fails at once
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(keep_alive, lambda: [turn], heartbeat_s=1.0))
            nursery.start_soon(persister.run, turn, deltas_rx)
            with deltas_tx:
                await trio.sleep(3.7)  # the upstream takes its time to answer
                first = trio.current_time()
                for i, offset in enumerate(DELTA_OFFSETS):
                    await trio.sleep_until(first + offset)
                    deltas_tx.send_nowait(str(i))
                turn.outcome = Outcome(Status.COMPLETE, "stop")
            await turn.finished.wait()
            nursery.cancel_scope.cancel()
    assert [content for _, content in store.checkpoints] == ["01", "0123"]
    assert [at - first for at, _ in store.checkpoints] == pytest.approx([1.0, 2.0])
    assert store.final == "012345"
    assert turn.persisted
