"""The ``openai`` provider: any OpenAI-compatible ``/chat/completions`` endpoint, streamed through
the official SDK's raw response. With ``_http11``, the only module that imports openai or httpx2,
and the one place where their exceptions become ``UpstreamError``.

Hot path. The SDK's typed ``ChatCompletionChunk`` objects cost ~170-180 µs of CPU per token; the
raw path (``with_streaming_response.create`` and ``iter_lines()`` parsed with orjson) ~22 µs. So
the per-line loop reads SSE ``data:`` lines into plain dicts and does nothing else: no pydantic,
no logging, no allocation beyond the parsed chunk. Beneath it, the SDK's HTTP client runs on
``_http11.Http11Transport`` by default (``CHATSRV_LLM_TRANSPORT``), which reads each token for
about half the CPU of httpx2's own transport.

How each failure is mapped (``UpstreamError.code``)::

    before the response head, raised by the SDK (each attempt has llm_timeout_s to answer):
      openai.APIStatusError (4xx/5xx, after the SDK's retries)   upstream_status + status_code
      openai.APIConnectionError, APITimeoutError                 upstream_connection
      any other openai.OpenAIError                               upstream_protocol
    while streaming:
      silent for llm_timeout_s (chatsrv's own watch, _Silence)    upstream_connection
    raised raw by httpx2 (or by the lean transport, as httpx2's) from the body:
      httpx2.TimeoutException (httpx2's transport only)           upstream_connection
      httpx2.NetworkError (reset); with httpx2's transport,
        the anyio and ssl errors beneath it                       upstream_connection
      httpx2.RemoteProtocolError (the body was cut off), any
        other httpx2.HTTPError or StreamError                     upstream_protocol
    in the body:
      a data line that is not a chunk                             upstream_protocol
      an {"error": {...}} object                                  upstream_error
      the body ends, or [DONE] comes, without a finish_reason     upstream_protocol

A stream counts as finished properly at ``[DONE]`` after a ``finish_reason``, or at a clean end of
the body after a ``finish_reason`` (some compatible servers omit ``[DONE]``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, cast

import anyio
import httpx2
import openai
import orjson
import trio

from chatsrv._errors import UpstreamError
from chatsrv._settings import Settings

from ._http11 import Http11Transport
from ._provider import Completion, Prompt

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

log = logging.getLogger("chatsrv.upstream")

# Local servers (vLLM, llama.cpp, Ollama) take no key, but the SDK insists on one.
KEYLESS_PLACEHOLDER = "chatsrv-no-key"
CONNECT_TIMEOUT_S = 10.0
# An upstream's error message reaches the client in an SSE error event: keep it short.
MAX_DETAIL_CHARS = 300
# How long the end of a finished body (or of an abandoned one) may take to arrive.
DRAIN_DEADLINE_S = 0.1

# Raised raw by httpx2 (and, for TLS, by anyio/ssl beneath it) from the body: the SDK does not
# wrap errors that happen after the response headers arrived. A body cut off mid-stream is a
# RemoteProtocolError: a stream that ended early, so upstream_protocol (it is in HTTPError).
_CONNECTION_ERRORS = (
    httpx2.TimeoutException,
    httpx2.NetworkError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    ssl.SSLError,
)
_PROTOCOL_ERRORS = (httpx2.HTTPError, httpx2.StreamError)
# What a chunk of the wrong shape raises while it is picked apart.
_SHAPE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)


class OpenAIProvider:
    """Streams chat completions from ``settings.llm_base_url`` (OpenAI's API when unset)."""

    name = "openai"

    def __init__(self, settings: Settings) -> None:
        self._read_timeout_s = settings.llm_timeout_s
        http_client = _http_client(settings.llm_transport)
        # The frame paces socket reads, which only the lean transport hands over one for one:
        # httpx2's yields each HTTP chunk of a read apart, and would wait a frame between them.
        self._frame_s = settings.frame_ms / 1000 if http_client is not None else 0.0
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else ""
        self._client = openai.AsyncOpenAI(
            base_url=settings.llm_base_url,
            api_key=key or KEYLESS_PLACEHOLDER,
            max_retries=settings.llm_max_retries,
            # read: the longest wait for a response head, per attempt; the body's silences are
            # watched by generate() (see _Silence). write and pool share it.
            timeout=openai.Timeout(settings.llm_timeout_s, connect=CONNECT_TIMEOUT_S),
            http_client=http_client,
        )

    async def aclose(self) -> None:
        # Explicitly: the client's __del__ schedules its close only on asyncio.
        await self._client.close()

    async def generate(self, prompt: Prompt, emit: Callable[[str], None]) -> Completion:
        messages = cast("Iterable[ChatCompletionMessageParam]", prompt.messages)
        try:
            # `async with` closes the HTTP response on every exit, trio.Cancelled included, so a
            # cancelled turn drops the upstream connection instead of reading it to the end.
            async with self._client.chat.completions.with_streaming_response.create(
                model=prompt.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            ) as response:
                body = response.http_response.aiter_bytes()
                frame = _Frame(self._frame_s)
                lines = _lines(body, frame)
                async with aclosing(lines):
                    # From the response head on: the SDK's retries and their waits are over.
                    silence = _Silence(self._read_timeout_s)
                    with silence.scope:
                        try:
                            completion = await _read_stream(lines, emit, silence, frame)
                        except BaseException:
                            # trio.Cancelled too: it may strike in the frame's wait, outside
                            # the body's chain of generators, which must still be ended.
                            frame.framing = False  # and at once
                            await _abandon(response, lines, body)
                            raise
                        await _drain(lines)
                        return completion
                    # Only the silence watch's scope, cancelled, lands here.
                    raise UpstreamError(
                        f"the upstream sent nothing for {self._read_timeout_s:g} s",
                        code="upstream_connection",
                    )
        except openai.APIStatusError as exc:
            raise UpstreamError(
                f"the upstream answered HTTP {exc.status_code}: {_detail(exc.body, exc.message)}",
                code="upstream_status",
                status_code=exc.status_code,
            ) from exc
        except openai.APITimeoutError as exc:
            raise UpstreamError(
                f"the upstream did not answer in time: {_cause(exc)}", code="upstream_connection"
            ) from exc
        except openai.APIConnectionError as exc:
            raise UpstreamError(
                f"cannot reach the upstream: {_cause(exc)}", code="upstream_connection"
            ) from exc
        except openai.OpenAIError as exc:
            raise UpstreamError(f"the upstream failed: {exc}", code="upstream_protocol") from exc
        except httpx2.TimeoutException as exc:
            raise UpstreamError(
                f"the upstream sent nothing for {self._read_timeout_s:g} s",
                code="upstream_connection",
            ) from exc
        except _CONNECTION_ERRORS as exc:
            raise UpstreamError(
                f"the upstream connection broke mid-stream: {_describe(exc)}",
                code="upstream_connection",
            ) from exc
        except _PROTOCOL_ERRORS as exc:
            raise UpstreamError(
                f"the upstream stream broke off or is malformed: {_describe(exc)}",
                code="upstream_protocol",
            ) from exc


def _http_client(transport: str) -> httpx2.AsyncClient | None:
    """The SDK's HTTP client on the lean transport, or None for the SDK's default."""
    if transport == "auto":
        proxies = urllib.request.getproxies()
        transport = "httpx" if {"http", "https", "all"} & proxies.keys() else "lean"
    log.info("upstream HTTP transport: %s", transport)
    if transport == "httpx":
        return None
    return openai.DefaultAsyncHttpxClient(transport=Http11Transport(time_body_reads=False))


class _Frame:
    """The pace of one response body's reads (``CHATSRV_FRAME_MS``): once reply text has come,
    a read waits until ``frame_s`` after the previous one, so that the tokens the upstream sends
    meanwhile come in one read, one hand-over to the persister, and one event to each client.
    The cost of a stream then falls with its token rate, where a per-token relay's stays flat.

    It never delays the first text (the frame starts once some has come), nor text after a
    quiet frame (the wait is counted from the previous read, not to the next frame's edge);
    text that comes within a frame waits for its end, at most ``frame_s``. The wait is a plain
    sleep, so a cancelled turn stops in it at once."""

    __slots__ = ("frame_s", "framing", "read_at")

    def __init__(self, frame_s: float) -> None:
        self.frame_s = frame_s
        self.framing = False  # set when the first text has come, cleared at [DONE]
        self.read_at = -math.inf  # when the previous read returned

    async def wait(self) -> None:
        if self.framing:
            wait_s = self.read_at + self.frame_s - trio.current_time()
            if wait_s > 0:
                await trio.sleep(wait_s)


class _Silence:
    """The longest silence allowed in a response body, watched by one cancel scope per stream.
    (A read timeout in the HTTP stack opens a cancel scope per read, ~5% of a worker's CPU when
    each token comes in its own read; the lean transport leaves body reads untimed for this.)
    Its deadline moves at most every sixteenth of the timeout, so it strikes after a silence of
    between ``timeout_s`` and 17/16 of it."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._step_s = timeout_s / 16
        self._heard_at = trio.current_time()
        self.scope = trio.CancelScope(deadline=self._heard_at + timeout_s + self._step_s)

    def heard(self) -> None:
        now = trio.current_time()
        if now - self._heard_at >= self._step_s:
            self._heard_at = now
            self.scope.deadline = now + self._timeout_s + self._step_s


async def _read_stream(
    lines: AsyncGenerator[str, None],
    emit: Callable[[str], None],
    silence: _Silence,
    frame: _Frame,
) -> Completion:
    """Parse the SSE body; emit each content delta as soon as its line is parsed."""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    loads = orjson.loads
    async for line in lines:
        silence.heard()
        # Only data lines matter: blank lines end events; comments (":"), event:, id: are skipped.
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            frame.framing = False  # what is left of the body is read at once (_drain)
            break
        try:
            chunk = loads(data)
            error = chunk.get("error")
            if error is not None:
                raise _in_stream_error(error)
            content = None
            choices = chunk.get("choices")
            if choices:  # the usage chunk has none
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    content = delta.get("content")
                    if content is not None and content.__class__ is not str:
                        raise TypeError("delta.content is not a string")
                reason = choice.get("finish_reason")
                if reason:
                    finish_reason = str(reason)
            chunk_usage = chunk.get("usage")
            if chunk_usage is not None:
                usage = dict(chunk_usage)
        except _SHAPE_ERRORS as exc:
            raise UpstreamError(
                f"the upstream sent a line that is not a chat completion chunk: {data[:80]!r}",
                code="upstream_protocol",
            ) from exc
        if content:
            if "\x00" in content:
                # Legal in JSON, refused by PostgreSQL's text: replace it before it reaches a
                # client, so that what is relayed is what is stored.
                content = content.replace("\x00", "\ufffd")
            emit(content)
            frame.framing = frame.frame_s > 0
    else:
        if finish_reason is None:
            raise UpstreamError(
                "the upstream stream ended before a finish_reason", code="upstream_protocol"
            )
    if finish_reason is None:
        raise UpstreamError(
            "the upstream sent [DONE] without a finish_reason", code="upstream_protocol"
        )
    return Completion(finish_reason=finish_reason, usage=usage)


# Why the two functions below exist: httpx2 reads a body through a chain of nested async
# generators, and closing the outermost one (``aclosing``) does not close those it iterates. Under
# Trio an async generator left for the garbage collector is a ResourceWarning (an error in our
# tests), so every way out of ``_read_stream`` runs the whole chain to its end. An exception
# raised inside the chain (a read error, a timeout, trio.Cancelled) ends it by itself.


async def _lines(body: AsyncIterator[bytes], frame: _Frame) -> AsyncGenerator[str, None]:
    """The body's lines, read at ``frame``'s pace. One generator over the body's bytes, instead
    of the SDK's iter_lines on httpx's aiter_lines on aiter_text: this loop runs once per read,
    and each layer costs."""
    pending = b""
    reads = body.__aiter__()
    while True:
        await frame.wait()
        try:
            data = await reads.__anext__()
        except StopAsyncIteration:
            break
        frame.read_at = trio.current_time()
        pending += data
        if b"\n" not in data:
            continue
        # Splitting bytes on b"\n" never cuts a UTF-8 sequence: no continuation byte is 0x0A.
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r").decode(errors="replace")
    if pending:
        yield pending.rstrip(b"\r").decode(errors="replace")


async def _drain(lines: AsyncGenerator[str, None]) -> None:
    """After [DONE]: read to the end of the body, so the connection goes back to the pool."""
    # Like the SDK's own streams, give up quickly on an upstream that keeps the body open; the
    # cancellation ends the chain, and the response is then closed instead of reused.
    with trio.move_on_after(DRAIN_DEADLINE_S):
        async for _ in lines:
            pass


async def _abandon(
    response: openai.AsyncAPIResponse[Any],
    lines: AsyncGenerator[str, None],
    body: AsyncIterator[bytes],
) -> None:
    """We stop reading early: drop the connection, then let the chain fail on the closed socket:
    from ``lines``, if it waits at a yield, else from ``body`` (``lines`` ended in its frame's
    wait: the body's chain waits at a yield of its own)."""
    with trio.move_on_after(DRAIN_DEADLINE_S, shield=True):  # cleanup, even in a cancelled scope
        await response.close()
        with contextlib.suppress(*_CONNECTION_ERRORS, *_PROTOCOL_ERRORS):
            async for _ in lines:
                pass
        with contextlib.suppress(*_CONNECTION_ERRORS, *_PROTOCOL_ERRORS):
            async for _ in body:
                pass


def _in_stream_error(error: object) -> UpstreamError:
    return UpstreamError(f"the upstream reported an error: {_detail(error, str(error))}")


def _detail(body: object, fallback: str) -> str:
    """The ``message`` of an OpenAI-style error object, or ``fallback``, shortened."""
    message = body.get("message") if isinstance(body, dict) else None
    text = message if isinstance(message, str) and message else fallback
    return text[:MAX_DETAIL_CHARS]


def _cause(exc: BaseException) -> str:
    """The transport error beneath an SDK connection error, which says more than the SDK does."""
    return _describe(exc.__cause__) if exc.__cause__ is not None else _describe(exc)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_DETAIL_CHARS] if str(exc) else type(exc).__name__
