"""A turn's state: its ids, the reply as its persister holds it, and how it ended.

A :class:`Turn` is written by its turn task (the outcome, in the generation) and its persister
(the reply, ``persisted``, ``finished``), pinged by the process's keep-alive task, and read by
any number of clients: the relays of this process's SSE streams, and a publisher to the
processes that follow it (``_publisher.py``). How the tasks around it are arranged is drawn in
``_engine.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio


class Status(enum.StrEnum):
    STREAMING = "streaming"
    COMPLETE = "complete"
    INTERRUPTED = "interrupted"
    TIMED_OUT = "timed_out"
    FAILED = "failed"
    CANCELLED = "cancelled"  # stopped by a client's cancel request


class StopReason(enum.StrEnum):
    CLIENT_DISCONNECTED = "client_disconnected"  # the last client left; the policy is "cancel"
    RESUME_GRACE_EXPIRED = "resume_grace_expired"  # ... and nobody came back within its grace
    USER_CANCELLED = "user_cancelled"  # POST /v1/messages/{id}/cancel
    SERVER_SHUTDOWN = "server_shutdown"
    SERVER_CRASH = "server_crash"  # set by the sweeper, for a process that died
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
    """One assistant reply in the making."""

    def __init__(
        self,
        *,
        conversation_id: str,
        user: str,
        user_message_id: str,
        message_id: str,
        model: str,
        deadline: float,
        started_at: str,
        disconnect_grace_s: float = 0.0,
        prefix: str = "",
        on_deserted: Callable[[Turn], None] | None = None,
    ) -> None:
        self.conversation_id = conversation_id
        self.user = user  # whose conversation it is
        self.user_message_id = user_message_id
        self.message_id = message_id
        self.model = model
        self.started_at = started_at  # ISO 8601, as the assistant message's created_at
        self.began = trio.current_time()
        self.first_delta_at: float | None = None  # when the persister got the first delta
        # How long the turn goes on once its last client has left, waiting for one to resume
        # it: 0 stops it at once, math.inf lets it finish.
        self.disconnect_grace_s = disconnect_grace_s
        # The reply as the persister received it: the deltas since the last fold, one str each,
        # after the text of all earlier ones as one str (see `content`). A continued reply
        # starts with what it held before, as if it were its first delta.
        self.prefix_length = len(prefix)
        self._folded = prefix
        self._folded_deltas = 1 if prefix else 0
        self._recent: list[str] = []
        self.deltas = self._folded_deltas  # received so far
        self.length = len(prefix)  # characters so far
        self.outcome: Outcome | None = None
        # True once the final record is durable: committed, or journaled on local disk.
        self.persisted = False
        self.finished = trio.Event()
        self.generation_scope = trio.CancelScope(deadline=deadline)
        self.stop_reason: str | None = None  # why stop() was called, if it was
        self.stop_status = Status.INTERRUPTED  # and the status it asked for
        self._changed = trio.Event()
        self.changes = 0  # wake-ups of the relays: deltas appended, the finish, pings
        self.relays = 0  # clients attached now (relays, and a publisher to other processes)
        self._attended = trio.Event()  # set while a relay is attached
        self._deserted = trio.Event()  # set once the last relay has left, until one attaches
        self._on_deserted = on_deserted

    @property
    def content(self) -> str:
        """The reply so far. Reading it folds the recent deltas into one string, so that a
        long reply is held as one object rather than one per token (~58 bytes for ~4 bytes of
        text); the persister reads it at each checkpoint and at the end."""
        if self._recent:
            self._folded += "".join(self._recent)
            self._folded_deltas = self.deltas
            self._recent = []
        return self._folded

    def stop(self, reason: str, status: Status = Status.INTERRUPTED) -> None:
        """End the generation early; the reply so far is kept as ``status``/``reason``. Only
        the first call counts, and none once the generation has ended."""
        if self.stop_reason is None and not self.generation_scope.cancel_called:
            self.stop_reason, self.stop_status = reason, status
        self.generation_scope.cancel(reason=reason)

    def cancel(self) -> None:
        """A client asked to stop the reply: it is kept as ``cancelled``/``user_cancelled``."""
        self.stop(StopReason.USER_CANCELLED, Status.CANCELLED)

    # -- the persister's side --------------------------------------------------------------

    def extend(self, texts: list[str]) -> None:
        """Append deltas that arrived together; relays are woken once for all of them."""
        if self.first_delta_at is None:
            self.first_delta_at = trio.current_time()
        self._recent.extend(texts)
        self.deltas += len(texts)
        self.length += sum(map(len, texts))
        self._notify()

    def finish(self) -> None:
        self.finished.set()
        self._notify()

    def ping(self) -> None:
        """Wake the relays with nothing new: each sends a ping (see ``_relay.keep_alive``)."""
        self._notify()

    def _notify(self) -> None:
        self.changes += 1
        self._changed.set()
        self._changed = trio.Event()

    # -- the relays' side ------------------------------------------------------------------

    def since(self, deltas: int, length: int) -> str:
        """The text after the first ``deltas`` deltas, which hold ``length`` characters."""
        first_recent = deltas - self._folded_deltas
        if first_recent >= 0:
            return "".join(self._recent[first_recent:])
        return self._folded[length:] + "".join(self._recent)

    async def wait_changed(self) -> None:
        """Wait until deltas are appended, the turn finishes, or it is pinged."""
        await self._changed.wait()

    def attach(self) -> None:
        self.relays += 1
        if self.relays == 1:
            self._attended.set()
            self._deserted = trio.Event()

    def detach(self) -> None:
        """A relay is gone; the engine applies the disconnect policy when it was the last (at
        once, in ``on_deserted``, for the "cancel" policy)."""
        self.relays -= 1
        if self.relays == 0:
            self._deserted.set()
            self._attended = trio.Event()
            if self._on_deserted is not None and not self.finished.is_set():
                self._on_deserted(self)

    async def wait_attended(self) -> None:
        """Wait until a relay is attached."""
        await self._attended.wait()

    async def wait_deserted(self) -> None:
        """Wait until the last attached relay has left."""
        await self._deserted.wait()
