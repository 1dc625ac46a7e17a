"""The turn engine: it runs every chat turn so that a reply that has started is never lost.

Who owns what::

    request task (POST .../messages)      service nursery (TurnEngine.serve, one per process)
    ────────────────────────────────      ─────────────────────────────────────────────────────
    start_turn() ── inbox channel ──────▶ spawner ── start_soon ──▶ turn task (_run)
                                            │ shielded, bounded: store.begin_turn()
                                            │   user row + assistant row 'streaming', one commit
                                            │   (a continuation: the reply's row back to it)
    ◀──────────── reply channel: turn ──────┤ (the requester gone? the disconnect policy decides)
                                            ├── generation scope  (CancelScope, deadline)
    SSE body = relay(turn)                  │     provider.generate(emit=deltas.send_nowait)
      (one per client, from the start       │          │
       or resumed from an offset; waits     │          ▼  memory channel: the deltas, in order
       on turn changes, coalesces what      ├── _mind_clients: no client for the policy's grace
       is waiting, never touches            │     ⇒ turn.stop()
       the database)                        └── persister     (CancelScope(shield=True))
            ▲                                      appends each delta to the turn ──────▶ relays
            │                                      every checkpoint interval: one UPDATE
            │                                      channel closed ⇒ the generation has ended:
            │                                        ONE final UPDATE by id, retried within a
            │                                        deadline, else the local journal (fsync)
            └──────────── turn changed ────────────  then turn.finished ⇒ relays send `done`

Why the shield is where it is: the persister must outlive every way the turn can end. A client
disconnect, the deadline and an explicit stop cancel only the generation scope; shutdown cancels
the whole service nursery. The persister alone is shielded, so it always sees the channel close
and always saves the reply. Everything it does after the channel closes is bounded (the commit's
retries, then the journal), so a dead database delays shutdown by at most
``CHATSRV_PERSIST_GRACE_S`` plus one fsync, never hangs it. ``_persister.py`` has the details.

The relays read only what the persister already holds, so whatever reached a client is a prefix of
what is stored, and they send ``done`` only once the reply is saved. Persistence never waits on a
client (the persister appends and notifies; it never awaits a relay), and no client waits on the
database while deltas flow (checkpoints run beside the deltas, never in their way). The provider
reads its upstream at most once per ``CHATSRV_FRAME_MS`` (``upstream/_openai.py``): the deltas of
one read reach the persister, and from it each relay, in one wake-up and one event.

Turns are spawned by a task of the service nursery, never by the request task: a turn must not run
in the request's context (its cancellation, its context variables, the request object they keep
alive). A client that leaves while its turn starts cannot cut the insert in half; its turn starts,
finds nobody waiting, and its disconnect policy applies: with "cancel" (grace 0) it ends at once
as ``client_disconnected``.

How each final status arises, in ``_generate``:

    provider returned                         → complete     stop_reason = upstream finish_reason
    UpstreamError (before or mid-stream)      → failed       stop_reason = upstream_error
    any other exception (a bug)               → failed       stop_reason = internal_error
    generation scope: its deadline            → timed_out    stop_reason = deadline
    generation scope: turn.stop(reason)       → interrupted  stop_reason = reason
        client_disconnected: its last client left (policy "cancel")
        resume_grace_expired: ... and none came back within the policy's grace
        server_shutdown: the server is draining
    generation scope: cancel()                → cancelled    stop_reason = user_cancelled
    the service nursery itself is cancelled   → interrupted  stop_reason = server_shutdown

A continued reply (``TurnRequest.continuation``) is a turn like any other that starts from its
message's content instead of an empty one: the row goes back to 'streaming', the Turn holds the
old content as its first delta, and the prompt ends with it and ``CONTINUE_INSTRUCTION``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TypeGuard

import trio

from chatsrv import _metrics as metrics
from chatsrv._errors import (
    ExistingTurn,
    NotContinuable,
    NotFound,
    ServiceUnavailable,
    StoreUnavailable,
    UpstreamError,
)
from chatsrv._settings import Settings
from chatsrv.store import Message, Store, TurnStart
from chatsrv.upstream import Prompt, Provider

from ._persister import Persister
from ._turn import Outcome, Status, StopReason, Turn

log = logging.getLogger("chatsrv.engine")


# A turn whose stream no client starts reading within this time has nobody to stream to.
_RELAY_ATTACH_S = 10.0


@dataclass(frozen=True)
class TurnRequest:
    conversation_id: str
    content: str
    # Whose turn it is: the conversation must be theirs, and it counts against their streams.
    user: str = field(kw_only=True)
    model: str | None = None  # else the conversation's, else the configured default
    idempotency_key: str | None = None
    # The disconnect policy: how long the turn goes on once its last client has left, waiting
    # for one to resume it (0: "cancel", math.inf: "finish").
    disconnect_grace_s: float = 0.0
    # Continue this assistant message (it ended early) instead of answering ``content``.
    continues: str | None = None

    @classmethod
    def continuation(cls, message_id: str, *, user: str, disconnect_grace_s: float) -> TurnRequest:
        """Continue the assistant message ``message_id``, which ended early; its conversation,
        model and prompt come from the store."""
        return cls("", "", user=user, continues=message_id, disconnect_grace_s=disconnect_grace_s)


# A continued reply's prompt ends with what it held, as the assistant's, and then this.
CONTINUE_INSTRUCTION = (
    "Continue your previous message from exactly where it stopped, without repeating any of it."
)


@dataclass(frozen=True)
class _Start:
    request: TurnRequest
    # One-shot, buffered: the turn task hands back the Turn (or why there is none) without
    # waiting, and learns from a closed channel that the requester has gone.
    reply: trio.MemorySendChannel[Turn | Exception]


class TurnEngine:
    """Starts turns in its service nursery and drains them at shutdown.

    ``serve`` owns the nursery: run it in a task (``await nursery.start(engine.serve)``). It
    returns once ``drain()`` was called and every turn has ended and been saved — at the latest
    ``shutdown_grace_s`` after ``drain()``, plus the persisters' own bounded time — or, if its
    task is cancelled, as soon as every persister is done. ``owner`` names this process in the
    leases of the rows it streams.
    """

    def __init__(
        self, store: Store, provider: Provider, persister: Persister, settings: Settings, owner: str
    ) -> None:
        self._store = store
        self._provider = provider
        self._persister = persister
        self._settings = settings
        self.owner = owner
        self._turns: dict[str, Turn] = {}
        self._starting = 0  # turns asked for and not yet registered in _turns
        # Starts under way by conversation and Idempotency-Key (see _lost_start).
        self._keyed_starts: Counter[tuple[str, str | None]] = Counter()
        # Unbounded: what waits here is bounded by the HTTP requests waiting in start_turn.
        self._inbox_tx, self._inbox_rx = trio.open_memory_channel[_Start](math.inf)
        self._nursery: trio.Nursery | None = None
        self._drain_requested = trio.Event()
        self._idle = trio.Event()
        self._stopping = False  # set when the grace period is over: every turn is being stopped
        self.drained = trio.Event()

    @property
    def accepting(self) -> bool:
        return self._nursery is not None and not self._drain_requested.is_set()

    def turn(self, message_id: str, *, user: str | None) -> Turn | None:
        """The running turn that writes this assistant message, if there is one and it is
        ``user``'s (``None``: anyone's)."""
        turn = self._turns.get(message_id)
        if turn is None or (user is not None and turn.user != user):
            return None
        return turn

    def running(self) -> list[str]:
        """The assistant message ids of the turns running now."""
        return list(self._turns)

    def turns(self) -> list[Turn]:
        """The turns running now."""
        return list(self._turns.values())

    async def cancel(self, message_id: str, *, user: str | None) -> Turn | None:
        """Stop the turn writing this assistant message, if it runs here and is ``user``'s
        (``None``: anyone's), as ``cancelled``/``user_cancelled`` (unless it has already ended
        otherwise); return it once its reply is saved (or journaled), or None if no such turn
        runs here."""
        turn = self.turn(message_id, user=user)
        if turn is None:
            await trio.lowlevel.checkpoint()
            return None
        turn.cancel()
        await turn.finished.wait()
        return turn

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._spawn_turns, nursery)
                task_status.started()
                try:
                    await self._drain_requested.wait()
                    log.info("draining %d running turn(s)", len(self._turns) + self._starting)
                    with trio.move_on_after(self._settings.shutdown_grace_s):
                        while self._turns or self._starting:
                            self._idle = trio.Event()
                            await self._idle.wait()
                finally:
                    self._inbox_tx.close()  # the spawner starts what is queued, then ends
                    # Grace is over, or this task was cancelled: stop what still runs. Each
                    # persister then saves what its turn produced, inside its own shield, and
                    # quickly: a shutdown does not wait out the full retry budget.
                    self._stopping = True
                    self._persister.hurry()
                    for turn in list(self._turns.values()):
                        turn.stop(StopReason.SERVER_SHUTDOWN)
        finally:
            self.drained.set()

    def drain(self) -> None:
        """Start no new turn; let running ones finish within the grace period, then stop them."""
        self._drain_requested.set()

    async def start_turn(self, request: TurnRequest) -> Turn:
        """Insert the user and assistant rows and start the turn; return it once it runs.

        Raises NotFound for an unknown conversation or one of another user (nothing written),
        ExistingTurn when the request's Idempotency-Key names a turn already started,
        ServiceUnavailable when draining or when ``max_active_turns`` run already, TooManyStreams
        when the user streams ``max_streams_per_user`` replies already (nothing written in
        either case), StoreUnavailable when the database cannot take the turn.
        """
        unavailable = ServiceUnavailable("the server is shutting down; retry on another instance")
        if not self.accepting:
            raise unavailable
        if len(self._turns) + self._starting >= self._settings.max_active_turns:
            raise ServiceUnavailable(
                "this server runs as many turns as it may; retry later", code="too_many_turns"
            )
        reply_tx, reply_rx = trio.open_memory_channel[Turn | Exception](1)
        try:
            self._inbox_tx.send_nowait(_Start(request, reply_tx))
        except trio.ClosedResourceError:  # the engine was cancelled rather than drained
            raise unavailable from None
        self._starting += 1
        with reply_rx:
            result = await reply_rx.receive()
        if isinstance(result, Exception):
            raise result
        return result

    async def _spawn_turns(self, nursery: trio.Nursery) -> None:
        async for start in self._inbox_rx:
            nursery.start_soon(self._run, start)

    # -- the turn task ---------------------------------------------------------------------

    async def _run(self, start: _Start) -> None:
        with start.reply:
            try:
                try:
                    turn, history = await self._begin(start.request)
                except Exception as exc:
                    # Told to the requester, if it is still there (the buffer has room for it).
                    with contextlib.suppress(trio.BrokenResourceError):
                        start.reply.send_nowait(exc)
                    return
                self._turns[turn.message_id] = turn
                metrics.TURNS_RUNNING.inc()
            finally:
                self._starting -= 1
                self._maybe_idle()
            if self._stopping:
                turn.stop(StopReason.SERVER_SHUTDOWN)
            try:
                start.reply.send_nowait(turn)
                first_grace_s = max(_RELAY_ATTACH_S, turn.disconnect_grace_s)
            except trio.BrokenResourceError:  # the client left while the turn started
                first_grace_s = turn.disconnect_grace_s
                if not first_grace_s:  # "cancel": before the generation has even begun
                    turn.stop(StopReason.CLIENT_DISCONNECTED)

        prompt = Prompt(model=turn.model, messages=history)
        # Unbounded on purpose: the generation must never wait on persistence. The buffer holds
        # at most the reply itself, which the persister keeps anyway.
        deltas_tx, deltas_rx = trio.open_memory_channel[str](math.inf)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._persister.run, turn, deltas_rx)
                nursery.start_soon(self._mind_clients, turn, first_grace_s)
                with deltas_tx:
                    await self._generate(turn, prompt, deltas_tx)
                # The generation is over; only the (shielded) persister is left to wait for.
                nursery.cancel_scope.cancel(reason="the generation has ended")
        finally:
            del self._turns[turn.message_id]
            metrics.TURNS_RUNNING.dec()
            self._maybe_idle()

    async def _begin(self, request: TurnRequest) -> tuple[Turn, list[dict[str, str]]]:
        """Insert the turn's rows; the Turn, and the prompt's messages."""
        key = (request.conversation_id, request.idempotency_key)
        self._keyed_starts[key] += 1
        try:
            # Shielded so that a shutdown arriving mid-insert cannot leave behind a 'streaming'
            # row that no turn owns; bounded because a shield without a deadline could hang
            # shutdown. (Should the insert commit after the bound all the same, its row is
            # swept, and a retry with its Idempotency-Key starts the turn anew: _lost_start.)
            with trio.move_on_after(self._settings.db_timeout_s, shield=True) as starting:
                begun = await self._insert(request)
                if self._lost_start(begun, key):
                    await self._store.abandon(begun.assistant_message["id"], owner=self.owner)
                    begun = await self._insert(request)  # which forgets the lost start
        finally:
            self._keyed_starts[key] -= 1
            if not self._keyed_starts[key]:
                del self._keyed_starts[key]
        if starting.cancelled_caught:
            raise StoreUnavailable("the database did not start the turn in time")
        if begun is None:
            raise NotFound("message not found" if request.continues else "conversation not found")
        if not isinstance(begun, TurnStart):
            raise NotContinuable(begun)
        if begun.existing:
            raise ExistingTurn(begun.user_message, begun.assistant_message)
        turn = Turn(
            conversation_id=begun.assistant_message["conversation_id"],
            user=request.user,
            user_message_id=begun.user_message["id"],
            message_id=begun.assistant_message["id"],
            model=begun.assistant_message["model"] or self._settings.model,
            deadline=trio.current_time() + self._settings.turn_deadline_s,
            started_at=begun.assistant_message["created_at"],
            disconnect_grace_s=request.disconnect_grace_s,
            prefix=begun.assistant_message["content"],
            on_deserted=self._deserted,
        )
        history = begun.history
        if turn.prefix_length:  # a continuation: the reply so far, and the ask to go on
            history = [
                *history,
                {"role": "assistant", "content": turn.content},
                {"role": "user", "content": CONTINUE_INSTRUCTION},
            ]
        return turn, history

    async def _insert(self, request: TurnRequest) -> TurnStart | Message | None:
        settings = self._settings
        if request.continues is not None:
            return await self._store.begin_continuation(
                request.continues,
                user=request.user,
                owner=self.owner,
                lease_s=settings.lease_s,
                max_streams=settings.max_streams_per_user,
            )
        return await self._store.begin_turn(
            request.conversation_id,
            user=request.user,
            content=request.content,
            model=request.model,
            default_model=settings.model,
            owner=self.owner,
            lease_s=settings.lease_s,
            max_streams=settings.max_streams_per_user,
            idempotency_key=request.idempotency_key,
        )

    def _lost_start(
        self, begun: TurnStart | Message | None, key: tuple[str, str | None]
    ) -> TypeGuard[TurnStart]:
        """Whether the Idempotency-Key names a reply this process was starting, whose insert
        outlived its bound and committed all the same: it is ours and streaming, no turn of
        ours runs it, and no other request is starting it now."""
        return (
            isinstance(begun, TurnStart)
            and begun.existing
            and begun.owner == self.owner
            and begun.assistant_message["id"] not in self._turns
            and self._keyed_starts[key] == 1
        )

    async def _mind_clients(self, turn: Turn, grace_s: float) -> None:
        """The disconnect policy: stop the turn once it has had no client for ``grace_s`` (at
        first: until its requester's stream begins), then for its own grace each time its last
        client leaves. A client that resumes the stream meanwhile keeps it going."""
        while True:
            with trio.move_on_after(grace_s) as unattended:
                await turn.wait_attended()
            if unattended.cancelled_caught and not turn.relays:
                break
            await turn.wait_deserted()
            grace_s = turn.disconnect_grace_s
        turn.stop(self._unattended(turn))

    def _deserted(self, turn: Turn) -> None:
        """The last client left. With the "cancel" policy the generation stops now, in the
        leaving relay's own step: the upstream stops being paid without waiting for a task
        switch, and the reply is committed sooner."""
        if not turn.disconnect_grace_s:
            turn.stop(self._unattended(turn))

    def _unattended(self, turn: Turn) -> StopReason:
        """Why a turn that nobody streams stops."""
        if self._drain_requested.is_set():
            # While draining, a connection that goes away was most likely closed by the
            # server's own graceful timeout; either way the turn ends because of the shutdown.
            return StopReason.SERVER_SHUTDOWN
        if turn.disconnect_grace_s:
            return StopReason.RESUME_GRACE_EXPIRED
        return StopReason.CLIENT_DISCONNECTED

    def _maybe_idle(self) -> None:
        if not self._turns and not self._starting:
            self._idle.set()

    async def _generate(
        self, turn: Turn, prompt: Prompt, deltas: trio.MemorySendChannel[str]
    ) -> None:
        """Read the upstream into the channel and decide how the turn ended."""
        try:
            with turn.generation_scope:
                completion = await self._provider.generate(prompt, deltas.send_nowait)
        except UpstreamError as exc:
            metrics.UPSTREAM_ERRORS.labels(exc.code).inc()
            turn.outcome = Outcome(
                Status.FAILED, StopReason.UPSTREAM_ERROR, exc.code, f"{exc.code}: {exc.message}"
            )
            return
        except trio.Cancelled:
            # Not our scope: the service nursery is being cancelled, the server is going down.
            if turn.stop_reason is None:
                turn.outcome = Outcome(Status.INTERRUPTED, StopReason.SERVER_SHUTDOWN)
            else:
                turn.outcome = Outcome(turn.stop_status, turn.stop_reason)
            raise
        except Exception:
            log.exception("turn %s: generation failed", turn.message_id)
            turn.outcome = Outcome(
                Status.FAILED, StopReason.INTERNAL_ERROR, "internal_error", "internal error"
            )
            return

        if not turn.generation_scope.cancelled_caught:
            turn.outcome = Outcome(
                Status.COMPLETE, completion.finish_reason, usage=completion.usage
            )
        elif turn.stop_reason is not None:
            turn.outcome = Outcome(turn.stop_status, turn.stop_reason)
        else:
            turn.outcome = Outcome(Status.TIMED_OUT, StopReason.DEADLINE)
