"""The errors chatsrv raises, and how each one reaches a client.

Third-party exceptions (SQLAlchemy, asyncpg, aiosqlite, openai, httpx) are mapped to this tree at
the module that talks to them (``raise StoreUnavailable(...) from exc``); nothing above the store
or the provider ever sees a foreign exception type::

    ChatsrvError
    ├── RequestError            a client's mistake: an HTTP 4xx with a JSON body, nothing written
    │   ├── InvalidRequest      400 malformed JSON, 422 a body that does not validate
    │   └── NotFound            404 unknown conversation, message or route
    │   ├── NotContinuable      409 a reply that cannot be continued (it is complete or streams)
    │   ├── ExistingTurn        an Idempotency-Key names a turn already started: the route
    │                           streams that turn instead (409 only if it ever escaped)
    │   ├── Unauthorized        401 a missing, unknown or revoked API key
    │   └── TooManyStreams      429 the user streams CHATSRV_MAX_STREAMS_PER_USER replies already
    ├── ServiceUnavailable      503 the server is draining and starts no new turn
    ├── UnsafeSettings          the settings would expose chatsrv: it does not start
    ├── StoreError              the database failed; a turn's persister gives up on it
    │   ├── StoreUnavailable    transient (connection lost or refused, locked, timed out): retry
    │   └── SchemaMismatch      the database's schema is not this chatsrv's: chatsrv does not start
    └── UpstreamError           the model upstream refused or broke; ``code`` names how

Before the SSE headers are sent an error is an HTTP status with the body
``{"error": {"code": ..., "message": ...}}``; after, it is an ``error`` event followed by ``done``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ChatsrvError(Exception):
    """The root of every error chatsrv raises on purpose."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class RequestError(ChatsrvError):
    """The request cannot be served as sent; the client should change it."""

    code = "invalid_request"
    status = 400


class InvalidRequest(RequestError):
    """Malformed JSON (400, ``invalid_json``) or a body that fails validation (422)."""

    def __init__(self, message: str, *, code: str = "invalid_request", status: int = 422) -> None:
        super().__init__(message, code=code)
        self.status = status


class NotFound(RequestError):
    code = "not_found"
    status = 404


class NotContinuable(RequestError):
    """``POST /v1/messages/{id}/continue`` on a reply that did not end early: it is complete, or
    it streams now. The message is as it is."""

    code = "not_continuable"
    status = 409

    def __init__(self, reply: Mapping[str, Any]) -> None:
        super().__init__(f"a {reply['status']} reply cannot be continued")
        self.reply = reply


class ExistingTurn(RequestError):
    """The request's Idempotency-Key names a turn that already exists. The route answers with
    that turn's stream (attached while it runs, replayed once it has finished), so this never
    reaches a client as an error."""

    code = "turn_in_progress"
    status = 409

    def __init__(self, user_message: Mapping[str, Any], assistant_message: Mapping[str, Any]):
        super().__init__("a turn with this Idempotency-Key is still running")
        self.user_message = user_message
        self.assistant_message = assistant_message

    def to_json(self) -> dict[str, dict[str, str]]:
        body = super().to_json()
        body["error"]["message_id"] = str(self.assistant_message["id"])
        return body


class Unauthorized(RequestError):
    """No API key, or one that is unknown or revoked (``WWW-Authenticate: Bearer``)."""

    code = "unauthorized"
    status = 401


class TooManyStreams(RequestError):
    """The user's replies streaming now are as many as ``CHATSRV_MAX_STREAMS_PER_USER``; the turn
    was not started and nothing was written."""

    code = "too_many_streams"
    status = 429

    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} replies may stream at once for one user; retry later")


class ServiceUnavailable(ChatsrvError):
    code = "unavailable"
    status = 503


class UnsafeSettings(ChatsrvError):
    """The settings would expose every conversation (no API keys on a non-loopback address);
    chatsrv refuses to start, and the message says what to change."""

    code = "unsafe_settings"


class StoreError(ChatsrvError):
    """The database did not do what was asked."""

    code = "storage_error"


class StoreUnavailable(StoreError):
    """A failure worth retrying: the connection was lost or refused, the database was locked or
    did not answer in time."""

    code = "storage_unavailable"
    status = 503


class SchemaMismatch(StoreError):
    """The database's schema is behind this chatsrv's (and may not be upgraded automatically),
    or ahead of it; the message says what to run."""

    code = "schema_mismatch"


class UpstreamError(ChatsrvError):
    """The model upstream refused the request or broke while streaming.

    ``code`` is one of ``upstream_status`` (an HTTP error status; ``status_code`` holds it),
    ``upstream_connection`` (unreachable, reset, timed out), ``upstream_protocol`` (a stream that
    ended early or could not be parsed) or ``upstream_error`` (an error object inside the stream).
    """

    code = "upstream_error"
    status = 502

    def __init__(
        self, message: str, *, code: str = "upstream_error", status_code: int | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.status_code = status_code
