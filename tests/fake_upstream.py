"""A fake OpenAI-compatible upstream, served over real HTTP by hypercorn on loopback.

``POST /v1/chat/completions`` streams ``chat.completion.chunk`` events the way OpenAI does: a
first chunk with the role, one chunk per token, a chunk with the ``finish_reason``, a usage chunk
when ``stream_options.include_usage`` is set, then ``data: [DONE]``. A test sets ``script``
before its request to make the stream fail in one exact way, and asserts on what the fake saw
(``requests`` with their ``request_times`` and ``request_headers``, ``tokens_sent``,
``disconnects``). Waiting is done on trio Events, never by sleeping, so every test stays
deterministic.

``refusing_port()`` is the upstream that is not there: a loopback port that refuses connections
for as long as it is held.

The app is raw ASGI (no framework) so that the fake costs little CPU when a benchmark reuses it:
``url = await nursery.start(fake.serve)``, then ``fake.shutdown()``. Only the ``upstream``
fixture, at the bottom, needs pytest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

DEFAULT_TOKENS = ("Hello", " from", " the", " fake", " upstream", ".")
DEFAULT_USAGE = {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Script:
    """How the next stream goes. Each ``*_after: k`` acts once k tokens have been sent."""

    tokens: list[str] = field(default_factory=lambda: list(DEFAULT_TOKENS))
    interval_s: float = 0.0  # pause between two tokens
    # Tokens go out only as the test calls ``release()``; for exact-k tests.
    gated: bool = False
    # Answer this HTTP status with an OpenAI-style JSON error body, before any token.
    error_status: int | None = None
    # With error_status: how long the client should wait before a retry (``retry-after-ms``,
    # which the SDK honours instead of its own backoff).
    retry_after_s: float | None = None
    # Break the connection: the client sees a body cut off mid-chunk-stream, not a clean end.
    fail_after: int | None = None
    # Send nothing more, and keep the connection open until the client goes away.
    stall_after: int | None = None
    # Send an OpenAI-style ``{"error": {...}}`` data line, then end the body cleanly.
    error_after: int | None = None
    # End the body cleanly with neither a finish_reason nor [DONE].
    truncate_after: int | None = None
    # Send a data line that is not JSON, then carry on.
    garbage_after: int | None = None
    finish_reason: str = "stop"
    usage: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))


class FakeUpstream:
    """The fake and what it observed. ``base_url`` is set once ``serve`` has started."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.base_url = ""
        self.script = Script()
        self.requests: list[dict[str, Any]] = []  # the JSON bodies received
        self.request_times: list[float] = []  # trio.current_time() as each of them arrived
        self.request_headers: list[dict[str, str]] = []  # and its headers, names lowercased
        self.tokens_sent = 0  # in the latest stream (reset when a stream starts)
        self.disconnects = 0  # streams the client left before their end
        self.clients: set[tuple[str, int]] = set()  # client addresses seen: one per connection
        self._credits = 0  # tokens released and not sent yet; they carry over to the next stream
        self._changed = trio.Event()  # set, then replaced, whenever an observation changes
        self._shutdown = trio.Event()

    # --- serving ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``shutdown()``; reports ``base_url`` through ``nursery.start``."""
        config = Config()
        config.bind = [f"{self.host}:{self.port}"]
        config.loglevel = "WARNING"
        # At shutdown, cut streams still open (a stalled one) instead of waiting for them.
        config.graceful_timeout = 0.0
        # A raw ASGI callable; hypercorn's typing wants its TypedDict events, more than needed here.
        app: Any = self
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                functools.partial(
                    serve, app, config, shutdown_trigger=self._shutdown.wait, mode="asgi"
                )
            )
            self.base_url = f"{binds[0]}/v1"
            task_status.started(self.base_url)

    def shutdown(self) -> None:
        self._shutdown.set()

    # --- what a test drives and waits for -------------------------------------------------

    def release(self, n: int = 1) -> None:
        """Let ``n`` more tokens of a gated stream go out."""
        self._credits += n
        self._notify()

    async def wait_requests(self, n: int) -> None:
        """Until ``n`` requests have arrived, in all."""
        await self._wait_until(lambda: len(self.requests) >= n)

    async def wait_tokens_sent(self, k: int) -> None:
        """Until the latest stream has sent ``k`` tokens."""
        await self._wait_until(lambda: self.tokens_sent >= k)

    async def wait_disconnected(self, n: int = 1) -> None:
        """Until clients have left ``n`` streams before their end, in all."""
        await self._wait_until(lambda: self.disconnects >= n)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    # --- the ASGI app -------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if body is None:  # the client left before sending its request
            return
        if scope["method"] != "POST" or scope["path"] != "/v1/chat/completions":
            await _send_json(send, 404, _error_body("no such route", "invalid_request_error"))
            return
        request = orjson.loads(body)
        self.requests.append(request)
        self.request_times.append(trio.current_time())
        self.request_headers.append(
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        )
        self.clients.add(tuple(scope["client"]))
        self._notify()
        script = dataclasses.replace(self.script)  # later edits do not change a running stream
        if script.error_status is not None:
            headers = []
            if script.retry_after_s is not None:
                headers.append((b"retry-after-ms", b"%d" % round(script.retry_after_s * 1000)))
            await _send_json(
                send, script.error_status, _error_body("scripted failure", "server_error"), headers
            )
            return
        if not request.get("stream"):
            await _send_json(
                send, 400, _error_body("the fake only streams", "invalid_request_error")
            )
            return

        self.tokens_sent = 0
        ended_by_server = end_cleanly = False

        async def watch_for_disconnect(cancel_scope: trio.CancelScope) -> None:
            # After the request body, the only message left for this request is http.disconnect:
            # it arrives when the client closes the socket, or when hypercorn fails to write.
            await receive()
            if not ended_by_server:
                self.disconnects += 1
                self._notify()
                cancel_scope.cancel(reason="the client went away")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_for_disconnect, nursery.cancel_scope)
            end_cleanly = await self._stream(request, script, send)
            # Before the last send: ending the body makes hypercorn report http.disconnect too.
            ended_by_server = True
            nursery.cancel_scope.cancel(reason="the stream ended")
        if end_cleanly:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, request: dict[str, Any], script: Script, send: Send) -> bool:
        """Send the scripted events; return whether the body should then end cleanly."""
        model = request.get("model", "fake-model")

        async def event(payload: bytes) -> None:
            body = b"data: " + payload + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        await event(_chunk(model, {"role": "assistant", "content": ""}))
        for k in range(len(script.tokens) + 1):
            if k == script.fail_after:
                return False  # hypercorn closes the connection without the final empty chunk
            if k == script.stall_after:
                await trio.sleep_forever()  # until watch_for_disconnect cancels us
            if k == script.error_after:
                await event(
                    orjson.dumps(_error_body("scripted mid-stream failure", "server_error"))
                )
                return True
            if k == script.truncate_after:
                return True
            if k == len(script.tokens):
                break
            if script.gated:
                await self._wait_until(lambda: self._credits > 0)
                self._credits -= 1
            elif script.interval_s and k:
                await trio.sleep(script.interval_s)
            if k == script.garbage_after:
                await event(b"{this is not json")
            await event(_chunk(model, {"content": script.tokens[k]}))
            self.tokens_sent += 1
            self._notify()
        await event(_chunk(model, {}, finish_reason=script.finish_reason))
        include_usage = (request.get("stream_options") or {}).get("include_usage")
        if include_usage and script.usage is not None:
            await event(_chunk(model, None, usage=script.usage))
        await event(b"[DONE]")
        return True


def _chunk(
    model: str,
    delta: dict[str, Any] | None,
    *,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> bytes:
    """One ``chat.completion.chunk``; ``delta=None`` makes the choice-less usage chunk."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    return orjson.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage,
        }
    )


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": orjson.dumps(body), "more_body": False})


async def _read_body(receive: Receive) -> bytes | None:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        part: bytes = message.get("body", b"")
        body += part
        if not message.get("more_body", False):
            return body


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses every connection while the block runs: a socket bound to it
    and never listening. Unlike a port bound and then closed, no other process can take it
    meanwhile (the socket holds it, without SO_REUSEADDR), so the refusal is certain."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound:
        bound.bind(("127.0.0.1", 0))
        port: int = bound.getsockname()[1]
        yield port


# --- the pytest fixture ---------------------------------------------------------------------

import pytest  # noqa: E402  (only the fixture needs pytest; a benchmark imports the rest)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A fake upstream on 127.0.0.1 with a free port, shut down after the test."""
    fake = FakeUpstream()
    # pytest-trio runs a fixture's setup and teardown in one task, so yielding inside this
    # nursery is safe here (unlike in an ordinary async generator).
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        yield fake
        fake.shutdown()
