"""The persister: it takes a turn's reply from the generation's channel to durable storage.

One persister task runs beside each generation, inside a shielded cancel scope (see the diagram in
``_engine.py``), through three phases:

1. **Hold.** Append each delta to the turn as it arrives, so that relays can send it; every
   ``CHATSRV_CHECKPOINT_INTERVAL_S`` from the first delta, if the reply grew, save it (one UPDATE
   that also renews the row's lease). A checkpoint runs beside the deltas, never in their way,
   and a failed one is only logged: the next interval tries again. A turn shorter than one
   interval writes none.
2. **Commit.** When the channel closes the generation has ended and the turn has its outcome:
   write the final content and status in one UPDATE by id, retried with exponential backoff and
   jitter on transient errors for ``CHATSRV_PERSIST_RETRY_S`` — cut to ``CHATSRV_PERSIST_GRACE_S``
   once the server is shutting down (``hurry``).
3. **Journal.** If the commit did not succeed in time, append the final record to the local
   journal (fsync-ed); the replayer applies it when the database answers again.

Only then is the turn ``finished``, and its relays send ``done``. Every phase is bounded except
the first, which ends when the generation closes the channel — and the generation is never
shielded. Whatever happens here is logged and contained: one reply that cannot be saved never
takes the service down.
"""

from __future__ import annotations

import logging

import tenacity
import trio

from chatsrv import _metrics as metrics
from chatsrv._errors import StoreError, StoreUnavailable
from chatsrv._settings import Settings
from chatsrv.store import Store

from ._journal import FinalRecord, Journal
from ._turn import Outcome, Status, StopReason, Turn

log = logging.getLogger("chatsrv.persister")

# How long appending a record to the journal may take (a write and an fsync).
_JOURNAL_DEADLINE_S = 10.0
_BACKSTOP_MARGIN_S = 30.0


class Persister:
    """Runs the persister of every turn of one engine; ``owner`` names this process in leases."""

    def __init__(self, store: Store, journal: Journal, settings: Settings, owner: str) -> None:
        self._store = store
        self._journal = journal
        self._settings = settings
        self._owner = owner
        self._hurried = False
        self._commits: set[trio.CancelScope] = set()  # the commit phases running now
        # No stop condition: the commit phase's deadline bounds the retries.
        self._retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(StoreUnavailable),
            wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.1),
            sleep=trio.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )

    def hurry(self) -> None:
        """The server is shutting down: final commits get ``persist_grace_s`` from now."""
        self._hurried = True
        deadline = trio.current_time() + self._settings.persist_grace_s
        for scope in self._commits:
            scope.deadline = min(scope.deadline, deadline)

    async def run(self, turn: Turn, deltas: trio.MemoryReceiveChannel[str]) -> None:
        """The persister task of ``turn``: hold, commit, journal; then finish the turn."""
        # The shield's deadline is a backstop: the hold ends when the generation does (at its
        # own deadline at the latest), and the commit and the journal are bounded on their own.
        backstop = (
            turn.generation_scope.deadline
            + self._settings.persist_retry_s
            + _JOURNAL_DEADLINE_S
            + _BACKSTOP_MARGIN_S
        )
        try:
            with trio.CancelScope(shield=True, deadline=backstop):
                await self._hold(turn, deltas)
                ended = trio.current_time()
                await self._commit(turn)
                saved = "committed"
                if not turn.persisted:
                    await self._journal_final(turn)
                    saved = "journaled"
                if turn.persisted:
                    self._record_end(turn, ended, saved)
        except Exception:
            log.exception("turn %s: the reply could not be saved", turn.message_id)
        finally:
            turn.finish()

    async def _hold(self, turn: Turn, deltas: trio.MemoryReceiveChannel[str]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._checkpoints, turn)
            with deltas:
                async for text in deltas:
                    # Take every delta already waiting, so that relays wake once for all of
                    # them and send them as one event.
                    batch = [text]
                    while True:
                        try:
                            batch.append(deltas.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    turn.extend(batch)
            # A checkpoint cut short here is harmless: it only ever updates a row that is still
            # 'streaming', so it can never land over the final commit that follows.
            nursery.cancel_scope.cancel()

    async def _checkpoints(self, turn: Turn) -> None:
        # The interval counts from the first delta: a turn pays no checkpoint for the time its
        # upstream takes to answer, and n intervals of deltas cost at most n - 1 checkpoints.
        # (A continued reply's row already holds what it started with.)
        saved = turn.prefix_length
        while turn.length == saved:
            await turn.wait_changed()  # also woken by pings
        while True:
            await trio.sleep(self._settings.checkpoint_interval_s)
            if turn.length == saved:
                continue
            content = turn.content
            try:
                with trio.fail_after(self._settings.db_timeout_s):
                    written = await self._store.checkpoint(
                        turn.message_id,
                        content=content,
                        owner=self._owner,
                        lease_s=self._settings.lease_s,
                    )
            except (StoreError, trio.TooSlowError) as exc:
                metrics.CHECKPOINTS.labels("failed").inc()
                log.warning("turn %s: checkpoint failed (%r)", turn.message_id, exc)
                continue
            metrics.CHECKPOINTS.labels("written").inc()
            if written:
                saved = len(content)
            else:  # the row is gone (its conversation was deleted) or was never ours
                log.warning("turn %s: checkpoint found no row of ours", turn.message_id)

    async def _commit(self, turn: Turn) -> None:
        outcome = turn.outcome
        if outcome is None:  # every path of the generation sets it; a last line of defence
            outcome = turn.outcome = Outcome(
                Status.FAILED, StopReason.INTERNAL_ERROR, "internal_error"
            )
        settings = self._settings
        budget = settings.persist_grace_s if self._hurried else settings.persist_retry_s
        content = turn.content
        with trio.move_on_after(budget) as scope:
            self._commits.add(scope)
            try:
                async for attempt in self._retrying.copy():
                    with attempt:
                        found = await self._store.finish_reply(
                            turn.message_id,
                            content=content,
                            status=outcome.status,
                            stop_reason=outcome.stop_reason,
                            error=outcome.error,
                            usage=outcome.usage,
                        )
            except StoreError:
                log.exception("turn %s: the final commit failed", turn.message_id)
                return
            finally:
                self._commits.discard(scope)
            turn.persisted = True
        if scope.cancelled_caught:
            log.error(
                "turn %s: no final commit within %.1f s; journaling it", turn.message_id, budget
            )
            return
        if not found:
            log.info("turn %s: its conversation was deleted while it ran", turn.message_id)

    def _record_end(self, turn: Turn, ended: float, saved: str) -> None:
        """The turn's one line, and its figures: how it ended, how long it took, and how long
        its reply took to be saved once the generation was over (the fields are the JSON
        log's too)."""
        outcome = turn.outcome
        assert outcome is not None
        first = None if turn.first_delta_at is None else turn.first_delta_at - turn.began
        save_s = trio.current_time() - ended
        metrics.TURNS_ENDED.labels(outcome.status, outcome.stop_reason or "").inc()
        metrics.SAVE_SECONDS.observe(save_s)
        if first is not None:
            metrics.FIRST_TOKEN_SECONDS.observe(first)
        fields: dict[str, object] = {
            "conversation_id": turn.conversation_id,
            "message_id": turn.message_id,
            "status": outcome.status,
            "stop_reason": outcome.stop_reason,
            "characters": turn.length,
            "duration_s": round(ended - turn.began, 3),
            "first_token_s": None if first is None else round(first, 3),
            "saved": saved,
            "save_ms": round(save_s * 1000, 1),
        }
        if self._settings.auth == "keys":
            fields["user"] = turn.user
        log.info(
            "turn %s conversation %s: %s/%s, %d characters in %.2f s (first token %s), %s in "
            "%.1f ms",
            turn.message_id,
            turn.conversation_id,
            outcome.status,
            outcome.stop_reason,
            turn.length,
            fields["duration_s"],
            "none" if first is None else f"{first:.2f} s",
            fields["saved"],
            fields["save_ms"],
            extra=fields,
        )

    async def _journal_final(self, turn: Turn) -> None:
        outcome = turn.outcome
        assert outcome is not None
        record = FinalRecord(
            message_id=turn.message_id,
            content=turn.content,
            status=outcome.status,
            stop_reason=outcome.stop_reason,
            error=outcome.error,
            usage=outcome.usage,
        )
        with trio.move_on_after(_JOURNAL_DEADLINE_S):
            await self._journal.append(record)
            turn.persisted = True
            metrics.JOURNAL_APPENDS.inc()
            log.warning(
                "turn %s: journaled %s/%s, %d characters, for replay when the database is back",
                turn.message_id,
                outcome.status,
                outcome.stop_reason,
                turn.length,
            )
        if not turn.persisted:
            log.critical("turn %s: neither committed nor journaled; reply lost", turn.message_id)


def _log_retry(state: tenacity.RetryCallState) -> None:
    metrics.PERSIST_RETRIES.inc()
    log.warning(
        "the database is unavailable (attempt %d): %s; retrying",
        state.attempt_number,
        state.outcome.exception() if state.outcome else None,
    )
