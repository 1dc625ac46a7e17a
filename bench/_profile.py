"""Profiling a worker during a measured window with py-spy (``pip install py-spy``; as root).

``py-spy record --gil --threads --format raw`` samples the first worker for ``duration_s`` once
the streams' ramp-up is over, and only the thread that holds the GIL: the Python-level work.
Time in system calls (socket sends and receives, epoll) releases the GIL and is not in these
samples; the phase's ``server_cpu_system_s`` (stime from /proc) is that kernel time. So a
function's share of the samples times the phase's *user* CPU per token is its cost per token.
(Without ``--gil``, py-spy counts a thread that has just been woken from ``epoll_wait`` but waits
for a core as running, which inflates the event loops' polling a lot on a busy 2-core machine.)
The raw output is collapsed stacks, one line per distinct stack:
``thread (0x..);frame (file.py:line);...;leaf (file.py:line) COUNT``.

The summary groups frames by package (trio, hypercorn, h11, quart, httpx2/httpcore, openai,
sqlalchemy/asyncpg, chatsrv...) by their *leaf* frame (self time), and lists the functions with
the most inclusive and self time.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")
# Where a frame's file lives, most specific first.
# py-spy names a frame's file relative to its sys.path entry: "trio/_core/_run.py".
PACKAGES = {
    "chatsrv": "chatsrv",
    "hypercorn": "hypercorn",
    "h11": "h11",
    "quart": "quart / quart_trio",
    "quart_trio": "quart / quart_trio",
    "werkzeug": "werkzeug",
    "openai": "openai",
    "httpx2": "httpx2 / httpcore",
    "httpcore": "httpx2 / httpcore",
    "anyio": "anyio",
    "sqlalchemy": "sqlalchemy",
    "asyncpg": "asyncpg",
    "trio": "trio",
    "outcome": "trio",
    "asyncio": "asyncio (stdlib)",
    "logging": "logging (stdlib)",
    "tenacity": "tenacity",
    "orjson": "orjson",
    "pydantic": "pydantic",
    "pydantic_settings": "pydantic",
}


# Where a sample's CPU goes, decided by the first of these that its stack contains (by function
# name), in this order; a stack of the trio thread that has none of them is the scheduler's own.
_RELAY = "SSE relay generator (chatsrv/http/_relay.py) and Quart's body loop"
_PERSISTER = "persister: channel receive, Turn.extend, checkpoints"
STAGES = (
    ("OpenAIProvider.generate", "upstream: HTTP transport, trio socket, SSE parsing, emit"),
    ("HTTPStream.app_send", "SSE write: hypercorn, h11, trio socket"),
    ("relay", _RELAY),
    ("ASGIHTTPConnection._send_response", _RELAY),
    ("Persister.run", _PERSISTER),
    ("Persister._checkpoints", _PERSISTER),
    ("TurnEngine._run", "turn start: begin_turn, nursery, channel"),
    ("handle_request", "request handling: routing, validation, start_turn"),
    ("TCPServer.run", "hypercorn connection: accept, read requests, timers"),
)  # fmt: skip
SCHEDULER = "trio scheduler: run loop, epoll, deadlines, rescheduling"
DB_THREAD = "other threads: the store's asyncio loop (SQLAlchemy, asyncpg)"


def stage(frames: list[str]) -> str:
    names = {_FRAME.sub(r"\g<func>", frame) for frame in frames}
    for marker, name in STAGES:
        if marker in names:
            return name
    return SCHEDULER if "unrolled_run" in names else DB_THREAD


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def package(file: str) -> str:
    top = file.split("/", 1)[0] if "/" in file else ""
    if top in PACKAGES:
        return PACKAGES[top]
    return "stdlib (other)" if file.endswith(".py") else "other"


def _parse(raw: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _name(frame: str) -> tuple[str, str]:
    """``(function qualified by file stem, file)`` of a collapsed-stack frame."""
    match = _FRAME.match(frame)
    if not match:
        return frame, ""
    file = match.group("file")
    stem = file.rsplit("/", 2)
    where = "/".join(stem[-2:]) if len(stem) > 1 else file
    return f"{match.group('func')} ({where})", file


def summarize(raw: Path, us_per_token: float | None, *, top: int = 25) -> dict[str, Any]:
    stacks = _parse(raw)
    total = sum(count for _, count in stacks)
    if not total:
        return {"samples": 0}
    threads: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    for frames, count in stacks:
        stages[stage(frames)] += count
        thread = frames[0] if frames and frames[0].startswith("thread ") else ""
        body = frames[1:] if thread else frames
        threads["asyncio db thread" if _is_asyncio_thread(body) else "trio main thread"] += count
        if not body:
            continue
        leaf_name, leaf_file = _name(body[-1])
        self_time[leaf_name] += count
        by_package[package(leaf_file)] += count
        for name in {_name(frame)[0] for frame in body}:
            inclusive[name] += count

    def share(counter: Counter[str], n: int | None = None) -> list[dict[str, Any]]:
        rows = []
        for name, count in counter.most_common(n):
            row: dict[str, Any] = {"name": name, "pct": 100 * count / total}
            if us_per_token is not None:
                row["us_per_token"] = us_per_token * count / total
            rows.append(row)
        return rows

    return {
        "samples": total,
        "raw": raw.name,  # under the run's scratch directory (bench/out); no machine paths
        "threads": share(threads),
        "stages": share(stages),
        "self_by_package": share(by_package),
        "top_inclusive": share(inclusive, top),
        "top_self": share(self_time, top),
    }


def _is_asyncio_thread(frames: list[str]) -> bool:
    return any("_main (" in f and "_aio.py" in f for f in frames[:6]) or any(
        "run_forever" in f for f in frames[:4]
    )


class Recording:
    """py-spy on ``pid`` for ``duration_s``, starting ``delay_s`` into the window."""

    def __init__(self, pid: int, raw: Path, *, delay_s: float, duration_s: float) -> None:
        self.raw = raw
        executable = py_spy()
        if executable is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self._command = [
            executable, "record", "--pid", str(pid), "--duration", str(int(duration_s)),
            "--rate", "250", "--gil", "--threads", "--format", "raw", "-o", str(raw),
        ]  # fmt: skip
        self._delay_s = delay_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: str | None = None

    def _run(self) -> None:
        time.sleep(self._delay_s)
        done = subprocess.run(self._command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.error = done.stderr[-500:]

    def summary(self, phase: dict[str, Any]) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return summarize(self.raw, phase.get("server_user_cpu_us_per_token"))


@contextlib.contextmanager
def recording(pid: int, raw: Path, *, delay_s: float, duration_s: float) -> Iterator[Recording]:
    rec = Recording(pid, raw, delay_s=delay_s, duration_s=duration_s)
    rec._thread.start()
    try:
        yield rec
    finally:
        rec._thread.join()
