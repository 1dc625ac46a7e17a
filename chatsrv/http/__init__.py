"""The HTTP layer: the v1 routes, the SSE relay and the integration with hypercorn.

It owns everything a client sees on the wire: parsing and validating requests, who is asking
(``_auth.py``), the JSON bodies, the Server-Sent Events of a turn (``_relay.py``), learning early
that hypercorn is stopping the worker (``_hypercorn.py``), closing the connections that must
close (``_close.py``), the published OpenAPI contract (``_contract.py``), and the chat page
(``_page.py``, ``page/``). Routes stay thin: they call the turn engine or the store and shape
the answer.

May import: ``chatsrv.engine``, ``chatsrv.store``, ``chatsrv._settings``, ``chatsrv._errors``.
Never the upstream layer (a route does not talk to a model), never the top-level modules.
"""

from ._auth import CHALLENGE, Authenticator, refuse_keyless
from ._close import closing_connections
from ._contract import publish_contract
from ._hypercorn import (
    watch_worker_shutdown,
    worker_binds,
    worker_loggers,
    worker_shutdown_event,
)
from ._page import page
from ._relay import PING, keep_alive, relay, replayed
from ._routes import Backend, api

__all__ = [
    "CHALLENGE",
    "PING",
    "Authenticator",
    "Backend",
    "api",
    "closing_connections",
    "keep_alive",
    "page",
    "publish_contract",
    "refuse_keyless",
    "relay",
    "replayed",
    "watch_worker_shutdown",
    "worker_binds",
    "worker_loggers",
    "worker_shutdown_event",
]
