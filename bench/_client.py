"""The benchmark's load client: ``python -m bench._client CONFIG_JSON``, run by the benchmark as a
process of its own, so that its CPU never counts as the server's.

It talks to the benchmark one JSON line at a time on stdout, and waits for a line on stdin
between phases, so that the benchmark reads the server's counters at the exact edges of the
measured window::

    client                                   benchmark
    creates one conversation per stream
    {"phase": "ready"}            ────────▶  reads CPU, RSS, database log offset
                                  ◀────────  go
    opens the streams (starts spread over ramp_up_s), reads them to their end; in disconnect
    mode closes each after k deltas and polls its message until it is no longer 'streaming'
    {"phase": "streamed", ...}    ────────▶  reads the counters again
                                  ◀────────  verify
    checks every stream; reads every reply back from the API (unless ``read_back`` is off)
    and checks it against what it received
    {"phase": "result", "streams": [...]}

Like the fake upstream it is plain asyncio protocol code, for the same reason: it shares the two
cores with the server, so each received event is parsed in the socket's callback, with no task
switch. HTTP/1.1 and SSE are parsed here by hand (chunked bodies, ``\\n\\n``-separated events).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import orjson

from bench._script import Script, reply, tokens_in


@dataclass
class Config:
    host: str
    port: int
    concurrency: int
    script: Script
    # Close the connection after this many delta events (disconnect mode).
    disconnect_after: int | None = None
    ramp_up_s: float = 1.0  # stream starts are spread evenly over this long
    timeout_s: float = 120.0  # for the whole streaming phase
    poll_s: float = 0.02  # disconnect mode: between two reads of a message
    interactive: bool = True  # wait for "go"/"verify" on stdin
    # Read every reply back through the API after the window and compare. Off for the reference
    # relay (bench._reference), which keeps no replies; every check of the stream itself stays.
    read_back: bool = True

    @classmethod
    def from_json(cls, text: str) -> Config:
        raw = orjson.loads(text)
        raw["script"] = Script(**raw["script"])
        return cls(**raw)


@dataclass
class Record:
    """One stream, as the client saw it. Times are ``time.monotonic()`` seconds."""

    conversation_id: str
    t_begin: float = 0.0  # connecting
    t_start_event: float | None = None
    t_first_delta: float | None = None
    t_last_delta: float | None = None
    t_end: float | None = None  # `done` arrived, or the client disconnected
    status: int | None = None
    message_id: str | None = None
    deltas: int = 0  # events
    last_id: int | None = None
    pings: int = 0
    error_events: list[str] = field(default_factory=list)
    done: dict[str, Any] | None = None
    text: str = ""
    # Disconnect mode: wall-clock time of the close, and what reading the message back found.
    disconnect_wall: float | None = None
    t_observed: float | None = None  # the first read that found the row no longer 'streaming'
    row_updated_wall: float | None = None
    row_status: str | None = None
    row_stop_reason: str | None = None
    errors: list[str] = field(default_factory=list)


class SseStream(asyncio.Protocol):
    """``POST /v1/conversations/{id}/messages`` and its SSE body, parsed as it arrives."""

    def __init__(self, record: Record, request: bytes, disconnect_after: int | None) -> None:
        self.record = record
        self.ended = asyncio.get_running_loop().create_future()
        self._request = request
        self._disconnect_after = disconnect_after
        self._transport: asyncio.Transport | None = None
        self._head = True
        self._raw = bytearray()  # the undecoded HTTP bytes
        self._sse = bytearray()  # the decoded body, not yet split into events
        self._parts: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.record.errors.append(f"connection_lost: {exc!r}" if exc else "connection_closed")
            self._end()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self._raw += data
        if self._head:
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._raw[:end]).decode("latin-1")
            del self._raw[: end + 4]
            self._head = False
            self.record.status = int(head.split(" ", 2)[1])
            if self.record.status != 200 or "chunked" not in head.lower():
                self.record.errors.append(f"http_{self.record.status}")
                self._close()
                return
        body_ended = self._dechunk()
        self._events(now)
        if body_ended and not self.ended.done():
            self.record.errors.append("body_ended_before_done")
            self._close()

    def _dechunk(self) -> bool:
        """Move the complete chunks into the SSE buffer; return whether the body ended."""
        raw = self._raw
        while True:
            line_end = raw.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(raw[:line_end]).split(b";")[0], 16)
            if size == 0:
                return True
            if len(raw) < line_end + 2 + size + 2:
                return False
            self._sse += raw[line_end + 2 : line_end + 2 + size]
            del raw[: line_end + 2 + size + 2]

    def _events(self, now: float) -> None:
        sse = self._sse
        while (end := sse.find(b"\n\n")) >= 0:
            block = bytes(sse[:end])
            del sse[: end + 2]
            if self.ended.done():
                return
            self._event(block, now)

    def _event(self, block: bytes, now: float) -> None:
        record = self.record
        name, data, event_id = "message", b"", None
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                data = line[6:]
            elif line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"id: "):
                event_id = int(line[4:])
            elif line.startswith(b":"):
                record.pings += 1
                return
        payload = orjson.loads(data) if data else {}
        if name == "delta":
            self._parts.append(payload["content"])
            record.deltas += 1
            record.last_id = event_id
            if record.t_first_delta is None:
                record.t_first_delta = now
            record.t_last_delta = now
            if record.deltas == self._disconnect_after:
                record.disconnect_wall = time.time()
                self._close()
        elif name == "start":
            record.t_start_event = now
            record.message_id = payload["message_id"]
        elif name == "error":
            record.error_events.append(payload["error"]["code"])
        elif name == "done":
            record.done = payload
            self._close()
        else:
            record.errors.append(f"unknown_event: {name}")

    def _close(self) -> None:
        self._end()
        if self._transport is not None:
            self._transport.close()

    def _end(self) -> None:
        if not self.ended.done():
            self.record.t_end = time.monotonic()
            self.record.text = "".join(self._parts)
            self.ended.set_result(None)


async def request(
    config: Config, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    """One HTTP/1.1 request on a connection of its own; the JSON response."""
    reader, writer = await asyncio.open_connection(config.host, config.port)
    try:
        payload = orjson.dumps(body) if body is not None else b""
        writer.write(
            f"{method} {path} HTTP/1.1\r\nhost: {config.host}\r\nconnection: close\r\n"
            f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        status = int(head.split(" ", 2)[1])
        if "transfer-encoding: chunked" in head:
            content = b""
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                content += (await reader.readexactly(size + 2))[:-2]
        else:
            length = head.split("content-length:", 1)[1].split("\r\n", 1)[0]
            content = await reader.readexactly(int(length))
    finally:
        writer.close()
    return status, (orjson.loads(content) if content else None)


async def _bounded(limit: int, calls: list[Any]) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def one(call: Any) -> Any:
        async with semaphore:
            return await call

    return await asyncio.gather(*(one(call) for call in calls))


async def create_conversations(config: Config) -> list[Record]:
    async def create(i: int) -> Record:
        status, body = await request(config, "POST", "/v1/conversations", {"title": f"bench {i}"})
        if status != 201:
            raise RuntimeError(f"creating a conversation: HTTP {status} {body}")
        return Record(conversation_id=body["id"])

    records: list[Record] = await _bounded(8, [create(i) for i in range(config.concurrency)])
    return records


async def drive(config: Config, records: list[Record]) -> None:
    """Run every stream to its end (or its disconnect, and then until its row is committed)."""
    loop = asyncio.get_running_loop()
    message = orjson.dumps({"content": config.script.message()})
    begin = loop.time()

    async def one(i: int, record: Record) -> None:
        start_at = begin + i * config.ramp_up_s / config.concurrency
        await asyncio.sleep(max(0.0, start_at - loop.time()))
        path = f"/v1/conversations/{record.conversation_id}/messages"
        request_bytes = (
            f"POST {path} HTTP/1.1\r\nhost: {config.host}\r\naccept: text/event-stream\r\n"
            f"content-type: application/json\r\ncontent-length: {len(message)}\r\n\r\n".encode()
            + message
        )
        record.t_begin = time.monotonic()
        try:
            _, protocol = await loop.create_connection(
                lambda: SseStream(record, request_bytes, config.disconnect_after),
                config.host,
                config.port,
            )
        except OSError as exc:
            record.errors.append(f"connect: {exc!r}")
            record.t_end = time.monotonic()
            return
        await protocol.ended
        if config.disconnect_after is not None and record.disconnect_wall is not None:
            await poll_until_final(config, record)

    tasks = [one(i, record) for i, record in enumerate(records)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), config.timeout_s)
    except TimeoutError:
        for record in records:
            if record.t_end is None or (record.disconnect_wall and record.t_observed is None):
                record.errors.append("timeout")


async def poll_until_final(config: Config, record: Record) -> None:
    while True:
        status, row = await request(config, "GET", f"/v1/messages/{record.message_id}")
        if status != 200:
            record.errors.append(f"get_message: HTTP {status}")
            return
        if row["status"] != "streaming":
            record.t_observed = time.monotonic()
            record.row_status = row["status"]
            record.row_stop_reason = row["stop_reason"]
            record.row_updated_wall = datetime.fromisoformat(row["updated_at"]).timestamp()
            if not row["content"].startswith(record.text):
                record.errors.append("stored_content_is_not_an_extension_of_received")
            return
        await asyncio.sleep(config.poll_s)


def check(config: Config, record: Record) -> None:
    """Append to ``record.errors`` whatever is wrong with what the stream received."""
    script = config.script
    errors = record.errors
    if record.status != 200:
        return  # already recorded
    expected = reply(script.tokens if script.fail_after is None else script.fail_after)
    if record.last_id is not None and record.last_id != len(record.text):
        errors.append("delta_id_is_not_the_length")
    if config.disconnect_after is not None:
        if not expected.startswith(record.text):
            errors.append("wrong_content")
        if record.disconnect_wall is None:
            errors.append("ended_before_the_disconnect_point")
        elif record.row_status is not None and (
            record.row_status,
            record.row_stop_reason,
        ) != ("interrupted", "client_disconnected"):
            errors.append(f"row_status: {record.row_status}/{record.row_stop_reason}")
        return
    done = record.done
    if done is None:
        errors.append("missing_done")
        return
    if record.text != expected:
        errors.append("wrong_content")
    if script.fail_after is None:
        if (done["status"], done["stop_reason"]) != ("complete", "stop"):
            errors.append(f"done_status: {done['status']}/{done['stop_reason']}")
        if record.error_events:
            errors.append(f"error_events: {record.error_events}")
    else:
        if (done["status"], done["stop_reason"]) != ("failed", "upstream_error"):
            errors.append(f"done_status: {done['status']}/{done['stop_reason']}")
        if not record.error_events:
            errors.append("no_error_event")


async def verify(config: Config, records: list[Record]) -> None:
    """Read every reply back: the stored content is exactly what the client received."""
    if not config.read_back:
        return

    async def one(record: Record) -> None:
        if record.message_id is None or config.disconnect_after is not None:
            return  # disconnect mode read its rows while polling
        status, row = await request(config, "GET", f"/v1/messages/{record.message_id}")
        if status != 200:
            record.errors.append(f"read_back: HTTP {status}")
        elif row["content"] != record.text:
            record.errors.append("stored_content_differs")
        elif record.done is not None and row["status"] != record.done["status"]:
            record.errors.append("stored_status_differs")

    await _bounded(8, [one(record) for record in records])


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(message).decode() + "\n")
    sys.stdout.flush()


async def _wait_for(loop: asyncio.AbstractEventLoop, word: str, config: Config) -> None:
    if not config.interactive:
        return
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != word:
        raise SystemExit(f"expected {word!r} from the benchmark, got {line!r}")


async def main(config: Config) -> None:
    loop = asyncio.get_running_loop()
    records = await create_conversations(config)
    _say({"phase": "ready"})
    await _wait_for(loop, "go", config)
    await drive(config, records)
    _say({"phase": "streamed", "t_end": time.monotonic()})
    await _wait_for(loop, "verify", config)
    for record in records:
        check(config, record)
    await verify(config, records)
    streams = []
    for record in records:
        row = asdict(record)
        row["tokens"] = tokens_in(record.text)
        row["chars"] = len(record.text)
        del row["text"]
        streams.append(row)
    _say({"phase": "result", "streams": streams})


if __name__ == "__main__":
    asyncio.run(main(Config.from_json(sys.argv[1])))
