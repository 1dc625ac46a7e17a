"""The reference server, "the naive relay on the same stack": a raw ASGI app, ``app``, for
hypercorn's trio worker, that relays the fake upstream with nothing of chatsrv in between.

The benchmark runs it exactly as it runs chatsrv (``python -m hypercorn -c hypercorn.toml
--workers N --bind fd://N bench._reference:app``: the trio worker, the access log), so that
chatsrv's figures can be given as ratios to a relay measured in the same sitting on the same
machine. It has no Quart, no database, no persister, no pings, no disconnect watch. What it does
per token is the least a relay on this stack can do: a ``recv`` on a plain trio socket, the
chunked framing and the ``data:`` lines split off by hand, ``orjson.loads`` of each line to take
``choices[0].delta.content``, and one ``http.response.body`` send (``more_body=True``) per
upstream token, even when several arrived in one read.

It answers what the bench client (``bench._client``) sends, in the shape the client checks::

    GET  /healthz                               {"status": "ok"}
    POST /v1/conversations                      201 {"id": made up}       nothing is stored
    POST /v1/conversations/{id}/messages        SSE:
        event: start   data: {"message_id", "user_message_id", "conversation_id"}
        id: N          event: delta   data: {"content": "..."}   N = characters so far
        event: error   data: {...}                                the upstream broke off
        event: done    data: {"message_id", "status", "stop_reason"}

It forwards the message's content as the one user message, which carries the stream's script
to the fake (``bench._script``). Replies are not kept, so they cannot be read back: the client
runs with ``read_back`` off against it, and the benchmark runs it in the stream mode only.
The upstream is ``BENCH_UPSTREAM_URL`` (the fake's ``http://127.0.0.1:PORT/v1``). Connections
to it are kept alive in a per-worker list of idle sockets, as chatsrv's client pool keeps them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
JSON_HEADERS = [(b"content-type", b"application/json")]

_ids = itertools.count(1)
_idle: list[trio.socket.SocketType] = []  # upstream connections between two streams


class UpstreamBroke(Exception):
    """The upstream's body ended, or its connection closed, before ``[DONE]``."""


def _upstream() -> tuple[str, int, str]:
    url = urlsplit(os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:8001/v1"))
    return url.hostname or "127.0.0.1", url.port or 80, url.path.rstrip("/")


HOST, PORT, BASE_PATH = _upstream()


def _event(name: bytes, data: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _json(send: Send, status: int, body: Any) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": orjson.dumps(body)})


async def _body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return body
        body += bytes(message.get("body", b""))
        if not message.get("more_body", False):
            return body


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def _connection() -> trio.socket.SocketType:
    if _idle:
        return _idle.pop()
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
    await sock.connect((HOST, PORT))
    return sock


def _request(content: str) -> bytes:
    body = orjson.dumps(
        {
            "model": "bench-model",
            "messages": [{"role": "user", "content": content}],
            "stream": True,
        }
    )
    return (
        b"POST %b/chat/completions HTTP/1.1\r\nhost: %b:%d\r\ncontent-type: application/json\r\n"
        b"accept: text/event-stream\r\ncontent-length: %d\r\n\r\n%b"
        % (BASE_PATH.encode(), HOST.encode(), PORT, len(body), body)
    )


async def _relay(send: Send, content: str) -> str | None:
    """Stream one completion from the upstream to the client, one event per token; the
    ``finish_reason``. The connection goes back to the idle list after a clean end."""
    sock = await _connection()
    keep = False  # the connection is between two responses: back to the idle list
    try:
        raw = b""
        await _send_all(sock, _request(content))
        while (end := raw.find(b"\r\n\r\n")) < 0:
            data = await sock.recv(65536)
            if not data:
                raise UpstreamBroke("closed before the response head")
            raw += data
        if not raw.startswith(b"HTTP/1.1 200"):
            raise UpstreamBroke(raw[:end].decode("latin-1"))
        raw = raw[end + 4 :]
        body = b""  # dechunked, not yet split into lines
        ended = False  # the chunked body's last chunk came
        length = 0  # characters sent so far
        finish: str | None = None
        while True:
            # The chunked framing: move every complete chunk into the body.
            while not ended and (line_end := raw.find(b"\r\n")) >= 0:
                size = int(raw[:line_end].split(b";")[0], 16)
                if len(raw) < line_end + size + 4:
                    break
                body += raw[line_end + 2 : line_end + 2 + size]
                raw = raw[line_end + size + 4 :]
                ended = size == 0
            *lines, body = body.split(b"\n")
            for line in lines:
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    keep = ended
                    return finish
                choices = orjson.loads(line[6:])["choices"]
                if not choices:
                    continue  # the usage chunk
                choice = choices[0]
                finish = choice.get("finish_reason") or finish
                text = choice["delta"].get("content")
                if text:
                    length += len(text)
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b'id: %d\nevent: delta\ndata: {"content":%b}\n\n'
                            % (length, orjson.dumps(text)),
                            "more_body": True,
                        }
                    )
            if ended:
                raise UpstreamBroke("the body ended before [DONE]")
            data = await sock.recv(65536)
            if not data:
                raise UpstreamBroke("the connection closed mid-stream")
            raw += data
    finally:
        if keep:
            _idle.append(sock)
        else:
            sock.close()


async def _post_message(receive: Receive, send: Send, conversation_id: str) -> None:
    request = orjson.loads(await _body(receive))
    n = next(_ids)
    message_id = f"ref-a-{os.getpid()}-{n}"
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    start = {
        "message_id": message_id,
        "user_message_id": f"ref-u-{os.getpid()}-{n}",
        "conversation_id": conversation_id,
    }
    await send({"type": "http.response.body", "body": _event(b"start", start), "more_body": True})
    try:
        finish = await _relay(send, request["content"])
    except (UpstreamBroke, OSError) as exc:
        error = {"error": {"code": "upstream_protocol", "message": str(exc)[:200]}}
        closing = _event(b"error", error) + _event(
            b"done",
            {"message_id": message_id, "status": "failed", "stop_reason": "upstream_error"},
        )
    else:
        closing = _event(
            b"done", {"message_id": message_id, "status": "complete", "stop_reason": finish}
        )
    await send({"type": "http.response.body", "body": closing})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            for sock in _idle:
                sock.close()
            _idle.clear()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    method, path = scope["method"], scope["path"]
    if method == "GET" and path == "/healthz":
        await _json(send, 200, {"status": "ok"})
    elif method == "POST" and path == "/v1/conversations":
        await _body(receive)
        await _json(send, 201, {"id": f"ref-c-{os.getpid()}-{next(_ids)}"})
    elif method == "POST" and path.startswith("/v1/conversations/") and path.endswith("/messages"):
        await _post_message(receive, send, path.split("/")[3])
    else:
        await _body(receive)
        await _json(send, 404, {"error": {"code": "not_found", "message": "the reference relay"}})
