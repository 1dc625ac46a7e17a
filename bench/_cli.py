"""``python -m bench``: measure chatsrv under concurrent streams, or smoke-test the benchmark.

The full run (the default) does, for each worker count (``--workers 1,2``):

1. the standard phase: ``--concurrency`` streams (50) of ``--tokens`` (200) at ``--rate`` (50/s);
2. the disconnect phase: as many streams, each closed by its client after
   ``--disconnect-after`` deltas (20); the time until each reply is committed;
3. the ramp: ``--ramp`` levels (25, 50, 100, ...) until the first that fails (an error, or p99
   added latency above ``--knee-ms``, 300); the knee is the last level that passed;
4. with ``--profile``, for one worker: py-spy on the worker during a longer standard phase.

Then it writes ``NAME.json`` and ``NAME.png`` into ``--out`` (bench/results). The database is a
fresh one on the local PostgreSQL server (``--postgres``), dropped at the end; ``--sqlite`` uses
a SQLite file instead.

``--smoke`` is the correctness check that CI runs: SQLite, a few streams of tens of tokens
through the three modes (complete, disconnect, upstream failure); about 20 s; the exit status is
1 on any error, and ``smoke.json`` is written to ``--out`` (bench/out).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import trio

from bench import _profile, _report
from bench._pg import DEFAULT_SERVER, Database, fresh_database
from bench._proc import REPO, Upstream, machine_jiffies, snapshot
from bench._run import Target, run_phase
from bench._script import Script


def _levels(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="the quick correctness run (CI)")
    parser.add_argument("--workers", type=_levels, default=[1, 2], help="e.g. 1,2 (default)")
    parser.add_argument("--concurrency", type=int, default=50, help="standard phase (50)")
    parser.add_argument("--tokens", type=int, default=200, help="per stream (200)")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream (50)")
    parser.add_argument(
        "--burst",
        type=int,
        default=1,
        help="upstream tokens per write, at most (1: one at a time; more: irregular bursts)",
    )
    parser.add_argument(
        "--ramp", type=_levels, default=[25, 50, 75, 100, 125, 150, 200, 300, 400], help="levels"
    )
    parser.add_argument("--no-ramp", dest="ramp", action="store_const", const=[])
    parser.add_argument("--knee-ms", type=float, default=300.0, help="p99 added latency limit")
    parser.add_argument("--disconnect-after", type=int, default=20, help="deltas; 0: no phase")
    parser.add_argument("--repeat", type=int, default=3, help="standard phase runs (median)")
    parser.add_argument("--ramp-up-s", type=float, default=1.0, help="stream starts spread")
    parser.add_argument("--postgres", default=DEFAULT_SERVER, help="server to create a db in")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead")
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="cores of other work tolerated during a window before it is measured again",
    )
    parser.add_argument("--retries", type=int, default=2, help="re-measurements per phase")
    parser.add_argument(
        "--wait-quiet-s", type=float, default=30.0, help="longest wait for a quiet machine"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy, one worker")
    parser.add_argument("--profile-s", type=float, default=10.0)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="add to the server's environment, e.g. CHATSRV_DB_POOL_SIZE=20 (experiments)",
    )
    parser.add_argument(
        "--ref",
        help="measure the chatsrv of this commit (git archive) instead of the working tree",
    )
    parser.add_argument("--out", type=Path, help="bench/results (bench/out for --smoke)")
    parser.add_argument("--name", help="output file stem (bench, or smoke)")
    return parser.parse_args(argv)


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


def _line(phase: dict[str, Any]) -> str:
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


def _wait_quiet(max_cores: float, timeout_s: float) -> float:
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
        _say(f"the machine is busy with other work ({cores:.2f} cores); waiting")


def _measure(args: argparse.Namespace, target: Target, **phase_args: Any) -> dict[str, Any]:
    """A phase; run again, at most ``--retries`` times, while other work on the machine took
    more than ``--max-foreign`` of a core during it. The quietest attempt is kept. Before each
    attempt, wait at most ``--wait-quiet-s`` for the machine to be quiet."""
    attempts = []
    for _ in range(1 + args.retries):
        _wait_quiet(args.max_foreign, args.wait_quiet_s)
        phase = run_phase(target, **phase_args)
        attempts.append(phase)
        if phase["foreign_cpu_cores"] <= args.max_foreign:
            break
        _say(
            f"{phase['label']}: other work used {phase['foreign_cpu_cores']:.2f} of a core "
            "during the window; measuring again"
        )
    best = min(attempts, key=lambda p: p["foreign_cpu_cores"])
    best["attempts"] = len(attempts)
    return best


def _summary(phase: dict[str, Any]) -> dict[str, Any]:
    return {
        "server_cpu_us_per_token": phase.get("server_cpu_us_per_token"),
        "added_latency_ms_p50": (phase.get("added_latency_ms") or {}).get("p50"),
        "added_latency_ms_p99": (phase.get("added_latency_ms") or {}).get("p99"),
        "ttfd_ms_p99": (phase.get("ttfd_ms") or {}).get("p99"),
        "rss_kb_per_stream": (phase.get("rss") or {}).get("kb_per_stream"),
        "foreign_cpu_cores": phase.get("foreign_cpu_cores"),
        "errors": phase["errors"],
    }


def _broken(phase: dict[str, Any]) -> bool:
    return bool(phase["errors"] or phase["server_log_errors"] or phase["server_exit_code"])


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _upstream() -> Iterator[Upstream]:
    upstream = Upstream()
    try:
        yield upstream
    finally:
        upstream.close()


def _write(run: dict[str, Any], out: Path, name: str) -> Path:
    path = out / f"{name}.json"
    path.write_bytes(orjson.dumps(run, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return path


def full(args: argparse.Namespace) -> int:
    out: Path = args.out or REPO / "bench" / "results"
    args.out_dir = out = out.resolve()
    name: str = args.name or "bench"
    scratch = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    script = Script(tokens=args.tokens, interval_s=1.0 / args.rate, burst=args.burst)
    with contextlib.ExitStack() as stack:
        root = REPO
        if args.ref:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatsrv-ref-"))
            root = snapshot(args.ref, Path(tmp))
        upstream = stack.enter_context(_upstream())
        if args.sqlite:
            database = None
            sqlite = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatsrv-bench-"))
            url = f"sqlite:///{sqlite}/bench.db"
        else:
            database = stack.enter_context(fresh_database(args.postgres))
            url = database.url
        run: dict[str, Any] = {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "machine": machine(database, args.ref),
            "script": asdict(script),
            "targets": _report.TARGETS,
            "chatsrv": chatsrv_defaults(root),
            "configs": [],
        }
        _say(f"chatsrv bench: {run['machine']}, db {database.name if database else url}")
        if database is not None and database.log is None:
            _say("the PostgreSQL log is not readable: no statement counts")
        failed = False
        for workers in args.workers:
            env = tuple((name, value) for name, _, value in (e.partition("=") for e in args.env))
            target = Target(workers, url, upstream, scratch, database, args.ramp_up_s, env, root)
            config: dict[str, Any] = {"workers": workers}
            run["configs"].append(config)
            repeats = []
            for _ in range(args.repeat):
                repeats.append(_measure(args, target, concurrency=args.concurrency, script=script))
                _say(_line(repeats[-1]))
                failed |= _broken(repeats[-1])
            # The repeat with the median CPU per token stands for the standard phase; all of
            # them are summarized, because the machine's speed drifts between runs.
            ordered = sorted(repeats, key=lambda p: p.get("server_cpu_us_per_token") or 0.0)
            standard = ordered[len(ordered) // 2]
            config["standard"] = standard
            config["standard_repeats"] = [_summary(p) for p in repeats]
            if args.disconnect_after:
                config["disconnect"] = _measure(
                    args,
                    target,
                    concurrency=args.concurrency,
                    script=script,
                    mode="disconnect",
                    disconnect_after=args.disconnect_after,
                )
                _say(_line(config["disconnect"]))
                failed |= _broken(config["disconnect"])
            if args.ramp:
                config["ramp"] = []
                for level in args.ramp:
                    phase = (
                        standard
                        if level == args.concurrency
                        else _measure(args, target, concurrency=level, script=script)
                    )
                    config["ramp"].append(phase)
                    if phase is not standard:
                        _say(_line(phase))
                    if not _report.passes(phase, args.knee_ms):
                        break
                config["knee"] = _report.knee(config["ramp"], args.knee_ms)
                config["rss_marginal_kb_per_stream"] = _report.marginal_rss_kb(
                    config["ramp"], args.knee_ms
                )
                _say(
                    f"{workers} worker(s): knee {config['knee']} streams, marginal RSS "
                    f"{_report._f(config['rss_marginal_kb_per_stream'])} KB/stream"
                )
            if args.profile and workers == args.workers[0]:
                config["profile"] = _profile_phase(target, args, script, scratch, name)
            _write(run, out, name)
        run["verdict"] = _report.verdict(run)
        run["scaling"] = _report.scaling(run)
        path = _write(run, out, name)
        plotted = _report.plot(run, out / f"{name}.png")
    _say(_report.table(run))
    for row in run["verdict"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[row["met"]]
        value = row["measured"]
        value = f"{value:.1f}" if isinstance(value, float) else value
        spread = row.get("range")
        shown = f"{value} (median; {spread[0]:.1f} to {spread[1]:.1f})" if spread else value
        _say(f"{row['target']}: wanted {row['wanted']}, measured {shown}: {met}")
    for row in run["scaling"]:
        _say(f"scaling: {row}")
    _say(f"wrote {path}" + (f" and {out / (name + '.png')}" if plotted else " (no matplotlib)"))
    return 1 if failed else 0


def _profile_phase(
    target: Target, args: argparse.Namespace, script: Script, scratch: Path, name: str
) -> dict[str, Any]:
    # Streams long enough that the whole recording falls inside the plateau.
    long = replace(script, tokens=int((args.profile_s + args.ramp_up_s + 4) / script.interval_s))
    raw = scratch / f"{name}-profile-{target.workers}w-{args.concurrency}.txt"
    _wait_quiet(args.max_foreign, args.wait_quiet_s)
    recorder = partial(
        _profile.recording, raw=raw, delay_s=args.ramp_up_s + 1.5, duration_s=args.profile_s
    )
    phase = run_phase(
        target,
        concurrency=args.concurrency,
        script=long,
        mode="stream",
        profile=lambda pids: recorder(pids[0]),
    )
    _say(_line(phase) + " (under py-spy)")
    if raw.exists():  # collapsed stacks: open in https://www.speedscope.app or flamegraph.pl
        packed = args.out_dir / f"{name}-profile-{target.workers}w-{args.concurrency}.txt.gz"
        packed.write_bytes(gzip.compress(raw.read_bytes(), mtime=0))
        shown = packed.relative_to(REPO) if packed.is_relative_to(REPO) else packed
        phase["profile"]["collapsed_stacks"] = str(shown)
    return phase


def smoke(args: argparse.Namespace) -> int:
    """A few streams through each mode on SQLite; exit 1 on any error."""
    out: Path = args.out or REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    script = Script(tokens=30, interval_s=0.01)
    checks: list[str] = []
    with _upstream() as upstream, tempfile.TemporaryDirectory(prefix="chatsrv-smoke-") as tmp:
        target = Target(1, f"sqlite:///{tmp}/smoke.db", upstream, Path(tmp), None, 0.2)
        stream = run_phase(target, concurrency=4, script=script)
        disconnect = run_phase(
            target, concurrency=4, script=script, mode="disconnect", disconnect_after=5
        )
        fail = run_phase(target, concurrency=3, script=replace(script, fail_after=10), mode="fail")
        logs = {
            path.name: path.read_text(errors="replace")[-2000:] for path in Path(tmp).glob("*.log")
        }
    phases = {"stream": stream, "disconnect": disconnect, "fail": fail}
    for label, phase in phases.items():
        _say(_line(phase))
        if phase["errors"]:
            checks.append(f"{label}: {phase['error_kinds']} {phase['error_examples']}")
        if phase["server_log_errors"] or phase["server_exit_code"]:
            checks.append(
                f"{label}: the server exited with {phase['server_exit_code']} and logged "
                f"{phase['server_log_examples']}"
            )
    if stream["tokens_relayed"] != 4 * script.tokens:
        checks.append(f"stream: {stream['tokens_relayed']} tokens relayed, not {4 * script.tokens}")
    if (disconnect.get("disconnect_to_commit_ms") or {}).get("n") != 4:
        checks.append("disconnect: not every interrupted reply was read back committed")
    if disconnect["upstream"]["disconnects"] != 4:
        checks.append(f"disconnect: the upstream saw {disconnect['upstream']['disconnects']} "
                      "cancelled streams, not 4")  # fmt: skip
    if fail["upstream"]["failed_on_purpose"] != 3:
        checks.append("fail: the upstream did not fail every stream")
    result = {
        "mode": "smoke",
        "ok": not checks,
        "problems": checks,
        "machine": machine(None),
        "phases": phases,
    }
    if checks:
        result["server_logs"] = logs
    path = _write(result, out, args.name or "smoke")
    for problem in checks:
        _say(f"SMOKE FAILED: {problem}")
    _say(f"smoke {'ok' if not checks else 'FAILED'}; wrote {path}")
    return 1 if checks else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    return smoke(args) if args.smoke else full(args)
