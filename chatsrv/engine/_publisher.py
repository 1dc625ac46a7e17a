"""The owner's side of a reply followed from another process: a publisher.

When a process asks for a turn that runs here (``{"tail": id, "from": n}`` on the control
channel, see ``_wire.py``), the engine starts one publisher for it, a task in the engine's
nursery. It answers each request with the turn's length and the characters from the asked
offset, then publishes what the turn receives, at most once per ``FRAME_S`` (the deltas of a
frame go out as one notification), and ``end`` once the reply is saved. While it publishes it
counts as one of the turn's clients, so a client that resumed on another worker keeps the turn
going whatever its disconnect policy; it stops when nobody asked for ``TAIL_LEASE_S``.

It reads only what the persister holds, like a relay: a follower never receives a character the
database will not get. A notification that fails is dropped (followers also read the row).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from chatsrv._errors import StoreError
from chatsrv.store import Bus

from . import _wire as wire
from ._turn import Turn

log = logging.getLogger("chatsrv.engine")

# At most one notification of new text per turn per frame.
FRAME_S = 0.02


class Publisher:
    def __init__(self, turn: Turn, bus: Bus) -> None:
        self._turn = turn
        self._bus = bus
        self._channel = wire.reply_channel(turn.message_id)
        self._asked: list[int] = []  # offsets asked for and not yet answered
        self._asked_until = 0.0
        self._wake = trio.Event()

    def ask(self, after: int) -> None:
        """A follower wants the reply from character ``after`` on (a new one, or a renewal)."""
        self._asked.append(after)
        self._asked_until = trio.current_time() + wire.TAIL_LEASE_S
        self._wake.set()

    async def run(self) -> None:
        turn = self._turn
        turn.attach()
        try:
            sent_deltas = sent_length = 0
            while True:
                if self._asked:
                    asked, self._asked = self._asked, []
                    content = turn.content
                    sent_deltas, sent_length = turn.deltas, turn.length
                    await self._send(wire.encode({"length": sent_length}))
                    for after in sorted(set(asked)):
                        for payload in wire.pieces(content[after:], after):
                            await self._send(payload)
                elif turn.deltas > sent_deltas:
                    text = turn.since(sent_deltas, sent_length)
                    at = sent_length
                    sent_deltas, sent_length = turn.deltas, turn.length
                    for payload in wire.pieces(text, at):
                        await self._send(payload)
                    await trio.sleep(FRAME_S)
                elif turn.finished.is_set():
                    await self._send(wire.encode({"end": True}))
                    return
                else:
                    timeout = self._asked_until - trio.current_time()
                    if timeout <= 0:
                        return  # nobody follows any more
                    self._wake = trio.Event()
                    with trio.move_on_after(timeout):
                        await _first_of(turn.wait_changed, self._wake.wait)
        finally:
            turn.detach()

    async def _send(self, payload: str) -> None:
        try:
            await self._bus.notify(self._channel, payload)
        except StoreError as exc:
            log.debug("turn %s: a notification was lost: %s", self._turn.message_id, exc)


async def _first_of(*waits: Callable[[], Awaitable[None]]) -> None:
    """Return as soon as one of ``waits`` returns."""
    async with trio.open_nursery() as nursery:
        for wait in waits:
            nursery.start_soon(_then_cancel, wait, nursery.cancel_scope)


async def _then_cancel(wait: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()
