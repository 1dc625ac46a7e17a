"""The process-wide service: the store, the provider and the turn engine, opened and closed in
the order that keeps every reply.

Shutdown order, made structural by nesting: the engine stops taking turns and drains them (every
persister commits); only then does the provider close, then the store (which disposes the engine
and stops its asyncio loop thread). The engine may drain early — when the server starts shutting
down — while the store stays open for the requests still being answered, until ``stop()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from ._engine import TurnEngine
from ._provider import open_provider
from ._settings import Settings
from ._store import Store


@dataclass
class Service:
    settings: Settings
    store: Store
    engine: TurnEngine
    # Set when everything is closed: the engine drained, the provider and the store closed.
    closed: trio.Event = field(default_factory=trio.Event)
    _stop: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        """Drain the engine, then close the provider and the store."""
        self.engine.drain()
        self._stop.set()


async def run_service(
    settings: Settings, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run until ``service.stop()`` or until this task is cancelled (then every running turn is
    stopped and committed before the store closes)."""
    service: Service | None = None
    try:
        async with (
            Store.open(
                settings.database_url,
                pool_size=settings.db_pool_size,
                timeout_s=settings.db_timeout_s,
            ) as store,
            open_provider(settings) as provider,
        ):
            engine = TurnEngine(store, provider, settings)
            service = Service(settings, store, engine)
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.serve)
                task_status.started(service)
                await service._stop.wait()
    finally:
        if service is not None:
            service.closed.set()
