"""Recovery: what keeps replies safe across the death of a process or an outage of the database.

Three periodic tasks, run by the service for as long as it lives:

- **Leases.** Every row a process streams carries its ``owner`` (the process's instance id) and a
  lease expiry. Checkpoints renew a row's lease; ``keep_leases`` renews all of this process's
  rows every third of ``CHATSRV_LEASE_S``, so a row that is idle (a slow upstream) stays leased.
- **Sweeper.** At startup and every ``CHATSRV_SWEEP_INTERVAL_S``, ``sweep`` marks streaming rows
  whose lease expired — their process died (SIGKILL, OOM, power) — as ``interrupted`` with
  stop_reason ``server_crash``, keeping their last checkpoint. A live process renews its leases,
  so no sweeper, on any host, ever takes its rows.
- **Replayer.** At startup and every sweep interval, ``replay`` applies the local journal's
  records (final replies the database could not take in time) and removes them.

Each task logs a failure and tries again at its next period: none of them may stop the service.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable

import trio

from ._errors import StoreError, StoreUnavailable
from ._journal import FinalRecord, Journal
from ._store import Store

log = logging.getLogger("chatsrv.recovery")


def new_instance_id() -> str:
    """A name for this process, unique across hosts and restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


async def keep_leases(
    store: Store, owner: str, running: Callable[[], list[str]], *, lease_s: float
) -> None:
    """Renew the leases of the turns ``running()`` names, every third of a lease."""
    while True:
        await trio.sleep(lease_s / 3)
        try:
            await store.renew_leases(owner, running(), lease_s=lease_s)
        except StoreError as exc:
            log.warning("could not renew this process's leases: %s", exc)


async def sweep_forever(store: Store, *, interval_s: float) -> None:
    while True:
        try:
            swept = await store.sweep()
        except StoreError as exc:
            log.warning("sweep failed: %s", exc)
        else:
            if swept:
                log.warning(
                    "marked %d reply(ies) of dead processes interrupted/server_crash", swept
                )
        await trio.sleep(interval_s)


async def replay_forever(journal: Journal, store: Store, *, interval_s: float) -> None:
    while True:
        await replay(journal, store)
        await trio.sleep(interval_s)


async def replay(journal: Journal, store: Store) -> int:
    """Apply what the journal holds; return how many records were applied."""

    async def apply(record: FinalRecord) -> None:
        try:
            await store.finish_reply(
                record.message_id,
                content=record.content,
                status=record.status,
                stop_reason=record.stop_reason,
                error=record.error,
                usage=record.usage,
            )
        except StoreUnavailable:
            raise
        except StoreError:
            # Not a passing failure: this record will never apply. Keep it in the log rather
            # than block every record behind it forever.
            log.critical("dropping a journal record the database refuses: %r", record)

    try:
        applied = await journal.replay(apply)
    except StoreError as exc:
        log.warning("journal replay stopped, the database is unavailable: %s", exc)
        return 0
    if applied:
        log.warning("replayed %d journaled reply(ies) into the database", applied)
    return applied
