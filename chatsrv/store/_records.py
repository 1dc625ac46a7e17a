"""The store's records: the shapes of conversations and messages as chatsrv hands them out, and
how a database row becomes one (ids as canonical UUID strings, timestamps as ISO 8601 UTC).

Only the store builds these; everything else reads them.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import Row

# typing_extensions' TypedDict: pydantic (the published API contract) reads these on 3.11.
from typing_extensions import TypedDict


class Conversation(TypedDict):
    id: str
    title: str | None
    model: str | None
    system: str | None
    created_at: str


class Message(TypedDict):
    id: str
    conversation_id: str
    role: str
    content: str
    status: str
    stop_reason: str | None
    error: str | None
    model: str | None
    usage: dict[str, Any] | None
    created_at: str
    updated_at: str
    parent_id: str | None  # an assistant message: the user message it answers


class ApiKey(TypedDict):
    """An API key as ``chatsrv keys list`` shows it (the key itself is never stored)."""

    id: str
    user: str
    created_at: str
    revoked_at: str | None


class RunningReply(TypedDict):
    """A reply some process is streaming now, as ``GET /v1/turns`` lists it."""

    message_id: str
    conversation_id: str
    offset: int  # characters saved so far (its owner may hold more)
    started_at: str
    owner: str  # the process that runs the turn


@dataclass(frozen=True)
class TurnStart:
    user_message: Message
    assistant_message: Message
    # The upstream prompt: the system prompt if any, earlier messages with content, the new one.
    history: list[dict[str, str]]
    # True when the Idempotency-Key named a turn that already exists: the messages are that
    # turn's, nothing was written, and the history is empty; ``owner`` is the process that
    # streams its reply, while it streams.
    existing: bool = False
    owner: str | None = None


class Clock:
    """UTC timestamps, strictly increasing within the process: max(now, last + 1 µs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = datetime.min.replace(tzinfo=UTC)

    def now(self) -> datetime:
        with self._lock:
            self._last = max(datetime.now(UTC), self._last + timedelta(microseconds=1))
            return self._last


CLOCK: Final = Clock()

# The user every request is when CHATSRV_AUTH=off, named 'local'; it owns the conversations made
# before chatsrv had users (migration 0003 creates it).
LOCAL_USER_ID: Final = "00000000-0000-0000-0000-000000000000"


def parse_id(value: str) -> str | None:
    """The canonical form of a UUID string, or None if it is not one."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class NewTurn:
    cid: str
    user: str
    content: str
    model: str | None
    default_model: str
    owner: str
    lease_s: float
    idempotency_key: str | None
    max_streams: int


def new_message(
    cid: str, role: str, content: str, status: str, model: str | None, at: datetime
) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "conversation_id": cid,
        "role": role,
        "content": content,
        "status": status,
        "stop_reason": None,
        "error": None,
        "model": model,
        "usage": None,
        "created_at": at,
        "updated_at": at,
        "parent_id": None,
        "idempotency_key": None,
        "owner": None,
        "lease_expires_at": None,
    }


def iso(value: datetime) -> str:
    """ISO 8601 in UTC with microseconds; SQLite hands back naive datetimes, which are UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def conversation_record(row: Any) -> Conversation:
    if isinstance(row, Row):
        row = row._mapping
    return Conversation(
        id=str(row["id"]),
        title=row["title"],
        model=row["model"],
        system=row["system_prompt"],
        created_at=iso(row["created_at"]),
    )


def key_record(row: Any) -> ApiKey:
    revoked = row["revoked_at"]
    return ApiKey(
        id=row["id"],
        user=row["name"],
        created_at=iso(row["created_at"]),
        revoked_at=None if revoked is None else iso(revoked),
    )


def running_record(row: Any) -> RunningReply:
    return RunningReply(
        message_id=str(row["id"]),
        conversation_id=str(row["conversation_id"]),
        offset=int(row["offset"]),
        started_at=iso(row["created_at"]),
        owner=str(row["owner"]),
    )


def message_record(row: Any) -> Message:
    return Message(
        id=str(row["id"]),
        conversation_id=str(row["conversation_id"]),
        role=row["role"],
        content=row["content"],
        status=row["status"],
        stop_reason=row["stop_reason"],
        error=row["error"],
        model=row["model"],
        usage=row["usage"],
        created_at=iso(row["created_at"]),
        updated_at=iso(row["updated_at"]),
        parent_id=None if row["parent_id"] is None else str(row["parent_id"]),
    )
