"""A real chatsrv under test: the app from ``create_app`` served by hypercorn's trio worker on a
loopback port chosen by the kernel, inside the test's own nursery, talking to the fake upstream
through the real openai SDK, and a real HTTP client with an SSE parser on the other side.
``Chatsrv.count_rows`` counts the rows in the server's database over a connection of the test's
own, to check what a request wrote without asking the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import trio
from httpx_sse import ServerSentEvent, aconnect_sse
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from sqlalchemy import event
from sqlalchemy.engine import make_url

from chatsrv._service import Service
from chatsrv._settings import Settings
from chatsrv.app import create_app
from tests.db import plain_url

# The tables a request can write to.
TABLES = ("conversations", "messages")


@dataclass
class Stream:
    """What one client received from ``POST .../messages``."""

    status_code: int
    events: list[ServerSentEvent] = field(default_factory=list)

    @property
    def start(self) -> dict[str, Any]:
        assert self.events and self.events[0].event == "start", self.events[:1]
        start: dict[str, Any] = orjson.loads(self.events[0].data)
        return start

    @property
    def message_id(self) -> str:
        return str(self.start["message_id"])

    @property
    def deltas(self) -> list[ServerSentEvent]:
        return [event for event in self.events if event.event == "delta"]

    @property
    def text(self) -> str:
        return "".join(orjson.loads(event.data)["content"] for event in self.deltas)

    @property
    def done(self) -> dict[str, Any] | None:
        last = self.events[-1] if self.events else None
        return orjson.loads(last.data) if last is not None and last.event == "done" else None

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [orjson.loads(e.data)["error"] for e in self.events if e.event == "error"]

    @property
    def ids(self) -> list[int]:
        """The deltas' ids: the reply's length in characters after each."""
        return [int(event.id) for event in self.deltas]


def _after_deltas(count: int) -> Callable[[Stream], bool]:
    return lambda stream: len(stream.deltas) == count


@dataclass
class ApiClient:
    """A client of chatsrv's HTTP API, wherever the server runs."""

    client: httpx.AsyncClient

    async def new_conversation(self, **body: Any) -> str:
        response = await self.client.post("/v1/conversations", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def messages(self, conversation_id: str) -> list[dict[str, Any]]:
        response = await self.client.get(f"/v1/conversations/{conversation_id}/messages")
        assert response.status_code == 200, response.text
        messages: list[dict[str, Any]] = response.json()["messages"]
        return messages

    async def message(self, message_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/messages/{message_id}")
        assert response.status_code == 200, response.text
        message: dict[str, Any] = response.json()
        return message

    async def read_events(
        self,
        method: str,
        path: str,
        *,
        until: Callable[[Stream], bool] | None = None,
        on_delta: Callable[[int], Awaitable[None]] | None = None,
        into: Stream | None = None,
        **request: Any,
    ) -> Stream:
        """Send a request that answers with Server-Sent Events and read them to the end, or
        close the connection as soon as ``until(stream)`` holds. ``on_delta`` is awaited with
        the count of deltas after each one. Events are collected in ``into`` when given, so a
        caller keeps what arrived even if the connection breaks."""
        stream = into if into is not None else Stream(0)
        left = False
        async with aconnect_sse(self.client, method, path, **request) as source:
            stream.status_code = source.response.status_code
            try:
                async for event in source.aiter_sse():
                    stream.events.append(event)
                    if event.event == "delta" and on_delta is not None:
                        await on_delta(len(stream.deltas))
                    if until is not None and until(stream):
                        # Closing the response closes the socket mid-body; the iteration then
                        # fails, which unwinds httpx's generators (breaking out of the loop
                        # would leave them to the garbage collector).
                        left = True
                        await source.response.aclose()
            except (httpx.StreamClosed, httpx.ReadError):
                if not left:
                    raise
        return stream

    async def resume(
        self,
        message_id: str,
        after: int | None = None,
        *,
        query: int | None = None,
        until: Callable[[Stream], bool] | None = None,
        into: Stream | None = None,
    ) -> Stream:
        """Read ``GET /v1/messages/{id}/events``, with ``Last-Event-ID: after`` (and
        ``?last_event_id=query``) when given (see ``read_events``)."""
        return await self.read_events(
            "GET",
            f"/v1/messages/{message_id}/events",
            headers={} if after is None else {"Last-Event-ID": str(after)},
            params={} if query is None else {"last_event_id": str(query)},
            until=until,
            into=into,
        )

    async def stream(
        self,
        conversation_id: str,
        content: str = "hello",
        *,
        model: str | None = None,
        disconnect_after: int | None = None,
        on_delta: Callable[[int], Awaitable[None]] | None = None,
        into: Stream | None = None,
    ) -> Stream:
        """Post a message and read its SSE stream to the end, or close the connection after
        ``disconnect_after`` delta events (see ``read_events``)."""
        body: dict[str, Any] = {"content": content}
        if model is not None:
            body["model"] = model
        return await self.read_events(
            "POST",
            f"/v1/conversations/{conversation_id}/messages",
            json=body,
            until=None if disconnect_after is None else _after_deltas(disconnect_after),
            on_delta=on_delta,
            into=into,
        )

    async def stream_until(
        self,
        nursery: trio.Nursery,
        conversation_id: str,
        reached: Callable[[Stream], bool] = lambda stream: bool(stream.deltas),
    ) -> Stream:
        """Read a stream in ``nursery``; return it, still being read, once ``reached(stream)``
        holds after a delta (by default: once the first delta has arrived)."""
        stream = Stream(0)
        done = trio.Event()

        async def seen(_: int) -> None:
            if reached(stream):
                done.set()

        nursery.start_soon(partial(self.stream, conversation_id, on_delta=seen, into=stream))
        await done.wait()
        return stream


@dataclass
class Chatsrv(ApiClient):
    """A chatsrv running in this test's process, with its service in reach."""

    extensions: dict[str, Any]
    shutdown: trio.Event

    @property
    def service(self) -> Service:
        service: Service = self.extensions["chatsrv"]
        return service

    @contextlib.contextmanager
    def before_each_statement(self, hook: Callable[..., None]) -> Iterator[None]:
        """Run ``hook`` (SQLAlchemy's ``before_cursor_execute``) before each statement the
        server's store executes, inside this block: the seam for injecting database faults."""
        engine = self.service.store._engine.sync_engine
        event.listen(engine, "before_cursor_execute", hook)
        try:
            yield
        finally:
            event.remove(engine, "before_cursor_execute", hook)

    @property
    def database_url(self) -> str:
        """The URL of this server's database, as the server uses it."""
        return self.service.settings.database_url

    async def count_rows(self) -> dict[str, int]:
        """How many rows each table holds, counted in the database itself, over a connection of
        the test's own (not through the server): to prove that a request wrote nothing."""
        return await trio.to_thread.run_sync(count_rows, self.database_url)

    async def wait_attached(self, message_id: str, relays: int) -> None:
        """Wait until ``relays`` clients stream the turn writing ``message_id`` (bounded by the
        caller; the requests' database calls run on another thread, hence the polling)."""
        engine = self.service.engine
        while (turn := engine.turn(message_id, user=None)) is None or turn.relays < relays:  # noqa: ASYNC110
            await trio.sleep(0.01)

    async def wait_finished(self, message_id: str) -> None:
        """Wait until the turn writing ``message_id`` has made its final commit."""
        turn = self.service.engine.turn(message_id, user=None)
        if turn is not None:
            await turn.finished.wait()


def rows(conversations: int, messages: int) -> dict[str, int]:
    """What ``Chatsrv.count_rows`` returns for a database holding these rows."""
    return {"conversations": conversations, "messages": messages}


def count_rows(database_url: str) -> dict[str, int]:
    """Rows per table in the database at ``database_url``, from synchronous code (blocking: call
    it in a worker thread): sqlite3 on SQLite, a new asyncpg connection on PostgreSQL."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database, database_url
        with contextlib.closing(sqlite3.connect(url.database)) as conn:
            return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}

    async def count() -> dict[str, int]:
        conn = await asyncpg.connect(plain_url(database_url), timeout=10)
        try:
            return {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLES}
        finally:
            await conn.close()

    return asyncio.run(count())


def chatsrv_settings(database_url: str, upstream_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "llm_provider": "openai",
        "llm_base_url": upstream_url,
        "llm_api_key": "test-key",
        "llm_model": "fake-model",
        "llm_max_retries": 0,
        "heartbeat_s": 0.2,
        "persist_grace_s": 10.0,
        "shutdown_grace_s": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


StartChatsrv = Callable[..., Awaitable[Chatsrv]]


@pytest.fixture
async def start_chatsrv(
    database_url: str, upstream: Any, tmp_path: Path
) -> AsyncIterator[StartChatsrv]:
    """Start a chatsrv with the given setting overrides; all are stopped when the test ends."""
    started: list[Chatsrv] = []
    async with trio.open_nursery() as nursery:

        async def start(**overrides: Any) -> Chatsrv:
            overrides.setdefault("journal_dir", tmp_path / f"journal-{len(started)}")
            url = overrides.pop("database_url", database_url)
            settings = chatsrv_settings(url, upstream.base_url, **overrides)
            app = create_app(settings)
            config = Config()
            config.bind = ["127.0.0.1:0"]
            config.graceful_timeout = 2.0
            config.accesslog = None
            shutdown = trio.Event()
            binds = await nursery.start(
                partial(hypercorn_serve, app, config, shutdown_trigger=shutdown.wait)
            )
            client = httpx.AsyncClient(base_url=binds[0], timeout=30.0)
            server = Chatsrv(client, app.extensions, shutdown)
            started.append(server)
            return server

        yield start
        for server in started:
            await server.client.aclose()
            server.service.engine.drain()
            server.shutdown.set()


@pytest.fixture
async def chatsrv(start_chatsrv: StartChatsrv) -> Chatsrv:
    return await start_chatsrv()
