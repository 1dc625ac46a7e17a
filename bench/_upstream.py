"""The benchmark's fake OpenAI-compatible upstream: ``python -m bench._upstream``.

It prints ``{"url": "http://127.0.0.1:PORT/v1", "pid": ...}`` on one line once it listens, and
serves until SIGTERM or until its standard input closes (so it never outlives the benchmark).

``POST /v1/chat/completions`` streams OpenAI-style ``chat.completion.chunk`` events: a first chunk
with the role, one chunk per token, a chunk with ``finish_reason``, a usage chunk, ``[DONE]``. The
stream's :class:`~bench._script.Script` (token count, pace, failure) comes from the request itself.
``GET /stats`` reports what the fake did since ``POST /stats/reset``.

Why not ``tests/fake_upstream.py``: that fake is built for one exactly-controlled stream at a time
(a shared script, ``tokens_sent`` of the latest stream, pytest imported at module level), and it
paces with ``trio.sleep(interval)`` after each send, so under load the lateness of every sleep
accumulates over a stream and would be charged to chatsrv as added latency. This one is a few
hundred lines of plain asyncio protocol code because it shares two cores with the server under
test and must cost as little as possible: each token is one pre-rendered ``bytes`` written from a
timer callback, with no task switch, on an *absolute* schedule (token k is due at start + k *
interval), so a late callback never delays the tokens after it. Its own lateness is measured and
reported, so a figure the fake spoiled can be told apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import resource
import signal
import sys
import threading
from typing import Any

import orjson

from bench._script import Script, token

MODEL = "bench-model"
HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _chunk(payload: dict[str, Any]) -> bytes:
    """One SSE ``data:`` event as one HTTP/1.1 body chunk."""
    event = b"data: " + orjson.dumps(payload) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _completion_chunk(delta: dict[str, Any] | None, finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    choices = [] if delta is None else [choice]
    return _chunk(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": choices,
        }
    )


FIRST = HEAD + _completion_chunk({"role": "assistant", "content": ""})


@functools.cache
def _token_chunk(k: int) -> bytes:
    return _completion_chunk({"content": token(k)})


@functools.cache
def _last_chunks(tokens: int) -> bytes:
    usage = {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": tokens + 10}
    usage_chunk = _chunk(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": [],
            "usage": usage,
        }
    )
    done = b"data: [DONE]\n\n"
    return (
        _completion_chunk({}, "stop")
        + usage_chunk
        + b"%x\r\n%s\r\n" % (len(done), done)
        + b"0\r\n\r\n"  # the end of the chunked body; the connection stays open for the next one
    )


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.completed = 0
        self.failed_on_purpose = 0
        self.disconnects = 0  # streams whose client (chatsrv) left before their end
        self.tokens = 0
        self.lateness_s: list[float] = []  # of every token send against its schedule
        self.cpu_at_reset = _cpu_s()

    def report(self) -> dict[str, Any]:
        late = sorted(self.lateness_s)
        return {
            "requests": self.requests,
            "completed": self.completed,
            "failed_on_purpose": self.failed_on_purpose,
            "disconnects": self.disconnects,
            "tokens": self.tokens,
            "lateness_ms": {
                "p50": _at(late, 0.50) * 1e3,
                "p99": _at(late, 0.99) * 1e3,
                "max": (late[-1] if late else 0.0) * 1e3,
            },
            "cpu_s": _cpu_s() - self.cpu_at_reset,
        }


def _at(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection from chatsrv's openai client: requests one after another."""

    def __init__(self, stats: Stats, default: Script) -> None:
        self._stats = stats
        self._default = default
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._script = default
        self._streaming = False
        self._start = 0.0
        self._k = 0  # the next token
        self._writes = 0  # writes of this stream so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._streaming:
            self._stats.disconnects += 1
        self._streaming = False
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while not self._streaming and (request := self._next_request()) is not None:
            self._handle(*request)

    def _next_request(self) -> tuple[str, str, bytes] | None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        method, target = lines[0].split(" ")[:2]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self._buffer) < end + 4 + length:
            return None
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        return method, target.split("?")[0], body

    def _handle(self, method: str, path: str, body: bytes) -> None:
        if method == "POST" and path == "/v1/chat/completions":
            request = orjson.loads(body)
            self._stats.requests += 1
            self._start_stream(Script.from_request(request, self._default))
        elif method == "GET" and path == "/stats":
            self._send_json(200, self._stats.report())
        elif method == "POST" and path == "/stats/reset":
            self._stats.reset()
            self._send_json(200, {"reset": True})
        else:
            self._send_json(404, {"error": {"message": "no such route", "type": "invalid_request"}})

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        assert self._transport is not None
        payload = orjson.dumps(body)
        self._transport.write(
            b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(payload), payload)
        )

    def _start_stream(self, script: Script) -> None:
        assert self._transport is not None
        self._script = script
        self._streaming = True
        self._k = 0
        self._writes = 0
        self._start = self._loop.time()
        self._transport.write(FIRST)
        if script.tokens == 0 and script.fail_after != 0:
            self._end(self._transport)
        else:
            self._send_next()

    def _send_next(self) -> None:
        """Send the next write: token k alone, due at start + k * interval, or (in bursts) the
        group of tokens from k, due when its last one is; then schedule the next. The end of the
        stream (finish_reason, usage, [DONE]) goes out with the last token, as OpenAI's does, so
        the fake's own duration is exactly (tokens - 1) * interval."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        script, k = self._script, self._k
        size = script.group(self._writes, k)
        due = self._start + (k + size - 1) * script.interval_s
        self._stats.lateness_s.append(self._loop.time() - due)
        if script.fail_after is not None and k <= script.fail_after < k + size:
            # A body cut off mid-stream: no final chunk, the connection closes.
            transport.write(b"".join(_token_chunk(i) for i in range(k, script.fail_after)))
            self._stats.tokens += script.fail_after - k
            self._streaming = False
            self._stats.failed_on_purpose += 1
            transport.close()
            return
        transport.write(b"".join(_token_chunk(i) for i in range(k, k + size)))
        self._stats.tokens += size
        self._k = k + size
        self._writes += 1
        if self._k == script.tokens and script.fail_after != script.tokens:
            self._end(transport)
            return
        following = script.group(self._writes, self._k)
        self._timer = self._loop.call_at(
            self._start + (self._k + following - 1) * script.interval_s, self._send_next
        )

    def _end(self, transport: asyncio.Transport) -> None:
        self._streaming = False
        self._stats.completed += 1
        transport.write(_last_chunks(self._script.tokens))
        if self._buffer:  # a request that came while we streamed (none does today)
            self.data_received(b"")


async def serve(host: str, port: int, default: Script) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(
        lambda: Connection(stats, default), host, port, backlog=4096, reuse_address=True
    )
    bound_port = server.sockets[0].getsockname()[1]
    print(orjson.dumps({"url": f"http://{host}:{bound_port}/v1", "pid": os.getpid()}).decode())
    sys.stdout.flush()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def watch_stdin() -> None:
        # The benchmark holds our stdin: when it goes away, so do we.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):  # the raw fd: a buffered reader's lock would block exit
                pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=200, help="when a request has no script")
    parser.add_argument("--interval-s", type=float, default=0.02)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, Script(args.tokens, args.interval_s)))


if __name__ == "__main__":
    main()
