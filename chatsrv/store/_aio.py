"""The bridge from Trio to one asyncio event loop that runs in a thread of its own.

The database drivers (asyncpg, aiosqlite, SQLAlchemy's async engine) run only on asyncio. The
store owns one :class:`AsyncioThread`: a daemon thread running an asyncio loop forever, to which
Trio tasks hand coroutines::

    Trio thread                                  asyncio thread
    -----------                                  --------------
    run(coro) --- run_coroutine_threadsafe --->  Task(coro)
      await done.wait()  (no thread held)          ...
      <--- token.run_sync_soon(done.set) ------  future done-callback
    return fut.result()

A waiting Trio task holds no worker thread, so thousands of turns can wait on the database at
once; a round trip costs about 80 µs here. Cancelling the waiting Trio task cancels the asyncio
task and returns at once (it does not wait for the asyncio side to unwind). Nothing here knows
about databases. trio-asyncio is deliberately not used: its loop, opened inside Quart's serving
hooks, crashed Trio at shutdown ("Nursery misnesting detected").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import trio

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long stopping the loop waits for the tasks still on it, first as they are, then cancelled.
_SETTLE_S = 2.0


class BridgeClosed(RuntimeError):
    """The asyncio loop is closed or closing: a coroutine can no longer run on it."""


class AsyncioThread:
    """One asyncio event loop, running forever in a daemon thread started by the constructor.

    Submit coroutines from Trio with :meth:`run`; stop with :meth:`aclose` (or use
    :func:`open_asyncio_thread`). All calls are made from the Trio thread.
    """

    def __init__(self, *, name: str = "chatsrv-asyncio") -> None:
        self._loop = asyncio.new_event_loop()
        self._closing = False
        # A daemon thread: a loop wedged at interpreter exit must not keep the process alive.
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        # Coroutines submitted before run_forever() starts wait in the loop's ready queue.
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the asyncio loop and return its result (or raise its exception).

        The caller waits without holding a thread. If the caller is cancelled, the asyncio task is
        cancelled and ``Cancelled`` propagates at once. A coroutine that never started (the
        caller was already cancelled, or the loop is closed) is closed, never leaked.
        """
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closing:
                raise BridgeClosed("the asyncio loop is closed")
            token = trio.lowlevel.current_trio_token()
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            except RuntimeError as exc:  # "Event loop is closed"
                raise BridgeClosed("the asyncio loop is closed") from exc
        except BaseException:
            coro.close()
            raise

        done = trio.Event()

        def wake(_: Future[T]) -> None:
            # Runs in the asyncio thread, or right here if the future is already done.
            # RunFinishedError: the Trio run is over, so nobody is waiting any more.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            # Cancelled (or interrupted): cancel the asyncio task and leave without waiting for
            # it to unwind; its outcome is nobody's business any more.
            future.cancel()
            raise
        if future.cancelled():
            # Not by us: the loop cancelled its leftover tasks while shutting down.
            raise BridgeClosed("the asyncio loop closed while the call was running")
        return future.result()

    async def aclose(self, *, timeout_s: float = 5.0) -> None:
        """Stop the loop and join its thread, shielded and bounded by ``timeout_s``.

        Tasks still running on the loop are cancelled and their Trio callers get
        :class:`BridgeClosed`. Dispose of whatever lives on the loop (an engine) first.
        """
        if self._closing:
            return
        with trio.move_on_after(min(_SETTLE_S, timeout_s), shield=True):
            # Tasks whose Trio callers were cancelled are still unwinding: let them finish
            # before the loop stops. Cancelling them a second time can cut a driver's own
            # cleanup in half: SQLAlchemy then force-closes an aiosqlite connection whose
            # graceful close is under way, and that close never returns.
            with contextlib.suppress(BridgeClosed):
                await self.run(_settle(_SETTLE_S))
        self._closing = True
        with contextlib.suppress(RuntimeError):  # already closed: the thread died
            self._loop.call_soon_threadsafe(self._loop.stop)
        with trio.move_on_after(timeout_s, shield=True) as scope:
            # abandon_on_cancel: at the deadline stop waiting; the daemon thread is left behind.
            await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)
        if scope.cancelled_caught:
            logger.warning(
                "asyncio thread %s did not stop within %.1f s; abandoned it",
                self._thread.name,
                timeout_s,
            )

    def _main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                _cancel_leftovers(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            except Exception:
                logger.exception("error while shutting down the asyncio loop")
            finally:
                asyncio.set_event_loop(None)
                loop.close()


async def _settle(timeout_s: float) -> None:
    """Wait, up to ``timeout_s``, until every other task on this loop has finished."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=timeout_s)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still on ``loop`` and let them unwind (cf. ``asyncio.run``), for at
    most ``_SETTLE_S``: one that does not is abandoned with the loop, and logged."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=_SETTLE_S))
    for task in tasks - pending:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("asyncio task failed during shutdown", exc_info=task.exception())
    for task in pending:
        logger.warning("asyncio task still running at shutdown, abandoned: %r", task)


@contextlib.asynccontextmanager
async def open_asyncio_thread(
    *, close_timeout_s: float = 5.0, name: str = "chatsrv-asyncio"
) -> AsyncIterator[AsyncioThread]:
    """An :class:`AsyncioThread` that is stopped (shielded, bounded) when the block exits."""
    bridge = AsyncioThread(name=name)
    try:
        yield bridge
    finally:
        await bridge.aclose(timeout_s=close_timeout_s)
