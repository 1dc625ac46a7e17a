"""Connections that must close: a workaround for Quart-Trio on hypercorn's trio worker.

A request with ``Connection: close``, or any HTTP/1.0 request, got its whole response and then
the server never closed the TCP connection; a client that reads to end of file hung. The cause,
found with a six-line Quart-Trio app (``docs/quart-trio-connection-close.md`` has the report):

1. The app sends its last body message; inside that ``send``, hypercorn's HTTP/1.1 protocol
   sees the exchange is over and must close (h11's ``MUST_CLOSE``). It first tells the stream
   that it is closed, which puts ``http.disconnect`` on the app's receive queue, and then
   closes the socket (``TCPServer._close``: ``send_eof``, then ``aclose``) -- all still inside
   the app's ``send`` call, in the app's task.
2. Quart-Trio runs the request as two tasks in one nursery; the one that reads ``receive``
   gets ``http.disconnect`` and cancels the nursery, which cancels the task that is inside
   ``send``. ``send_eof`` checkpoints first, so it raises ``Cancelled`` before the socket is
   closed, and nothing closes it afterwards.

The workaround shields the app's last body message, with a deadline, so that hypercorn's close
runs to its end. Nothing else changes: a client that leaves mid-stream still cancels the
response at once (that disconnect arrives while the body is being streamed, not in its last
``send``). Hypercorn already shields its own socket writes, so the shield adds no wait of its
own beyond the deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope

log = logging.getLogger("chatsrv")

_ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Coroutine[Any, Any, None]]

# How long the last body message (and the connection's close, when it must close) may take.
CLOSE_DEADLINE_S = 5.0


def closing_connections(app: _ASGIApp) -> _ASGIApp:
    """``app`` with the last body message of each HTTP response sent under a shield."""

    async def asgi(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_last_shielded(message: ASGISendEvent) -> None:
            if message["type"] != "http.response.body" or message.get("more_body", False):
                await send(message)
                return
            with trio.move_on_after(CLOSE_DEADLINE_S, shield=True) as scope_:
                await send(message)
            if scope_.cancelled_caught:
                log.warning("the end of a response took over %.0f s", CLOSE_DEADLINE_S)

        await app(scope, receive, send_last_shielded)

    return asgi
