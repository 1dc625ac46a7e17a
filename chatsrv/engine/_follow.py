"""Following a reply that another process writes: the follower's side of a resumed stream.

A turn runs in the process that started it, but a client that comes back for its stream may land
on any worker or host. That process follows the reply:

- On PostgreSQL it listens to the reply's channel and asks the owner, on the control channel, to
  publish from the client's offset (``_wire.py``; the owner's side is ``_publisher.py``). The
  owner answers with its length (so an offset past the reply is refused before the stream
  begins), the characters from the offset, then each frame of new ones, then ``end``. The
  follower asks again every ``TAIL_RENEW_S`` while it follows, and at once if it sees a gap.
- Whatever the database, it also reads the row: every checkpoint interval when there is no bus
  (SQLite), every ``_POLL_WITH_BUS_S`` otherwise. That covers notifications lost while the
  listener reconnects, an owner that does not answer, and an owner that died: once nothing has
  moved for a whole lease it sweeps (a no-op unless the owner's lease has really expired), and
  the stream ends with the swept status instead of waiting for the next regular sweep.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import trio

from chatsrv._errors import StoreError
from chatsrv.store import Message, Store, Subscription

from . import _wire as wire

log = logging.getLogger("chatsrv.engine")

# How long a new follower waits for the owner's first answer before it streams without it.
HANDSHAKE_S = 1.0
# How often the row is read when notifications flow.
_POLL_WITH_BUS_S = 5.0


@dataclass(frozen=True)
class Piece:
    """Characters of the reply: ``text`` ends at offset ``end``."""

    text: str
    end: int


class Follower:
    """One client's follow of a reply another process writes, from character ``after``."""

    def __init__(
        self,
        store: Store,
        message_id: str,
        *,
        after: int,
        interval_s: float,
        lease_s: float,
        heartbeat_s: float,
        sweeper: str,
    ) -> None:
        self._store = store
        self._id = message_id
        self._have = after
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._quiet_s = heartbeat_s / 2
        self._sweeper = sweeper
        self._subscription: Subscription | None = None
        self._early: list[str] = []  # what arrived while waiting for the owner's answer
        self.length: int | None = None  # the owner's length, once it has answered

    async def start(self) -> None:
        """Listen to the reply and ask its owner for it; wait up to ``HANDSHAKE_S`` for the
        answer, which sets ``length``. Without a bus, or if it fails, the follower polls."""
        bus = self._store.bus
        if bus is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            self._subscription = await bus.subscribe(wire.reply_channel(self._id))
            await self._ask()
            with trio.move_on_after(HANDSHAKE_S):
                while self.length is None:
                    payload = await self._subscription.receive()
                    self._early.append(payload)
                    with contextlib.suppress(ValueError):  # not ours: see _parse
                        length = wire.decode(payload).get("length")
                        if isinstance(length, int):
                            self.length = length
        except StoreError as exc:
            log.warning("reply %s: following it without notifications: %s", self._id, exc)
            self.close()

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    async def updates(self) -> AsyncGenerator[Piece | Message | None, None]:
        """What the client should get next: a ``Piece``; the final ``Message`` (the last item);
        or ``None`` when nothing came for half a heartbeat (time for a ping). Ends without a
        final message if the row is deleted."""
        try:
            # Without notifications, the row is all there is; with them, the row is the check
            # for what they cannot tell (an owner that died), often enough to see a lease end.
            poll_s = (
                self._interval_s
                if self._subscription is None
                else min(_POLL_WITH_BUS_S, self._lease_s / 2)
            )
            now = trio.current_time()
            next_poll, next_ask, last_news = now, now + wire.TAIL_RENEW_S, now
            last_yield = now
            while True:
                payloads, self._early = self._early, []
                if not payloads and self._subscription is not None:
                    deadline = min(next_poll, next_ask, last_yield + self._quiet_s)
                    with trio.move_on_after(max(0.0, deadline - trio.current_time())):
                        payloads.append(await self._subscription.receive())
                elif not payloads:
                    await trio.sleep_until(min(next_poll, last_yield + self._quiet_s))
                final = False
                for payload in payloads:
                    at, text, end = _parse(payload)
                    if text:
                        piece = self._take(at, text)
                        if piece is not None:
                            last_news = last_yield = trio.current_time()
                            yield piece
                        elif at > self._have:  # a gap: ask for it at once
                            next_ask = trio.current_time()
                    final = final or end
                now = trio.current_time()
                if final or now >= next_poll:
                    next_poll = now + poll_s
                    try:
                        stored = await self._store.get_message(self._id, user=None)
                    except StoreError as exc:  # the database blinked: read it next time
                        log.warning("reply %s: could not read it: %s", self._id, exc)
                        continue
                    if stored is None:
                        return
                    if stored["status"] != "streaming":
                        yield stored
                        return
                    piece = self._take(0, stored["content"])
                    if piece is not None:
                        last_news = last_yield = trio.current_time()
                        yield piece
                    elif now - last_news >= self._lease_s:
                        last_news = now
                        next_poll = now  # read the swept row at once
                        with contextlib.suppress(StoreError):  # tried again a lease later
                            await self._store.sweep(self._sweeper)  # its owner may have died
                if self._subscription is not None and trio.current_time() >= next_ask:
                    await self._ask()
                    next_ask = trio.current_time() + wire.TAIL_RENEW_S
                if trio.current_time() - last_yield >= self._quiet_s:
                    last_yield = trio.current_time()
                    yield None
        finally:
            self.close()

    def _take(self, at: int, text: str) -> Piece | None:
        """The part of ``text`` (from offset ``at``) the client lacks, if it joins up."""
        if not at <= self._have < at + len(text):
            return None
        new = text[self._have - at :]
        self._have += len(new)
        return Piece(new, self._have)

    async def _ask(self) -> None:
        bus = self._store.bus
        assert bus is not None
        try:
            await bus.notify(wire.CONTROL, wire.encode({"tail": self._id, "from": self._have}))
        except StoreError as exc:
            log.debug("reply %s: asking its owner failed: %s", self._id, exc)


def _parse(payload: str) -> tuple[int, str, bool]:
    """A reply channel's payload as (offset, text, end); one that is not what ``_wire.py``
    describes counts as nothing (another program may notify on the channel)."""
    try:
        message = wire.decode(payload)
    except ValueError:
        message = {}
    at, text = message.get("at"), message.get("text")
    if not (isinstance(at, int) and isinstance(text, str)):
        at, text = 0, ""
    return at, text, message.get("end") is True
