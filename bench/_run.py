"""One measured phase: a fresh server, a warm-up, then N concurrent streams and their figures.

The server is chatsrv, or the reference relay (``bench._reference``, ``Target.server``), on the
same hypercorn command; everything below is the same for both, except that the reference has no
database (no statement counts) and keeps no replies (the client does not read them back).

Sequence of a phase::

    start hypercorn (N workers) on the fake upstream and the bench database; wait until every
      worker serves
    warm-up: 8 short streams (imports, pool connections, prepared statements, the first
      upstream connections), so that one-time costs stay out of the figures and out of idle RSS
    start the client process; it creates one conversation per stream, then says "ready"
    ── window opens: read worker CPU (utime+stime), idle RSS, the database log offset, the
       machine's busy time, the CPU of the client, the fake and the database backends
    "go": the client opens its streams, starts spread evenly over ramp_up_s, RSS sampled
       every 50 ms
    ── window closes when the client says "streamed" (every stream ended): read them again
    "verify": the client reads every reply back and checks it; stop the server, check its log

A fresh server per phase keeps the phases apart: idle RSS is the RSS of a server that has
served nothing but the warm-up, and one phase's leftovers (pool, allocator) do not carry over.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

import orjson

from bench import _proc
from bench._pg import Database, summarize_statements
from bench._script import Script

WARMUP = Script(tokens=20, interval_s=0.005)
WARMUP_STREAMS = 10  # the default pool size: every pool connection gets opened


@dataclass(frozen=True)
class Target:
    """What a phase runs against."""

    workers: int
    database_url: str
    upstream: _proc.Upstream
    scratch: Path  # server logs
    database: Database | None = None  # PostgreSQL: statement counts, backend CPU
    ramp_up_s: float = 1.0
    env: tuple[tuple[str, str], ...] = ()  # more for the server's environment (experiments)
    root: Path = _proc.REPO  # where the server runs: the working tree, or a snapshot (--ref)
    server: str = "chatsrv"  # or "reference": the naive relay, bench._reference

    @property
    def reference(self) -> bool:
        return self.server == "reference"


def reference_env(target: Target) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CHATSRV_")}
    env["BENCH_UPSTREAM_URL"] = target.upstream.url
    return env


def chatsrv_env(target: Target) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CHATSRV_") and name != "OPENAI_API_KEY"
    }
    env.update(
        CHATSRV_DATABASE_URL=target.database_url,
        CHATSRV_LLM_PROVIDER="openai",
        CHATSRV_LLM_BASE_URL=target.upstream.url,
        CHATSRV_LLM_API_KEY="bench",
        CHATSRV_LLM_MODEL="bench-model",
        CHATSRV_LLM_MAX_RETRIES="0",
        CHATSRV_MAX_STREAMS_PER_USER=_proc.MAX_STREAMS_PER_USER,
        # Keep the local journal (if this chatsrv has one) out of the working tree.
        CHATSRV_JOURNAL_DIR=str(target.scratch / "journal"),
    )
    if target.root != _proc.REPO:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target.root), env.get("PYTHONPATH")]))
    env.update(target.env)
    return env


class Client:
    """The load client process and its line protocol (see ``bench._client``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench._client", orjson.dumps(config).decode()],
            cwd=_proc.REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def expect(self, phase: str, timeout_s: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            self.process.kill()
            raise RuntimeError(f"the client did not report {phase!r} within {timeout_s} s")
        message: dict[str, Any] = orjson.loads(line)
        if message.get("phase") != phase:
            raise RuntimeError(f"the client said {message!r}, expected phase {phase!r}")
        return message

    def say(self, word: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(word.encode() + b"\n")
        self.process.stdin.flush()

    def wait(self) -> None:
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def client_config(
    server: _proc.Server, concurrency: int, script: Script, **options: Any
) -> dict[str, Any]:
    timeout_s = script.upstream_duration_s + 60.0
    return {
        "host": "127.0.0.1",
        "port": server.port,
        "concurrency": concurrency,
        "script": asdict(script),
        "timeout_s": timeout_s,
        "read_back": server.app != _proc.REFERENCE_APP,
    } | options


def warm_up(server: _proc.Server) -> int:
    """Rounds of short streams, at least two, until every worker has served some of them (the
    kernel, not us, picks the worker of each connection); the number of rounds."""
    # A round costs the lean reference relay a few ms of CPU, chatsrv ten times more.
    served_s = 0.005 if server.app == _proc.REFERENCE_APP else 0.05
    rounds = 0
    while rounds < 6:
        rounds += 1
        before = [sum(cpu) for cpu in server.cpu_s()]
        config = client_config(server, WARMUP_STREAMS, WARMUP, ramp_up_s=0.0, interactive=False)
        client = Client(config)
        client.expect("ready", 60)
        client.expect("streamed", 60)
        result = client.expect("result", 60)
        client.wait()
        failed = [s["errors"] for s in result["streams"] if s["errors"]]
        if failed:
            raise RuntimeError(f"the warm-up failed: {failed[:3]}")
        used = [sum(cpu) - b for cpu, b in zip(server.cpu_s(), before, strict=True)]
        if rounds >= 2 and min(used) >= served_s:
            break
    return rounds


def _cpu_of(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[pid] = _proc.cpu_s(pid)
    return found


def run_phase(
    target: Target,
    *,
    concurrency: int,
    script: Script,
    mode: str = "stream",  # "stream", "disconnect" or "fail"
    disconnect_after: int | None = None,
    profile: Any = None,  # a callable(worker_pids) -> context manager, run inside the window
    pattern: str | None = None,  # the upstream pattern's name, for the label (bench._compare)
) -> dict[str, Any]:
    label = (
        ("ref-" if target.reference else "")
        + f"{target.workers}w-{mode}-{concurrency}"
        + (f"-{pattern}" if pattern else "")
        + ("-profiled" if profile else "")
    )
    log_path = target.scratch / f"server-{label}.log"
    started = time.monotonic()
    if target.reference:
        app, env, root = _proc.REFERENCE_APP, reference_env(target), _proc.REPO
    else:
        app, env, root = _proc.CHATSRV_APP, chatsrv_env(target), target.root
    with _proc.running_server(
        workers=target.workers, env=env, log_path=log_path, root=root, app=app
    ) as server:
        warm_up_rounds = warm_up(server)
        options: dict[str, Any] = {"ramp_up_s": target.ramp_up_s}
        if disconnect_after is not None:
            options["disconnect_after"] = disconnect_after
        client = Client(client_config(server, concurrency, script, **options))
        client.expect("ready", 120)

        db = None if target.reference else target.database
        db_pids = db.backend_pids() if db is not None else []
        target.upstream.reset()
        time.sleep(0.3)  # let the conversations' inserts finish in the log and the sampler start
        idle_rss = server.rss_bytes()
        log_start = db.log.offset() if db is not None and db.log is not None else None
        machine_0 = _proc.machine_jiffies()
        others_0 = _cpu_of([client.pid, target.upstream.pid, *db_pids])
        cpu_0 = server.cpu_s()
        main_0 = server.main_thread_cpu_s()
        t_go = time.monotonic()
        with _proc.RssSampler(server.worker_pids) as sampler:
            client.say("go")
            profiling = profile(server.worker_pids) if profile else contextlib.nullcontext()
            with profiling as profile_result:
                client.expect("streamed", script.upstream_duration_s + 120)
        cpu_1 = server.cpu_s()
        main_1 = server.main_thread_cpu_s()
        t_end = time.monotonic()
        machine_1 = _proc.machine_jiffies()
        db_pids_after = db.backend_pids() if db is not None else []
        others_1 = _cpu_of([client.pid, target.upstream.pid, *db_pids, *db_pids_after])
        time.sleep(0.2)  # the log is written by other processes: let the last lines land
        log_end = db.log.offset() if db is not None and db.log is not None else None
        upstream = target.upstream.stats()
        client.say("verify")
        result = client.expect("result", 120)
        client.wait()
        exit_code, server_problems = server.close()

    streams = result["streams"]
    window_s = t_end - t_go
    tokens = sum(s["tokens"] for s in streams)
    (target.scratch / f"streams-{label}.json").write_bytes(orjson.dumps(streams))
    user = [b[0] - a[0] for a, b in zip(cpu_0, cpu_1, strict=True)]
    system = [b[1] - a[1] for a, b in zip(cpu_0, cpu_1, strict=True)]
    server_cpu = [u + s for u, s in zip(user, system, strict=True)]
    errors = Counter(error.split(":")[0] for s in streams for error in s["errors"])
    busy = (machine_1[0] - machine_0[0]) / max(1, machine_1[1] - machine_0[1])

    def other_cpu(pids: list[int]) -> float:
        return sum(others_1.get(pid, 0.0) - others_0.get(pid, 0.0) for pid in set(pids))

    phase: dict[str, Any] = {
        "label": label,
        "server": target.server,
        "pattern": pattern,
        "workers": target.workers,
        "mode": mode,
        "concurrency": concurrency,
        "script": asdict(script),
        "disconnect_after": disconnect_after,
        "ramp_up_s": target.ramp_up_s,
        "window_s": window_s,
        "streams": len(streams),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "error_examples": sorted({e for s in streams for e in s["errors"]})[:5],
        # What the server said went wrong, e.g. at its shutdown; not counted in "errors".
        "server_exit_code": exit_code,
        "server_log_errors": len(server_problems),
        "server_log_examples": _first_problems(server_problems),
        "tokens_relayed": tokens,
        "tokens_per_s": tokens / window_s if window_s else 0.0,
        "delta_events": sum(s["deltas"] for s in streams),
        "server_cpu_s": sum(server_cpu),
        "server_cpu_s_per_worker": server_cpu,
        "server_cpu_us_per_token": sum(server_cpu) / tokens * 1e6 if tokens else None,
        "server_cpu_user_s": sum(user),
        "server_cpu_system_s": sum(system),
        "server_user_cpu_us_per_token": sum(user) / tokens * 1e6 if tokens else None,
        # The trio thread of each worker, and the rest (the store's asyncio thread, mostly).
        "server_cpu_main_thread_s": main_1 - main_0,
        "server_cpu_other_threads_s": sum(server_cpu) - (main_1 - main_0),
        "server_env": dict(target.env),
        "warm_up_rounds": warm_up_rounds,
        "machine_busy_pct": 100 * busy,
        "machine_cores": os.cpu_count(),
        "client_cpu_s": other_cpu([client.pid]),
        "upstream_cpu_s": other_cpu([target.upstream.pid]),
        "postgres_backends_cpu_s": other_cpu(db_pids + db_pids_after) if db else None,
        "upstream": upstream,
        "phase_s": time.monotonic() - started,
    }
    known = (
        phase["server_cpu_s"]
        + phase["client_cpu_s"]
        + phase["upstream_cpu_s"]
        + (phase["postgres_backends_cpu_s"] or 0.0)
    )
    machine_busy_s = (machine_1[0] - machine_0[0]) / _proc.CLK_TCK
    # CPU that none of this run's processes used: other work on the machine, which competes
    # with the server for the two cores and makes the latencies worse than they are.
    phase["foreign_cpu_cores"] = max(0.0, machine_busy_s - known) / window_s if window_s else 0.0
    phase |= _latencies(streams, script, mode)
    phase["rss"] = _rss(sampler.samples, idle_rss, streams, concurrency, (t_go, t_end))
    if db is not None and db.log is not None and log_start is not None and log_end is not None:
        phase["db"] = summarize_statements(db.log.count(log_start, log_end), len(streams))
    if profile_result is not None:
        phase["profile"] = profile_result.summary(phase)
    return phase


def _first_problems(lines: list[str]) -> list[str]:
    """The first ERROR line and the innermost exception line after it, if any."""
    if not lines:
        return []
    innermost = [line.strip(" |") for line in lines if "Error" in line and "Traceback" not in line]
    return [lines[0], *innermost[-1:]]


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and max by the nearest-rank method (p99 of 50 values is the 50th)."""
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, -(-int(q * 100) * len(ordered) // 100) - 1)]

    return {"p50": rank(0.50), "p99": rank(0.99), "max": ordered[-1], "n": len(ordered)}


def _ms(values: list[float]) -> dict[str, float | None]:
    return percentiles([v * 1e3 for v in values])


def _latencies(streams: list[dict[str, Any]], script: Script, mode: str) -> dict[str, Any]:
    ok = [s for s in streams if not s["errors"]]
    figures: dict[str, Any] = {
        "ttfd_ms": _ms([s["t_first_delta"] - s["t_begin"] for s in ok if s["t_first_delta"]]),
    }
    if mode == "stream":
        figures["added_latency_ms"] = _ms(
            [s["t_end"] - s["t_begin"] - script.upstream_duration_s for s in ok]
        )
        figures["stream_duration_ms"] = _ms([s["t_end"] - s["t_begin"] for s in ok])
        # Added latency = first delta + lag that builds up over the stream + end of the turn.
        figures["last_delta_lag_ms"] = _ms(
            [
                s["t_last_delta"] - s["t_first_delta"] - script.upstream_duration_s
                for s in ok
                if s["t_last_delta"] and s["t_first_delta"]
            ]
        )
        figures["last_delta_to_done_ms"] = _ms(
            [s["t_end"] - s["t_last_delta"] for s in ok if s["t_last_delta"]]
        )
    if mode == "disconnect":
        committed = [s for s in ok if s["row_updated_wall"] is not None]
        # updated_at is stamped by the store just before its UPDATE, on the same clock as the
        # client's time.time(); the poll that saw the row is an upper bound (poll every 20 ms).
        figures["disconnect_to_commit_ms"] = _ms(
            [s["row_updated_wall"] - s["disconnect_wall"] for s in committed]
        )
        figures["disconnect_to_observed_ms"] = _ms(
            [
                s["t_observed"] - s["t_end"]  # t_end is the disconnect, on the monotonic clock
                for s in committed
            ]
        )
    return figures


def _rss(
    samples: list[tuple[float, int]],
    idle: int,
    streams: list[dict[str, Any]],
    concurrency: int,
    window: tuple[float, float],
) -> dict[str, Any]:
    """RSS while every stream was active: from the last first delta to the first end."""
    firsts = [s["t_first_delta"] for s in streams if s["t_first_delta"]]
    ends = [s["t_end"] for s in streams if s["t_end"]]
    lo, hi = (max(firsts), min(ends)) if firsts and ends else window
    plateau = [rss for t, rss in samples if lo <= t <= hi]
    basis = "all streams active"
    if not plateau:  # no instant when all were active: use the middle third of the window
        third = (window[1] - window[0]) / 3
        plateau = [rss for t, rss in samples if window[0] + third <= t <= window[1] - third]
        basis = "middle third of the window"
    if not plateau:
        plateau = [rss for _, rss in samples]
        basis = "the whole window"
    if not plateau:
        return {"basis": "no samples", "kb_per_stream": None}
    level = median(plateau)
    return {
        "basis": basis,
        "idle_mb": idle / 2**20,
        "plateau_mb": level / 2**20,
        "peak_mb": max(rss for _, rss in samples) / 2**20,
        "kb_per_stream": (level - idle) / 1024 / concurrency,
        "samples": len(plateau),
    }
