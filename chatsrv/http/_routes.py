"""The HTTP API, v1. Routes parse and validate, call the store or the engine, shape the response.

A request that fails validation is answered before anything is written. Every route but the
health checks is a user's (``_auth.py``): another user's conversation or message is answered
exactly as one that does not exist.

A reply's stream can be left and taken up again: ``GET /v1/messages/{id}/events`` resumes it
after the character offset of ``Last-Event-ID`` (the ids of the delta events) on whichever
process the request lands, an Idempotency-Key retry of the POST attaches to its turn the same
way, ``POST /v1/messages/{id}/cancel`` stops it wherever it runs, ``POST
/v1/messages/{id}/continue`` makes one that ended early go on, and ``GET /v1/turns`` lists the
replies streaming now.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol, TypeVar

import orjson
import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from quart import Blueprint, Response, current_app, g, request
from quart_schema import document_querystring, document_request, document_response, hide

from chatsrv._errors import ExistingTurn, InvalidRequest, NotFound, StoreError
from chatsrv._metrics import REQUESTS, exposition
from chatsrv._settings import Settings
from chatsrv.engine import Journal, Peers, TurnEngine, TurnRequest
from chatsrv.store import Conversation, Message, Store

from ._auth import Authenticator
from ._contract import PUBLIC, ConversationList, Health, MessageList, TurnList
from ._relay import followed, relay, replayed

api = Blueprint("api", __name__)

# How long a readiness probe waits for the database.
_READINESS_PING_S = 2.0

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx and compatible proxies: pass each event through at once.
    "X-Accel-Buffering": "no",
}


class _Body(BaseModel):
    # Strict: a number where a string belongs is an error, not a conversion. Unknown fields are
    # ignored so that clients may send more than this version reads.
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # PostgreSQL's text cannot hold U+0000; refuse it on every store alike.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain the NUL character")
        return value


class NewConversation(_Body):
    title: str | None = Field(None, max_length=1000)
    model: str | None = Field(None, min_length=1, max_length=200)
    system: str | None = None


# The most conversations one list returns.
_LIST_MAX = 1000


class Listing(BaseModel):
    limit: int = Field(100, ge=1, le=_LIST_MAX)


class Grace(_Body):
    # Up to a day: a reply nobody comes back for should not run on for longer.
    grace_s: float = Field(gt=0, le=86400)


class Continuation(_Body):
    # What happens when the last client leaves: "cancel" stops the generation, "finish" lets
    # it run to its end, {"grace_s": N} waits N seconds for a client to resume, then stops.
    # Unset: CHATSRV_ON_DISCONNECT.
    on_disconnect: Literal["cancel", "finish"] | Grace | None = None


class NewMessage(Continuation):
    content: str
    model: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("content")
    @classmethod
    def _not_blank(cls, content: str) -> str:
        if not content.strip():
            raise ValueError("must not be empty")
        return content


_B = TypeVar("_B", bound=_Body)


async def _parse(model: type[_B]) -> _B:
    raw = await request.get_data(as_text=False)
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the body is not valid JSON: {exc}", code="invalid_json", status=400
        ) from exc
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from exc


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "body"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


class Backend(Protocol):
    """What the routes use of the running service (``chatsrv._service.Service`` is one), found
    in ``current_app.extensions["chatsrv"]``."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> Store: ...

    @property
    def journal(self) -> Journal: ...

    @property
    def engine(self) -> TurnEngine: ...

    @property
    def peers(self) -> Peers: ...

    @property
    def authenticator(self) -> Authenticator: ...


def _service() -> Backend:
    service: Backend = current_app.extensions["chatsrv"]
    return service


@api.before_request
async def authenticate() -> None:
    """Find the request's user before any route runs (a CORS preflight has none)."""
    rule = request.url_rule.rule if request.url_rule is not None else None
    if rule in PUBLIC or request.method == "OPTIONS":
        return
    if request.endpoint == "api.metrics" and _service().settings.metrics == "public":
        return
    g.chatsrv_user = await _service().authenticator.user(request.headers.get("Authorization"))


def _user() -> str:
    user: str = g.chatsrv_user
    return user


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


@api.get("/healthz")
@document_response(Health)
async def healthz() -> Response:
    """The process is up and serving HTTP."""
    return _json({"status": "ok"})


@api.get("/metrics")
@hide
async def metrics() -> Response:
    """The server's figures in Prometheus's text format (``chatsrv/_metrics.py``)."""
    if _service().settings.metrics == "off":
        raise NotFound("not found")
    body, content_type = exposition()
    return Response(body, status=200, content_type=content_type)


@api.after_app_request
async def count(response: Response) -> Response:
    """Count every request by its route (the rule, not the path: ids would be endless labels)."""
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    REQUESTS.labels(route, str(response.status_code)).inc()
    return response


@api.get("/readyz")
@document_response(Health)
async def readyz() -> Response:
    """Ready to take turns: not draining, the database answers, the journal is empty."""
    service = _service()
    problems = []
    if not service.engine.accepting:
        problems.append("the server is draining")
    try:
        with trio.fail_after(_READINESS_PING_S):
            await service.store.ping()
    except (StoreError, trio.TooSlowError):
        problems.append("the database does not answer")
    if service.journal.holds_records():
        problems.append("the local journal holds replies not yet written to the database")
    if problems:
        body = {"error": {"code": "not_ready", "message": "; ".join(problems)}}
        response = _json(body, 503)
        response.headers["Retry-After"] = "5"
        return response
    return _json({"status": "ready"})


@api.post("/v1/conversations")
@document_request(NewConversation)
@document_response(Conversation, 201)
async def create_conversation() -> Response:
    body = await _parse(NewConversation)
    conversation = await _service().store.create_conversation(
        user=_user(), title=body.title, model=body.model, system=body.system
    )
    return _json(conversation, 201)


@api.get("/v1/conversations")
@document_querystring(Listing)
@document_response(ConversationList)
async def list_conversations() -> Response:
    limit = request.args.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= _LIST_MAX:
        raise InvalidRequest(f"limit: must be an integer from 1 to {_LIST_MAX}")
    conversations = await _service().store.list_conversations(user=_user(), limit=int(limit))
    return _json({"conversations": conversations})


@api.get("/v1/conversations/<conversation_id>")
@document_response(Conversation)
async def get_conversation(conversation_id: str) -> Response:
    conversation = await _service().store.get_conversation(conversation_id, user=_user())
    if conversation is None:
        raise NotFound("conversation not found")
    return _json(conversation)


@api.delete("/v1/conversations/<conversation_id>")
async def delete_conversation(conversation_id: str) -> Response:
    if not await _service().store.delete_conversation(conversation_id, user=_user()):
        raise NotFound("conversation not found")
    return Response(b"", status=204)


@api.get("/v1/conversations/<conversation_id>/messages")
@document_response(MessageList)
async def list_messages(conversation_id: str) -> Response:
    messages = await _service().store.list_messages(conversation_id, user=_user())
    if messages is None:
        raise NotFound("conversation not found")
    return _json({"messages": messages})


@api.post("/v1/conversations/<conversation_id>/messages")
@document_request(NewMessage)
async def post_message(conversation_id: str) -> Response:
    service = _service()
    body = await _parse(NewMessage)
    if len(body.content) > service.settings.max_message_chars:
        raise InvalidRequest(f"content: at most {service.settings.max_message_chars} characters")
    key = _idempotency_key()
    after = _last_event_id()  # for a retry that attaches to its turn
    turn_request = TurnRequest(
        conversation_id,
        body.content,
        body.model,
        user=_user(),
        idempotency_key=key,
        disconnect_grace_s=_grace_s(body, service.settings),
    )
    try:
        turn = await service.engine.start_turn(turn_request)
    except ExistingTurn as existing:
        if existing.user_message["content"] != body.content:
            raise InvalidRequest(
                "Idempotency-Key: already used for a different message in this conversation",
                code="idempotency_key_reused",
            ) from None
        return await _stream_of(existing.assistant_message["id"], after)
    return _event_stream(relay(turn))


def _grace_s(body: Continuation, settings: Settings) -> float:
    """The disconnect policy of a turn's request, as the engine takes it."""
    policy = body.on_disconnect or settings.on_disconnect
    if policy == "cancel":
        return 0.0
    if policy == "finish":
        return math.inf
    return policy.grace_s if isinstance(policy, Grace) else float(policy)


@api.post("/v1/messages/<message_id>/continue")
@document_request(Continuation)
async def continue_message(message_id: str) -> Response:
    """Continue a reply that ended early: the same message grows, and its stream goes on from
    its length (a ``start`` event, then deltas whose ids go on from there)."""
    service = _service()
    body = await _parse(Continuation)
    grace_s = _grace_s(body, service.settings)
    turn_request = TurnRequest.continuation(message_id, user=_user(), disconnect_grace_s=grace_s)
    turn = await service.engine.start_turn(turn_request)
    return _event_stream(relay(turn, after=turn.prefix_length, announce=True))


@api.get("/v1/messages/<message_id>/events")
async def message_events(message_id: str) -> Response:
    return await _stream_of(message_id, _last_event_id())


async def _stream_of(message_id: str, after: int | None) -> Response:
    """The SSE stream of an assistant message: from its ``start`` event (``after=None``) or
    after character ``after``; live from the turn if it runs here, followed through the
    database if another process runs it, replayed from its row if it has ended."""
    service = _service()
    turn = service.engine.turn(message_id, user=_user())
    if turn is not None:
        _check_offset(after, turn.length)
        return _event_stream(relay(turn, after=after))
    message = await _assistant_message(message_id)
    if message["status"] == "streaming":  # another process writes it
        follower = service.peers.follower(message_id, after=after or 0)
        try:
            await follower.start()
            # Its owner may hold more than it saved: only the owner's own length can refuse
            # an offset (without an answer, an offset past the saved reply is waited for).
            if follower.length is not None:
                _check_offset(after, follower.length)
        except BaseException:
            follower.close()
            raise
        return _event_stream(followed(message, follower.updates(), after=after))
    _check_offset(after, len(message["content"]))
    return _event_stream(replayed(message, after=after))


async def _assistant_message(message_id: str) -> Message:
    message = await _service().store.get_message(message_id, user=_user())
    if message is None or message["role"] != "assistant":
        raise NotFound("message not found")
    return message


def _last_event_id() -> int | None:
    """The character offset a resumed stream starts after: the ``Last-Event-ID`` header (what
    a browser's EventSource sends when it reconnects), else ``?last_event_id=``."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.args.get("last_event_id")
    if raw is None or not raw.strip():  # an empty id is no id (the SSE specification)
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 15):
        raise InvalidRequest(
            "Last-Event-ID: must be the id of a delta event, a character offset",
            code="invalid_last_event_id",
            status=400,
        )
    return int(raw)


def _check_offset(after: int | None, length: int) -> None:
    if after is not None and after > length:
        raise InvalidRequest(
            f"Last-Event-ID: the reply has only {length} characters",
            code="offset_out_of_range",
            status=400,
        )


@api.post("/v1/messages/<message_id>/cancel")
@document_response(Message)
async def cancel_message(message_id: str) -> Response:
    """Stop a reply wherever it streams; answer with the message once it is final. A reply that
    has ended already is answered as it is, unchanged."""
    message = await _service().peers.cancel(message_id, user=_user())
    if message is None:
        raise NotFound("message not found")
    return _json(message)


@api.get("/v1/turns")
@document_response(TurnList)
async def list_turns() -> Response:
    """The user's replies streaming now, on every process, oldest first."""
    return _json({"turns": await _service().peers.running_replies(user=_user())})


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= 255 and key.isprintable()):
        raise InvalidRequest(
            "Idempotency-Key: 1 to 255 printable characters", code="invalid_header", status=400
        )
    return key


def _event_stream(body: AsyncIterator[bytes] | bytes) -> Response:
    response = Response(
        body, status=200, headers=SSE_HEADERS, content_type="text/event-stream; charset=utf-8"
    )
    # Quart's RESPONSE_TIMEOUT (60 s) would cut long replies; the turn's deadline applies instead.
    response.timeout = None
    return response


@api.get("/v1/messages/<message_id>")
@document_response(Message)
async def get_message(message_id: str) -> Response:
    message = await _service().store.get_message(message_id, user=_user())
    if message is None:
        raise NotFound("message not found")
    return _json(message)
