"""``python -m bench._resume``: how far a stream resumed on another process trails the upstream.

Two chatsrv processes (hypercorn, one worker each) share a fresh PostgreSQL database and the
benchmark's fake upstream. Each of ``--streams`` clients posts a message to the first process
and reads its stream; after ``--resume-after`` deltas a second client resumes the same reply on
the *other* process with ``Last-Event-ID``, the way a reconnect that lands on another worker
does, and reads it to ``done``. The first client stays, so both streams run to the end.

Reported, over every stream: the lag of each character on the resumed stream behind the moment
the direct stream had it (p50, p99, max), and how much later the resumed stream's ``done`` came
than the direct one's (p50, p99, max). Every resumed text is checked against the reply exactly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from httpx_sse import aconnect_sse

from bench._pg import DEFAULT_SERVER, fresh_database
from bench._proc import MAX_STREAMS_PER_USER, Upstream, running_server
from bench._script import Script, reply


class Timeline:
    """When a stream's deltas arrived: (characters so far, monotonic time), and its ``done``."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []
        self.text = ""
        self.done_at: float | None = None

    def reached(self, offset: int) -> float:
        """When this stream first held ``offset`` characters."""
        for length, at in self.points:
            if length >= offset:
                return at
        raise ValueError(f"never reached {offset}")


async def read(
    client: httpx.AsyncClient, method: str, url: str, timeline: Timeline, **kwargs: Any
) -> None:
    async with aconnect_sse(client, method, url, **kwargs) as source:
        source.response.raise_for_status()
        async for event in source.aiter_sse():
            now = time.monotonic()
            if event.event == "delta":
                timeline.text += orjson.loads(event.data)["content"]
                timeline.points.append((int(event.id), now))
            elif event.event == "done":
                timeline.done_at = now


async def one_stream(
    one: httpx.AsyncClient, two: httpx.AsyncClient, script: Script, resume_after: int
) -> tuple[Timeline, Timeline, int]:
    conversation = (await one.post("/v1/conversations", json={})).json()["id"]
    direct, resumed = Timeline(), Timeline()
    started = trio.Event()
    message_id = ""

    async def post() -> None:
        nonlocal message_id
        async with aconnect_sse(
            one,
            "POST",
            f"/v1/conversations/{conversation}/messages",
            json={"content": script.message()},
        ) as source:
            async for event in source.aiter_sse():
                now = time.monotonic()
                if event.event == "start":
                    message_id = orjson.loads(event.data)["message_id"]
                elif event.event == "delta":
                    direct.text += orjson.loads(event.data)["content"]
                    direct.points.append((int(event.id), now))
                    if len(direct.points) == resume_after:
                        started.set()
                elif event.event == "done":
                    direct.done_at = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post)
        await started.wait()
        after = direct.points[-1][0]
        headers = {"Last-Event-ID": str(after)}
        url = f"/v1/messages/{message_id}/events"
        nursery.start_soon(lambda: read(two, "GET", url, resumed, headers=headers))
    return direct, resumed, after


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def measure(args: argparse.Namespace, urls: tuple[str, str]) -> dict[str, Any]:
    script = Script(tokens=args.tokens, interval_s=1 / args.rate)
    expected = reply(args.tokens)
    lags: list[float] = []
    end_lags: list[float] = []
    async with (
        httpx.AsyncClient(base_url=urls[0], timeout=60) as one,
        httpx.AsyncClient(base_url=urls[1], timeout=60) as two,
    ):
        results: list[tuple[Timeline, Timeline, int]] = []

        async def run() -> None:
            results.append(await one_stream(one, two, script, args.resume_after))

        async with trio.open_nursery() as nursery:
            for _ in range(args.streams):
                nursery.start_soon(run)
    for direct, resumed, after in results:
        if direct.text != expected or resumed.text != expected[after:]:
            raise SystemExit("a resumed stream's text differs from the reply")
        assert direct.done_at is not None and resumed.done_at is not None
        lags += [at - direct.reached(offset) for offset, at in resumed.points]
        end_lags.append(resumed.done_at - direct.done_at)
    return {
        "streams": args.streams,
        "tokens": args.tokens,
        "rate_per_s": args.rate,
        "resumed_after_deltas": args.resume_after,
        "character_lag": percentiles(lags),
        "done_lag": percentiles(end_lags),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._resume", description=__doc__)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second")
    parser.add_argument("--resume-after", type=int, default=20, help="deltas")
    parser.add_argument("--postgres", default=DEFAULT_SERVER)
    args = parser.parse_args(argv)
    upstream = Upstream()
    try:
        with fresh_database(args.postgres) as database, tempfile.TemporaryDirectory() as tmp:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("CHATSRV_")},
                "CHATSRV_DATABASE_URL": database.url,
                "CHATSRV_LLM_BASE_URL": upstream.url,
                "CHATSRV_LLM_API_KEY": "bench",
                "CHATSRV_LOG_LEVEL": "WARNING",
                "CHATSRV_MAX_STREAMS_PER_USER": MAX_STREAMS_PER_USER,
            }
            with (
                running_server(
                    workers=1,
                    env={**env, "CHATSRV_JOURNAL_DIR": f"{tmp}/one"},
                    log_path=Path(tmp) / "one.log",
                ) as one,
                running_server(
                    workers=1,
                    env={**env, "CHATSRV_JOURNAL_DIR": f"{tmp}/two"},
                    log_path=Path(tmp) / "two.log",
                ) as two,
            ):
                figures = trio.run(measure, args, (one.url, two.url))
    finally:
        upstream.close()
    print(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
