"""What a sitting of the benchmark knows and does around its phases: the machine (its
description and its speed now), chatsrv's settings under test, the noise guard (wait for a quiet
machine; measure a phase again while other work disturbed it), a phase's progress line, and the
JSON file of a run."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import trio

from bench import _report
from bench._pg import Database
from bench._proc import REPO, Upstream, machine_jiffies
from bench._run import Target, run_phase


def speed_us() -> float:
    """How fast this machine is right now: µs per step of a fixed Trio workload (a checkpoint,
    an orjson round trip of a chunk), the best of 20 runs. The VM's speed drifts by 2x between
    days; figures from different runs compare only in proportion to this."""
    chunk = {"choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}]}
    steps = 5_000

    async def workload() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            await trio.lowlevel.checkpoint()
            orjson.loads(orjson.dumps(chunk))
        return (time.perf_counter() - start) / steps * 1e6

    return round(min(trio.run(workload) for _ in range(20)), 2)


def machine(database: Database | None, ref: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "speed_us": speed_us(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hypercorn": importlib.metadata.version("hypercorn"),
        "trio": importlib.metadata.version("trio"),
    }
    with contextlib.suppress(OSError):
        info["debian"] = Path("/etc/debian_version").read_text().strip()
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["chatsrv_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", ref or "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "chatsrv"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        info["chatsrv_modified"] = False if ref else bool(changed.strip())
        info["chatsrv_source"] = f"git archive {ref}" if ref else "working tree"
    if database is not None:
        from bench._pg import _run

        info["database"] = _run(database.server, "SHOW server_version")[0][0][0]
        info["database"] = "PostgreSQL " + info["database"].split()[0]
    else:
        info["database"] = "SQLite"
    return info


def chatsrv_defaults(root: Path) -> dict[str, Any]:
    """The chatsrv settings that the figures depend on, as the server under test has them (the
    benchmark clears every CHATSRV_ variable but those it sets, so these are the defaults)."""
    code = (
        "import json; from chatsrv._settings import Settings as S; f = S.model_fields; "
        "n = ('checkpoint_interval_s', 'db_pool_size', 'heartbeat_s', 'lease_s', 'log_level'); "
        "print(json.dumps({k: f[k].default for k in n if k in f}, default=str))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result


def line(phase: dict[str, Any]) -> str:
    add = phase.get("added_latency_ms") or {}
    commit = phase.get("disconnect_to_commit_ms") or {}
    parts = [
        f"{phase['label']}: {phase['errors']} errors",
        f"{phase['tokens_relayed']} tokens",
        f"CPU {_report._f(phase.get('server_cpu_us_per_token'))} µs/token",
        f"busy {phase['machine_busy_pct']:.0f}% (other work {phase['foreign_cpu_cores']:.2f} core)",
    ]
    if add:
        parts.append(f"added p50/p99 {_report._f(add['p50'])}/{_report._f(add['p99'])} ms")
    if commit:
        parts.append(f"disc→commit p50/p99 {_report._f(commit['p50'])}/{_report._f(commit['p99'])}")
    parts.append(f"RSS {_report._f((phase.get('rss') or {}).get('kb_per_stream'))} KB/stream")
    if phase["errors"]:
        parts.append(f"ERRORS {phase['error_kinds']} {phase['error_examples']}")
    if phase["server_log_errors"] or phase["server_exit_code"]:
        parts.append(
            f"SERVER: exit {phase['server_exit_code']}, log {phase['server_log_examples']}"
        )
    return ", ".join(parts)


def wait_quiet(max_cores: float, timeout_s: float) -> float:
    """Wait, at most ``timeout_s``, until the machine is busier than ``max_cores`` for no
    1-second sample (nothing of ours runs between phases); the last sample, in cores."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy_0, total_0 = machine_jiffies()
        time.sleep(1.0)
        busy_1, total_1 = machine_jiffies()
        cores = (os.cpu_count() or 1) * (busy_1 - busy_0) / max(1, total_1 - total_0)
        if cores <= max_cores or time.monotonic() >= deadline:
            return cores
        say(f"the machine is busy with other work ({cores:.2f} cores); waiting")


def measure(args: argparse.Namespace, target: Target, **phase_args: Any) -> dict[str, Any]:
    """A phase; run again, at most ``--retries`` times, while other work on the machine took
    more than ``--max-foreign`` of a core during it. The quietest attempt is kept. Before each
    attempt, wait at most ``--wait-quiet-s`` for the machine to be quiet."""
    attempts = []
    for _ in range(1 + args.retries):
        wait_quiet(args.max_foreign, args.wait_quiet_s)
        phase = run_phase(target, **phase_args)
        attempts.append(phase)
        if phase["foreign_cpu_cores"] <= args.max_foreign:
            break
        again = "measuring again" if len(attempts) <= args.retries else "no retries left"
        say(
            f"{phase['label']}: other work used {phase['foreign_cpu_cores']:.2f} of a core "
            f"during the window; {again}"
        )
    best = min(attempts, key=lambda p: p["foreign_cpu_cores"])
    best["attempts"] = len(attempts)
    return best


def broken(phase: dict[str, Any]) -> bool:
    return bool(phase["errors"] or phase["server_log_errors"] or phase["server_exit_code"])


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def upstream() -> Iterator[Upstream]:
    upstream = Upstream()
    try:
        yield upstream
    finally:
        upstream.close()


def write(run: dict[str, Any], out: Path, name: str) -> Path:
    path = out / f"{name}.json"
    path.write_bytes(orjson.dumps(run, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return path
