"""The turn engine: it runs every chat turn so that a reply that has started is never lost.

Who owns what::

    request task (POST .../messages)      service nursery (TurnEngine.serve, one per process)
    ────────────────────────────────      ─────────────────────────────────────────────────────
    start_turn() ── nursery.start ──────▶ turn task (_run)
                                            │ shielded, bounded: store.begin_turn()
                                            │   user row + assistant row 'streaming', one commit
    ◀──────────── started(turn) ────────────┤
                                            ├── generation scope  (CancelScope, deadline)
    SSE body = relay(turn)                  │     provider.generate(emit=deltas.send_nowait)
      (one per client; waits on             │          │
       turn changes, coalesces what         │          ▼  memory channel: the deltas, in order
       is waiting, never touches            │
       the database)                        └── persister     (CancelScope(shield=True))
            ▲                                      appends each delta to turn.chunks ───▶ relays
            └──────────── turn changed ────────────  channel closed ⇒ the generation has ended:
                                                      deadline = now + persist_grace_s, then
                                                      store.finish_reply(): ONE UPDATE by id,
                                                      retried on transient errors; then
                                                      turn.finished ⇒ relays send `done`

Why the shield is where it is: the persister must outlive every way the turn can end. A client
disconnect, the deadline and an explicit stop cancel only the generation scope; shutdown cancels
the whole service nursery. The persister alone is shielded, so it always sees the channel close
and always makes the final commit. Its shield gets a deadline the moment the channel closes, so a
dead database can delay shutdown by at most ``persist_grace_s``, never hang it.

The relays read only what the persister already holds, so whatever reached a client is a prefix of
what is stored, and they send ``done`` only after the final commit. Persistence never waits on a
client (the persister appends and notifies; it never awaits a relay), and no client waits on the
database while deltas flow (the only writes are at the start and at the end).

How each final status arises, in ``_generate``:

    provider returned                         → complete     stop_reason = upstream finish_reason
    UpstreamError (before or mid-stream)      → failed       stop_reason = upstream_error
    any other exception (a bug)               → failed       stop_reason = internal_error
    generation scope: its deadline            → timed_out    stop_reason = deadline
    generation scope: turn.stop(reason)       → interrupted  stop_reason = reason
        (client_disconnected when its last relay left; server_shutdown when draining)
    the service nursery itself is cancelled   → interrupted  stop_reason = server_shutdown
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tenacity
import trio

from ._errors import NotFound, ServiceUnavailable, StoreUnavailable, UpstreamError
from ._provider import Prompt, Provider
from ._settings import Settings
from ._store import Store

log = logging.getLogger("chatsrv.engine")


class Status(enum.StrEnum):
    STREAMING = "streaming"
    COMPLETE = "complete"
    INTERRUPTED = "interrupted"
    TIMED_OUT = "timed_out"
    FAILED = "failed"
    CANCELLED = "cancelled"  # reserved for an explicit stop by the client


class StopReason(enum.StrEnum):
    CLIENT_DISCONNECTED = "client_disconnected"
    SERVER_SHUTDOWN = "server_shutdown"
    DEADLINE = "deadline"
    UPSTREAM_ERROR = "upstream_error"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class Outcome:
    """How a turn ended, as it is stored and as the client's ``done`` event reports it."""

    status: Status
    stop_reason: str
    error_code: str | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None


class Turn:
    """One assistant reply: its ids, the content the persister holds, and how it ended.

    Written only by its turn task; read by any number of relays.
    """

    def __init__(
        self,
        *,
        conversation_id: str,
        user_message_id: str,
        message_id: str,
        model: str,
        deadline: float,
        on_orphaned: Callable[[Turn], None],
    ) -> None:
        self.conversation_id = conversation_id
        self.user_message_id = user_message_id
        self.message_id = message_id
        self.model = model
        # The reply as the persister received it. Relays keep an index into it.
        self.chunks: list[str] = []
        self.outcome: Outcome | None = None
        # False when the final commit could not be made within the persister's grace.
        self.persisted = False
        self.finished = trio.Event()
        self.generation_scope = trio.CancelScope(deadline=deadline)
        self._stop_reason: str | None = None
        self._changed = trio.Event()
        self._relays = 0
        self._on_orphaned = on_orphaned

    @property
    def content(self) -> str:
        return "".join(self.chunks)

    def stop(self, reason: str) -> None:
        """End the generation early; the reply so far is kept as ``interrupted``/``reason``."""
        if self._stop_reason is None and not self.generation_scope.cancel_called:
            self._stop_reason = reason
        self.generation_scope.cancel(reason=reason)

    # -- the persister's side --------------------------------------------------------------

    def _append(self, text: str) -> None:
        self.chunks.append(text)
        self._notify()

    def _finish(self) -> None:
        self.finished.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- the relays' side ------------------------------------------------------------------

    async def wait_changed(self) -> None:
        """Wait until a chunk is appended or the turn finishes."""
        await self._changed.wait()

    def attach(self) -> None:
        self._relays += 1

    def detach(self) -> None:
        """A relay is gone. When the last one leaves an unfinished turn, nobody is listening."""
        self._relays -= 1
        if self._relays == 0 and not self.finished.is_set():
            self._on_orphaned(self)


@dataclass(frozen=True)
class TurnRequest:
    conversation_id: str
    content: str
    model: str


class TurnEngine:
    """Starts turns in its service nursery and drains them at shutdown.

    ``serve`` owns the nursery: run it in a task (``await nursery.start(engine.serve)``). It
    returns once ``drain()`` was called and every turn has ended and committed — at the latest
    ``shutdown_grace_s`` after ``drain()``, plus the persisters' own grace — or, if its task is
    cancelled, as soon as every persister has committed.
    """

    def __init__(self, store: Store, provider: Provider, settings: Settings) -> None:
        self._store = store
        self._provider = provider
        self._settings = settings
        self._turns: dict[str, Turn] = {}
        self._nursery: trio.Nursery | None = None
        self._drain_requested = trio.Event()
        self._idle = trio.Event()
        self._stopping = False  # set when the grace period is over: every turn is being stopped
        self.drained = trio.Event()
        # How the persister retries its final commit. No stop condition: the persister's
        # shield deadline bounds the retries.
        self._retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(StoreUnavailable),
            wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.1),
            sleep=trio.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )

    @property
    def accepting(self) -> bool:
        return self._nursery is not None and not self._drain_requested.is_set()

    def turn(self, message_id: str) -> Turn | None:
        """The running turn that writes this assistant message, if there is one."""
        return self._turns.get(message_id)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                try:
                    await self._drain_requested.wait()
                    log.info("draining %d running turn(s)", len(self._turns))
                    with trio.move_on_after(self._settings.shutdown_grace_s):
                        while self._turns:
                            self._idle = trio.Event()
                            await self._idle.wait()
                finally:
                    # Grace is over, or this task was cancelled: stop what still runs. Each
                    # persister then commits what its turn produced, inside its own shield.
                    self._stopping = True
                    for turn in list(self._turns.values()):
                        turn.stop(StopReason.SERVER_SHUTDOWN)
        finally:
            self.drained.set()

    def drain(self) -> None:
        """Start no new turn; let running ones finish within the grace period, then stop them."""
        self._drain_requested.set()

    async def start_turn(self, request: TurnRequest) -> Turn:
        """Insert the user and assistant rows and start the turn; return it once it runs.

        Raises NotFound for an unknown conversation (nothing written), ServiceUnavailable when
        draining, StoreUnavailable when the database cannot take the turn.
        """
        if self._nursery is None or not self.accepting:
            raise ServiceUnavailable("the server is shutting down; retry on another instance")
        turn: Turn = await self._nursery.start(self._run, request)
        return turn

    # -- the turn task ---------------------------------------------------------------------

    async def _run(self, request: TurnRequest, *, task_status: trio.TaskStatus[Turn]) -> None:
        # Until started() this runs in the caller's context. The insert is shielded so that a
        # client leaving mid-request cannot leave behind a 'streaming' row that no turn owns;
        # it is bounded because a shield without a deadline could hang shutdown.
        with trio.move_on_after(self._settings.db_timeout_s, shield=True) as starting:
            begun = await self._store.begin_turn(
                request.conversation_id, content=request.content, model=request.model
            )
        if starting.cancelled_caught:
            raise StoreUnavailable("the database did not start the turn in time")
        if begun is None:
            raise NotFound("conversation not found")

        turn = Turn(
            conversation_id=request.conversation_id,
            user_message_id=begun.user_message["id"],
            message_id=begun.assistant_message["id"],
            model=request.model,
            deadline=trio.current_time() + self._settings.turn_deadline_s,
            on_orphaned=self._orphaned,
        )
        self._turns[turn.message_id] = turn
        if self._stopping:
            turn.stop(StopReason.SERVER_SHUTDOWN)
        task_status.started(turn)

        prompt = Prompt(model=request.model, messages=begun.history)
        # Unbounded on purpose: the generation must never wait on persistence. The buffer holds
        # at most the reply itself, which the persister keeps anyway.
        deltas_tx, deltas_rx = trio.open_memory_channel[str](math.inf)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._persist, turn, deltas_rx)
                with deltas_tx:
                    await self._generate(turn, prompt, deltas_tx)
        finally:
            del self._turns[turn.message_id]
            if not self._turns:
                self._idle.set()

    async def _generate(
        self, turn: Turn, prompt: Prompt, deltas: trio.MemorySendChannel[str]
    ) -> None:
        """Read the upstream into the channel and decide how the turn ended."""
        try:
            with turn.generation_scope:
                completion = await self._provider.generate(prompt, deltas.send_nowait)
        except UpstreamError as exc:
            turn.outcome = Outcome(
                Status.FAILED, StopReason.UPSTREAM_ERROR, exc.code, f"{exc.code}: {exc.message}"
            )
            return
        except trio.Cancelled:
            # Not our scope: the service nursery is being cancelled, the server is going down.
            turn.outcome = Outcome(
                Status.INTERRUPTED, turn._stop_reason or StopReason.SERVER_SHUTDOWN
            )
            raise
        except Exception as exc:
            log.exception("turn %s: generation failed", turn.message_id)
            turn.outcome = Outcome(
                Status.FAILED, StopReason.INTERNAL_ERROR, "internal_error", repr(exc)
            )
            return

        if not turn.generation_scope.cancelled_caught:
            turn.outcome = Outcome(
                Status.COMPLETE, completion.finish_reason, usage=completion.usage
            )
        elif turn._stop_reason is not None:
            turn.outcome = Outcome(Status.INTERRUPTED, turn._stop_reason)
        else:
            turn.outcome = Outcome(Status.TIMED_OUT, StopReason.DEADLINE)

    async def _persist(self, turn: Turn, deltas: trio.MemoryReceiveChannel[str]) -> None:
        """Hold the reply as it arrives; when the channel closes, commit it with its outcome."""
        try:
            with trio.CancelScope(shield=True) as shield:
                with deltas:
                    async for text in deltas:
                        turn._append(text)
                shield.deadline = trio.current_time() + self._settings.persist_grace_s
                await self._commit(turn)
            if shield.cancelled_caught:
                log.error(
                    "turn %s: no final commit within %.1f s; %d characters unsaved",
                    turn.message_id,
                    self._settings.persist_grace_s,
                    sum(map(len, turn.chunks)),
                )
        except Exception:
            # An error boundary: one turn that cannot be saved never takes the service down.
            log.exception("turn %s: the final commit failed", turn.message_id)
        finally:
            turn._finish()

    async def _commit(self, turn: Turn) -> None:
        outcome = turn.outcome
        if outcome is None:  # every path of _generate sets it; this is a last line of defence
            outcome = Outcome(Status.FAILED, StopReason.INTERNAL_ERROR, "internal_error")
            turn.outcome = outcome
        content = turn.content
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
        turn.persisted = True
        if not found:
            log.info("turn %s: its conversation was deleted while it ran", turn.message_id)
        log.info(
            "turn %s conversation %s: %s/%s, %d characters",
            turn.message_id,
            turn.conversation_id,
            outcome.status,
            outcome.stop_reason,
            len(content),
        )

    def _orphaned(self, turn: Turn) -> None:
        # While draining, a connection that goes away was most likely closed by the server's
        # own graceful timeout; either way the turn ends because of the shutdown.
        draining = self._drain_requested.is_set()
        turn.stop(StopReason.SERVER_SHUTDOWN if draining else StopReason.CLIENT_DISCONNECTED)


def _log_retry(state: tenacity.RetryCallState) -> None:
    log.warning(
        "the database is unavailable (attempt %d): %s; retrying",
        state.attempt_number,
        state.outcome.exception() if state.outcome else None,
    )
