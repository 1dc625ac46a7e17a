"""The process-wide service: the store, the journal, the provider, the turn engine, its peers (the
other processes' follows and cancels) and the recovery tasks, opened and closed in the order
that keeps every reply.

Shutdown order, made structural by nesting: the engine stops taking turns and drains them (every
persister commits or journals its reply); then the recovery tasks stop; then the provider, the
journal and the store close (the store disposes of its engine and stops its asyncio loop
thread). The engine may drain early — when the server starts shutting down — while the store stays
open for the requests still being answered, until ``stop()``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

import trio

from ._settings import Settings
from .engine import (
    Journal,
    Peers,
    Persister,
    TurnEngine,
    keep_leases,
    new_instance_id,
    recover_forever,
    replay,
)
from .http import Authenticator, keep_alive
from .store import Store
from .upstream import open_provider

log = logging.getLogger("chatsrv")


@dataclass
class Service:
    settings: Settings
    store: Store
    journal: Journal
    engine: TurnEngine
    peers: Peers
    authenticator: Authenticator
    # Set when everything is closed: the engine drained, the provider and the store closed.
    closed: trio.Event = field(default_factory=trio.Event)
    _stop: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        """Drain the engine, then close everything else."""
        self.engine.drain()
        self._stop.set()


async def run_service(
    settings: Settings, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run until ``service.stop()`` or until this task is cancelled (then every running turn is
    stopped and saved before the store closes)."""
    service: Service | None = None
    instance_id = new_instance_id()
    try:
        async with (
            Store.open(
                settings.database_url,
                pool_size=settings.db_pool_size,
                timeout_s=settings.db_timeout_s,
                upgrade=settings.upgrades_schema,
            ) as store,
            _open_journal(settings, instance_id, await store.identity()) as journal,
            open_provider(settings) as provider,
        ):
            persister = Persister(store, journal, settings, owner=instance_id)
            engine = TurnEngine(store, provider, persister, settings, owner=instance_id)
            peers = Peers(engine, store, settings)
            authenticator = Authenticator(store, keys=settings.auth == "keys")
            service = Service(settings, store, journal, engine, peers, authenticator)
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.serve)
                every = settings.sweep_interval_s

                # Running turns, and replies waiting in the journal: no sweeper may take either.
                def ours() -> list[str]:
                    return engine.running() + journal.unreplayed()

                nursery.start_soon(
                    partial(keep_leases, store, instance_id, ours, lease_s=settings.lease_s)
                )
                nursery.start_soon(
                    partial(recover_forever, journal, store, instance_id, ours, interval_s=every)
                )
                nursery.start_soon(
                    partial(keep_alive, engine.turns, heartbeat_s=settings.heartbeat_s)
                )
                nursery.start_soon(peers.serve)
                task_status.started(service)
                await service._stop.wait()
                await engine.drained.wait()
                nursery.cancel_scope.cancel(reason="the service is stopping")
            # What this process journaled while draining goes to the database now if it can
            # (bounded): on a host that is not coming back, nobody else would replay it.
            with trio.move_on_after(settings.persist_grace_s):
                await replay(journal, store)
    finally:
        if service is not None:
            service.closed.set()


@contextlib.asynccontextmanager
async def _open_journal(
    settings: Settings, instance_id: str, database: str
) -> AsyncIterator[Journal]:
    """The journal of this database: its replies are kept apart from any other's in the same
    directory, so that none is ever replayed into the wrong database."""
    unkeyed = sorted(settings.journal_dir.glob("*.jsonl"))
    if unkeyed:
        log.warning(
            "%s holds %d journal file(s) from before journals were kept per database: they are "
            "not replayed. Move them into %s if they are this database's replies.",
            settings.journal_dir,
            len(unkeyed),
            settings.journal_dir / database,
        )
    journal = Journal(settings.journal_dir / database, instance_id)
    await journal.open()
    try:
        yield journal
    finally:
        with trio.move_on_after(5, shield=True):
            await journal.close()
