"""Recovery: what keeps replies safe across the death of a process or an outage of the database.

Three periodic tasks, run by the service for as long as it lives:

- **Leases.** Every row a process streams carries its ``owner`` (the process's instance id) and a
  lease expiry. Checkpoints renew a row's lease; ``keep_leases`` renews all of this process's
  rows every third of ``CHATSRV_LEASE_S``, so a row that is idle (a slow upstream) stays leased.
- **Replayer and sweeper.** At startup and every ``CHATSRV_SWEEP_INTERVAL_S``,
  ``recover_forever`` first applies the local journal's records (final replies the database
  could not take in time) and removes them; then it marks other processes' streaming rows whose
  lease expired — their process died (SIGKILL, OOM, power) — as ``interrupted`` with stop_reason
  ``server_crash``, keeping their last checkpoint. A live process renews its leases, so no
  sweeper takes its rows while it can reach the database; one that was cut off from it for
  longer than a lease takes its rows back with its next checkpoint or renewal.

Each task logs a failure and tries again at its next period: none of them may stop the service.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable

import trio

from chatsrv import _metrics as metrics
from chatsrv._errors import StoreError, StoreUnavailable
from chatsrv.store import Store

from ._journal import FinalRecord, Journal

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


async def recover_forever(
    journal: Journal,
    store: Store,
    owner: str,
    ours: Callable[[], list[str]],
    *,
    interval_s: float,
) -> None:
    """At startup and every ``interval_s``: replay the journal, then sweep, then forget old
    Idempotency-Keys. Replay comes first, so that a reply waiting in the journal is written
    before a sweep could mark its row ``server_crash``. The sweep takes the expired rows of
    dead processes, and this process's own that ``ours()`` (its running turns and journaled
    replies) does not name: starts that outlived their bound, which no turn runs."""
    while True:
        try:
            await replay(journal, store)
            swept = await store.sweep(owner, keep=ours())
            if swept:
                log.warning("marked %d reply(ies) of dead processes server_crash", swept)
            await store.forget_idempotency_keys()
        except StoreError as exc:
            log.warning("recovery round stopped, the database is unavailable: %s", exc)
        except Exception:
            # Whatever this is (a damaged journal directory, a bug), it must not take the
            # service down with it: log it, and try again next round.
            log.exception("recovery round failed")
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
                background=True,
            )
        except StoreUnavailable:
            raise
        except (StoreError, ValueError) as exc:
            # Not a passing failure: this record will never apply. Set it aside, on disk,
            # rather than block every record behind it forever.
            await journal.reject(record, reason=str(exc))

    try:
        applied = await journal.replay(apply)
    except StoreUnavailable as exc:
        log.warning("journal replay stopped, the database is unavailable: %s", exc)
        return 0
    if applied:
        metrics.JOURNAL_REPLAYS.inc(applied)
        log.warning("replayed %d journaled reply(ies) into the database", applied)
    return applied
