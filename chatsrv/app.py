"""The ASGI application: ``hypercorn -c hypercorn.toml "chatsrv.app:create_app()"``.

``create_app`` builds a Quart-Trio app whose lifespan runs the service (store, journal, provider,
turn engine) in quart-trio's app nursery. At lifespan shutdown quart-trio gives that nursery a
deadline (``BACKGROUND_TASK_SHUTDOWN_TIMEOUT``) and runs the ``after_serving`` hooks at once; the
hook below stops the service and waits — shielded, bounded — until it has drained every turn and
closed the database, and the nursery's deadline is set past that bound, so shutdown cannot outrun
a persister.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import orjson
import trio
from quart import Response, request
from quart_cors import cors
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import __version__, _logs, _metrics
from ._errors import ChatsrvError, StoreError, Unauthorized
from ._service import Service, run_service
from ._settings import Settings
from .http import (
    CHALLENGE,
    api,
    closing_connections,
    page,
    publish_contract,
    refuse_keyless,
    watch_worker_shutdown,
    worker_binds,
    worker_loggers,
    worker_shutdown_event,
)

log = logging.getLogger("chatsrv")

# What a client is told when the database fails; the details are logged.
_STORE_TROUBLE = {503: "the database is unavailable; retry later"}

# Room in a request body for the JSON around the message (and a model name).
_BODY_OVERHEAD_BYTES = 64 * 1024


def create_app(settings: Settings | None = None) -> QuartTrio:
    """Build the application. Settings come from the environment unless given."""
    settings = settings if settings is not None else Settings()
    _logs.configure(settings.log_level, settings.log_format)
    app = QuartTrio(__name__)
    # A body larger than the longest message could be — 12 bytes a character, a character
    # outside the BMP escaped as two \uXXXX — is refused with 413 before it is read; the
    # message's own limit, in characters, is checked after parsing (422).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_message_chars * 12 + _BODY_OVERHEAD_BYTES
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = _stop_bound(settings) + 1.0
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["chatsrv.settings"] = settings
    app.register_blueprint(api)
    app.register_blueprint(page)
    publish_contract(app, version=__version__, keys=settings.auth == "keys")
    if settings.cors_origins:
        # chatsrv sets no cookies: no credentials mode.
        cors(
            app,
            allow_origin=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Retry-After", "WWW-Authenticate"],
            max_age=600,
        )
    # Quart-Trio on hypercorn's trio worker left 'Connection: close' connections open. (Wrapping
    # asgi_app is Quart's documented way to add ASGI middleware; mypy sees a method replaced.)
    app.asgi_app = closing_connections(app.asgi_app)  # type: ignore[method-assign,assignment]

    @app.before_serving
    async def start_service() -> None:
        _logs.reformat(worker_loggers(), settings.log_format)
        binds = worker_binds()  # None unless hypercorn's master started this process
        if settings.auth == "off" and binds is not None:
            refuse_keyless(binds)
        service: Service = await app.nursery.start(run_service, settings)
        app.extensions["chatsrv"] = service
        # Everything loaded so far lives as long as the process: move it out of the collector's
        # sight, so that a full collection under load scans only what turns allocate (measured:
        # a full collection went from ~100 ms to ~2 ms, and with it the worst stream latencies).
        gc.collect()
        gc.freeze()
        event = worker_shutdown_event()
        if event is not None:
            app.nursery.start_soon(watch_worker_shutdown, event, service.engine.drain)

    @app.after_serving
    async def stop_service() -> None:
        service: Service | None = app.extensions.get("chatsrv")
        if service is None:
            return
        service.stop()
        bound = _stop_bound(settings)
        with trio.move_on_after(bound, shield=True):
            await service.closed.wait()
        if not service.closed.is_set():
            log.error("the service did not close within %.1f s", bound)
        _metrics.process_exiting()

    @app.errorhandler(ChatsrvError)
    async def chatsrv_error(error: ChatsrvError) -> Response:
        if isinstance(error, Unauthorized):
            response = _error_response(error.status, error.to_json())
            response.headers["WWW-Authenticate"] = CHALLENGE
            return response
        if not isinstance(error, StoreError):
            return _error_response(error.status, error.to_json())
        # A driver's message is for the operator: it goes to the log, once, and the client gets
        # what it can act on.
        log.warning("%s %s: %s", request.method, request.path, error.message)
        message = _STORE_TROUBLE.get(error.status, "the database failed")
        return _error_response(error.status, {"error": {"code": error.code, "message": message}})

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        code = (error.name or "error").lower().replace(" ", "_")
        body = {"error": {"code": code, "message": error.description or code}}
        return _error_response(error.code or 500, body)

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        log.exception("unhandled error", exc_info=error)
        body = {"error": {"code": "internal_error", "message": "internal server error"}}
        return _error_response(500, body)

    return app


def _stop_bound(settings: Settings) -> float:
    """The longest a stopping service may take: the turns' grace, their final commits, the last
    replay of the journal, one more database timeout for closing the pool, and the fsyncs."""
    return settings.shutdown_grace_s + 2 * settings.persist_grace_s + settings.db_timeout_s + 10.0


def _error_response(status: int, body: dict[str, Any]) -> Response:
    response = Response(orjson.dumps(body), status=status, mimetype="application/json")
    if status in _RETRY_AFTER:
        response.headers["Retry-After"] = _RETRY_AFTER[status]
    return response


# When a client may try again: a user at their stream limit soon, a server that is full or
# draining (or whose database is away) a little later.
_RETRY_AFTER = {429: "2", 503: "5"}
