"""Learning early that hypercorn is shutting this worker down.

ASGI tells an application about shutdown only through the lifespan protocol, and hypercorn sends
``lifespan.shutdown`` after it has already closed every connection (after ``graceful_timeout``). A
streaming reply would then look like a client that went away, and the client would never get its
``done`` event. The turn engine needs to know at the moment hypercorn starts to shut down.

The ``hypercorn`` command runs each worker in a child process and tells it to stop by setting a
``multiprocessing.Event`` that it passes to the worker function (``trio_worker(config, sockets,
shutdown_event)``); the worker polls it every 100 ms. The application is not given that event, but
it is one of the arguments of the current process, so we read it from there: a read-only look at
``multiprocessing``'s private ``Process._kwargs``, nothing of hypercorn is patched, and the tests
that SIGTERM a real hypercorn fail if a new version moves it. When chatsrv does not run as such a
worker (``chatsrv serve``, tests, ``workers = 0``) there is no event, and whoever runs the server
calls ``drain()`` itself.

A SIGTERM sent to the worker itself (a process-group kill) starts the same drain. The worker then
keeps serving other requests until hypercorn's master stops it: deploy with the master as the
process that receives SIGTERM first (systemd ``KillMode=mixed``).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Callable
from typing import Protocol, cast

import trio

log = logging.getLogger("chatsrv")

_POLL_S = 0.1  # hypercorn's own polling interval for the same event


class _EventLike(Protocol):
    def is_set(self) -> bool: ...


def worker_shutdown_event() -> _EventLike | None:
    """The event hypercorn sets to stop this worker process, if this is a hypercorn worker."""
    event = _worker_arguments().get("shutdown_event")
    return cast(_EventLike, event) if callable(getattr(event, "is_set", None)) else None


def worker_binds() -> list[str] | None:
    """The addresses this hypercorn worker's sockets listen on (``host:port``, or a Unix
    socket's path), read from the sockets hypercorn's master passed it; None if this is not a
    hypercorn worker process."""
    sockets = _worker_arguments().get("sockets")
    if sockets is None:
        return None
    binds = []
    for name in ("insecure_sockets", "secure_sockets", "quic_sockets"):
        for sock in getattr(sockets, name, ()):
            address = sock.getsockname()
            binds.append(address if isinstance(address, str) else f"{address[0]}:{address[1]}")
    return binds


def worker_loggers() -> list[logging.Logger | None]:
    """This hypercorn worker's error and access loggers (made now if hypercorn has not made them
    yet, as it would for its first line); none if this is not a hypercorn worker process."""
    config = _worker_arguments().get("config")
    log = getattr(config, "log", None)
    if log is None:
        return []
    return [getattr(log, "error_logger", None), getattr(log, "access_logger", None)]


def _worker_arguments() -> dict[str, object]:
    """The keyword arguments of this process's target, if hypercorn's master started it."""
    kwargs = getattr(multiprocessing.current_process(), "_kwargs", None)
    return kwargs if isinstance(kwargs, dict) else {}


async def watch_worker_shutdown(event: _EventLike, on_shutdown: Callable[[], None]) -> None:
    """Call ``on_shutdown`` when hypercorn's master sets ``event``, or when SIGTERM reaches this
    worker itself (systemd's default ``KillMode=control-group``, ``kill -- -PGID``): hypercorn's
    worker takes SIGTERM's default action, death, and every running reply would go with it."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def first_signal() -> None:
                async for _ in signals:
                    log.warning("SIGTERM reached this worker: draining its turns")
                    nursery.cancel_scope.cancel(reason="SIGTERM")
                    return

            async def master_says_stop() -> None:
                # A multiprocessing event cannot wake a Trio task; hypercorn polls it too.
                while not event.is_set():  # noqa: ASYNC110
                    await trio.sleep(_POLL_S)
                nursery.cancel_scope.cancel(reason="hypercorn is shutting down")

            nursery.start_soon(first_signal)
            nursery.start_soon(master_says_stop)
        on_shutdown()
        # Keep SIGTERM ours until the end: restoring its default now would let a second one
        # kill the worker in the middle of the drain.
        await trio.sleep_forever()
