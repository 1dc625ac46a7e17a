"""The engine's dealings with the other chatsrv processes on the same database.

A turn runs in one process; its clients may be anywhere. ``Peers`` is what makes that work:

- ``follower()`` for a client that resumes a reply another process writes (``_follow.py``);
- ``serve()``: on PostgreSQL it listens on the control channel (``_wire.py``) and, for this
  process's turns, starts a publisher for each asked-for reply (``_publisher.py``) and stops the
  ones another process cancels; on every database it also polls for cancel requests marked in
  the rows, the path that does not depend on a notification arriving;
- ``cancel()`` of a reply wherever it runs, and ``running_replies()`` of every process.

``serve`` runs in the service nursery, beside the engine; each publisher is a task of its own
nursery, so one that fails is logged and never takes the service down.
"""

from __future__ import annotations

import logging

import trio

from chatsrv._errors import StoreError
from chatsrv._settings import Settings
from chatsrv.store import Message, RunningReply, Store

from . import _wire as wire
from ._engine import TurnEngine
from ._follow import Follower
from ._publisher import Publisher
from ._turn import Turn

log = logging.getLogger("chatsrv.engine")

# How long the control listener waits before it tries again when the database refused it.
_RETRY_S = 1.0


class Peers:
    def __init__(self, engine: TurnEngine, store: Store, settings: Settings) -> None:
        self._engine = engine
        self._store = store
        self._settings = settings
        self._publishers: dict[str, Publisher] = {}

    def follower(self, message_id: str, *, after: int) -> Follower:
        """A follow of a reply another process writes, from character ``after``; ``start()`` it,
        read its ``updates()``, and ``close()`` it if its updates are never read."""
        settings = self._settings
        return Follower(
            self._store,
            message_id,
            after=after,
            interval_s=settings.checkpoint_interval_s,
            lease_s=settings.lease_s,
            heartbeat_s=settings.heartbeat_s,
            sweeper=self._engine.owner,
        )

    async def cancel(self, message_id: str, *, user: str) -> Message | None:
        """Cancel a reply of ``user``'s wherever it streams; return the message once final (or
        as it is, if its owner cannot be reached), None if ``user`` has no such assistant
        message."""
        if await self._engine.cancel(message_id, user=user) is None:  # not a turn run here
            message = await self._store.request_cancel(message_id, user=user)
            if message is None or message["role"] != "assistant":
                return None
            if message["status"] == "streaming":
                await self._tell({"cancel": message_id})
                follower = self.follower(message_id, after=len(message["content"]))
                updates = follower.updates()
                try:
                    async for _ in updates:
                        pass
                finally:
                    await updates.aclose()
        return await self._store.get_message(message_id, user=user)

    async def running_replies(self, *, user: str) -> list[RunningReply]:
        """The user's replies streamed now by a live process, this one's with their exact
        offsets."""
        replies = await self._store.running_replies(user=user)
        for reply in replies:
            turn = self._engine.turn(reply["message_id"], user=user)
            if turn is not None:
                reply["offset"] = turn.length
        return replies

    async def serve(self) -> None:
        """Serve the other processes' requests until cancelled (in the service nursery)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll_cancel_requests)
            if self._store.bus is not None:
                nursery.start_soon(self._listen, nursery)

    # -- requests for this process's turns ---------------------------------------------------

    async def _listen(self, nursery: trio.Nursery) -> None:
        bus = self._store.bus
        assert bus is not None
        while True:
            try:
                subscription = await bus.subscribe(wire.CONTROL)
            except StoreError as exc:
                log.warning("cannot listen to the other processes (%s); retrying", exc)
                await trio.sleep(_RETRY_S)
                continue
            try:
                while True:
                    self._obey(await subscription.receive(), nursery)
            finally:
                subscription.close()

    def _obey(self, payload: str, nursery: trio.Nursery) -> None:
        try:
            request = wire.decode(payload)
        except ValueError:
            log.warning("ignored a control message that is not JSON: %.80r", payload)
            return
        message_id = request.get("tail") or request.get("cancel")
        # Asked by another process, which has checked whose reply it is.
        turn = self._engine.turn(message_id, user=None) if isinstance(message_id, str) else None
        if turn is None:
            return  # another process's turn, or one that has ended
        if "cancel" in request:
            _cancelled_elsewhere(turn)
            return
        after = request.get("from")
        if not isinstance(after, int) or after < 0:
            return
        publisher = self._publishers.get(turn.message_id)
        if publisher is None:
            assert self._store.bus is not None
            publisher = self._publishers[turn.message_id] = Publisher(turn, self._store.bus)
            nursery.start_soon(self._publish, turn.message_id, publisher)
        publisher.ask(after)

    async def _publish(self, message_id: str, publisher: Publisher) -> None:
        try:
            await publisher.run()
        except Exception:  # an error boundary: the turn and the service go on
            log.exception("turn %s: publishing it to another process failed", message_id)
        finally:
            del self._publishers[message_id]

    async def _poll_cancel_requests(self) -> None:
        """Cancel this process's turns whose rows carry a cancel request: every checkpoint
        interval while turns run (a notification may have been lost; SQLite has none)."""
        while True:
            await trio.sleep(self._settings.checkpoint_interval_s)
            if not self._engine.running():
                continue
            try:
                requested = await self._store.cancel_requests(self._engine.owner)
            except StoreError as exc:
                log.debug("could not read cancel requests: %s", exc)
                continue
            except Exception:  # a bug: logged, and this task goes on (an error boundary)
                log.exception("reading cancel requests failed")
                continue
            for message_id in requested:
                turn = self._engine.turn(message_id, user=None)
                if turn is not None:
                    _cancelled_elsewhere(turn)

    async def _tell(self, request: dict[str, object]) -> None:
        if self._store.bus is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._store.bus.notify(wire.CONTROL, wire.encode(request))
        except StoreError as exc:  # the row's mark reaches the owner anyway
            log.debug("could not notify the other processes: %s", exc)


def _cancelled_elsewhere(turn: Turn) -> None:
    log.info("turn %s: cancelled from another process", turn.message_id)
    turn.cancel()
