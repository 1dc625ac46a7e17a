"""``python -m bench``: measure chatsrv under concurrent streams, or smoke-test the benchmark.

chatsrv is measured against a reference, the naive relay on the same stack
(``bench._reference``: a raw ASGI app under the same hypercorn command, no Quart, no database),
in the same sitting, and its figures are given as ratios to the reference's (``bench._compare``).

The upstream patterns: ``--patterns`` (default: ``steady<R>`` for each of ``--rates``, 50,200,
and ``burst50``: 50 tokens/s on average in irregular groups of up to ``--burst``, 6, tokens per
write). ``steady<R>``, ``burst<R>`` and ``burst<R>x<N>`` can be listed in any number. Every
stream lasts as long as ``--tokens`` (200) tokens take at 50 tokens/s, whatever its pattern.

The full run (the default) does:

1. for each pattern, one worker, ``--repeat`` times (3): the reference, then chatsrv, each
   ``--concurrency`` streams (50); the repeat with the median CPU stands for the phase, and every
   ratio is of the medians over the repeats;
2. then for each worker count (``--workers 1,2``), at the ``--ramp-pattern`` (steady50):
   a. the standard phase, ``--repeat`` times (for one worker: step 1's, at that pattern);
   b. the disconnect phase (chatsrv only): as many streams, each closed by its client after
      ``--disconnect-after`` deltas (20); the time until each reply is committed;
   c. the ramp: ``--ramp`` levels (25, 50, 75, ...) until the first that fails (an error, or p99
      added latency above ``--knee-ms``, 300); the knee is the last level that passed. For one
      worker, the reference's ramp and chatsrv's are interleaved level by level;
   d. with ``--profile``, for one worker: py-spy on the worker during a longer standard phase.

Then it prints every phase, the ratio table (pattern by figure: reference, chatsrv, ratio) and
the targets' verdict, and writes ``NAME.json`` (the ratios in ``ratios``, the reference's phases
in ``reference``) and ``NAME.png`` into ``--out`` (bench/results). ``--no-reference`` measures
chatsrv alone (no ratios). The database is a fresh one on the local PostgreSQL server
(``--postgres``), dropped at the end; ``--sqlite`` uses a SQLite file instead.

``--smoke`` is the correctness check that CI runs: SQLite, a few streams of tens of tokens
through the three modes (complete, disconnect, upstream failure), and a few through the
reference; about 20 s; the exit status is 1 on any error, and ``smoke.json`` is written to
``--out`` (bench/out).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from bench import _compare, _profile, _report, _sitting
from bench._pg import DEFAULT_SERVER, fresh_database
from bench._proc import REPO, snapshot
from bench._run import Target, run_phase
from bench._script import Script


def _levels(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _rates(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="the quick correctness run (CI)")
    parser.add_argument("--workers", type=_levels, default=[1, 2], help="e.g. 1,2 (default)")
    parser.add_argument("--concurrency", type=int, default=50, help="standard phase (50)")
    parser.add_argument(
        "--tokens", type=int, default=200, help="per stream at 50 tokens/s, more at faster rates"
    )
    parser.add_argument(
        "--rates", type=_rates, default=[50.0, 200.0], help="steady patterns' tokens/s (50,200)"
    )
    parser.add_argument(
        "--patterns",
        help="e.g. steady50,steady200,burst50,burst200x3 (default: --rates' steady, burst50)",
    )
    parser.add_argument(
        "--burst", type=int, default=6, help="a burst pattern's tokens per write, at most (6)"
    )
    parser.add_argument(
        "--ramp-pattern", default="steady50", help="of the standard, disconnect and ramp phases"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="chatsrv alone: no naive relay, no ratios"
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
    args = parser.parse_args(argv)
    try:
        _compare.patterns(args.patterns, args.rates, args.burst)
        _compare.pattern(args.ramp_pattern, args.burst)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def full(args: argparse.Namespace) -> int:
    out: Path = args.out or REPO / "bench" / "results"
    args.out_dir = out = out.resolve()
    name: str = args.name or "bench"
    scratch = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    patterns = _compare.patterns(args.patterns, args.rates, args.burst)
    ramp_pattern = _compare.pattern(args.ramp_pattern, args.burst)
    script = ramp_pattern.script(args.tokens)  # the standard, disconnect and ramp phases'
    compared = not args.no_reference and 1 in args.workers
    if not args.no_reference and not compared:
        _sitting.say("no reference: its ratios are for one worker, and --workers has no 1")
    with contextlib.ExitStack() as stack:
        root = REPO
        if args.ref:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatsrv-ref-"))
            root = snapshot(args.ref, Path(tmp))
        upstream = stack.enter_context(_sitting.upstream())
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
            "machine": _sitting.machine(database, args.ref),
            "script": asdict(script),
            "ramp_pattern": ramp_pattern.name,
            "patterns": [p.describe(args.tokens) for p in patterns] if compared else [],
            "targets": _report.TARGETS,
            "chatsrv": _sitting.chatsrv_defaults(root),
            "configs": [],
        }
        _sitting.say(f"chatsrv bench: {run['machine']}, db {database.name if database else url}")
        if database is not None and database.log is None:
            _sitting.say("the PostgreSQL log is not readable: no statement counts")
        env = tuple((name, value) for name, _, value in (e.partition("=") for e in args.env))

        def target(workers: int, server: str = "chatsrv") -> Target:
            return Target(
                workers, url, upstream, scratch, database, args.ramp_up_s, env, root, server
            )

        failed = False

        def measure(side: Target, **phase_args: Any) -> dict[str, Any]:
            nonlocal failed
            phase = _sitting.measure(args, side, **phase_args)
            _sitting.say(_sitting.line(phase))
            failed |= _sitting.broken(phase)
            return phase

        reference: dict[str, Any] = {"workers": 1, "patterns": {}}
        ours: dict[str, Any] = {}  # chatsrv's phases of the patterns, one worker
        if compared:
            run["reference"] = reference
            # Interleaved, the reference first each time: drift in the machine's speed (this
            # VM's is large) affects both servers alike.
            for pattern in patterns:
                repeats: dict[str, list[dict[str, Any]]] = {"reference": [], "chatsrv": []}
                for _ in range(args.repeat):
                    for side in (target(1, "reference"), target(1)):
                        repeats[side.server].append(
                            measure(
                                side,
                                concurrency=args.concurrency,
                                script=pattern.script(args.tokens),
                                pattern=pattern.name,
                            )
                        )
                for server, into in (("reference", reference["patterns"]), ("chatsrv", ours)):
                    into[pattern.name] = {
                        "standard": _compare.standing(repeats[server]),
                        "repeats": [_compare.summary(p) for p in repeats[server]],
                    }
            _sitting.write(run, out, name)
        for workers in args.workers:
            config: dict[str, Any] = {"workers": workers}
            run["configs"].append(config)
            mine = target(workers)
            if workers == 1 and ramp_pattern.name in ours:
                config["patterns"] = ours
                config["standard"] = ours[ramp_pattern.name]["standard"]
                config["standard_repeats"] = ours[ramp_pattern.name]["repeats"]
            else:
                if workers == 1 and ours:
                    config["patterns"] = ours
                standards = [
                    measure(
                        mine,
                        concurrency=args.concurrency,
                        script=script,
                        pattern=ramp_pattern.name,
                    )
                    for _ in range(args.repeat)
                ]
                # The repeat with the median CPU per token stands for the standard phase; all
                # of them are summarized, because the machine's speed drifts between runs.
                config["standard"] = _compare.standing(standards)
                config["standard_repeats"] = [_compare.summary(p) for p in standards]
            if args.disconnect_after:
                config["disconnect"] = measure(
                    mine,
                    concurrency=args.concurrency,
                    script=script,
                    mode="disconnect",
                    disconnect_after=args.disconnect_after,
                    pattern=ramp_pattern.name,
                )
            if args.ramp:
                sides = {"chatsrv": (mine, config["standard"])}
                if compared and workers == 1:
                    ref_standard = reference["patterns"].get(ramp_pattern.name, {})
                    sides = {
                        "reference": (target(1, "reference"), ref_standard.get("standard")),
                        **sides,
                    }
                ramps = _ramp(args, sides, script, ramp_pattern.name, measure)
                for server, ramp in ramps.items():
                    into = config if server == "chatsrv" else reference
                    into["ramp"] = ramp
                    into["knee"] = _report.knee(ramp, args.knee_ms)
                    # Every level passed: the knee is at least the last level, maybe more.
                    into["knee_censored"] = _report.passes(ramp[-1], args.knee_ms)
                    into["rss_marginal_kb_per_stream"] = _report.marginal_rss_kb(ramp, args.knee_ms)
                    _sitting.say(
                        f"{server}, {workers} worker(s): knee {into['knee']} streams"
                        + (" (every level passed)" if into["knee_censored"] else "")
                        + f", marginal RSS {_report._f(into['rss_marginal_kb_per_stream'])}"
                        " KB/stream"
                    )
            if args.profile and workers == args.workers[0]:
                config["profile"] = _profile_phase(mine, args, script, scratch, name)
            _sitting.write(run, out, name)
        if compared:
            one = run["configs"][args.workers.index(1)]
            knees = None
            if "ramp" in reference and "ramp" in one:
                knees = (
                    reference["knee"],
                    one["knee"],
                    reference["knee_censored"],
                    one["knee_censored"],
                )
            run["ratios"] = _compare.ratios(reference["patterns"], ours, knees, ramp_pattern.name)
        run["verdict"] = _report.verdict(run)
        run["scaling"] = _report.scaling(run)
        path = _sitting.write(run, out, name)
        plotted = _report.plot(run, out / f"{name}.png")
    _sitting.say(_report.table(run))
    if "ratios" in run:
        _sitting.say(
            "\nchatsrv against the naive relay, one worker, same sitting (ratio = chatsrv / relay):"
        )
        _sitting.say(_compare.table(run["ratios"]))
        _sitting.say("")
    for row in run["verdict"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[row["met"]]
        value = row["measured"]
        value = f"{value:.2f}" if isinstance(value, float) else value
        spread = row.get("range")
        shown = f"{value} (repeats: {spread[0]:.2f} to {spread[1]:.2f})" if spread else value
        note = f" ({row['note']})" if row.get("note") else ""
        _sitting.say(f"{row['target']}: wanted {row['wanted']}, measured {shown}: {met}{note}")
    for row in run["scaling"]:
        _sitting.say(f"scaling: {row}")
    _sitting.say(
        f"wrote {path}" + (f" and {out / (name + '.png')}" if plotted else " (no matplotlib)")
    )
    return 1 if failed else 0


def _ramp(
    args: argparse.Namespace,
    sides: dict[str, tuple[Target, dict[str, Any] | None]],
    script: Script,
    pattern: str,
    measure: Callable[..., dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """Each side's ramp, level by level, the sides in turn at each level (interleaved, as the
    patterns are); a side stops after its first level that fails, the ramp when all have. A
    side's standard phase stands for its level at ``--concurrency``."""
    ramps: dict[str, list[dict[str, Any]]] = {server: [] for server in sides}
    going = set(sides)
    for level in args.ramp:
        for server, (side, standard) in sides.items():
            if server not in going:
                continue
            if standard is not None and level == args.concurrency:
                phase = standard
            else:
                phase = measure(side, concurrency=level, script=script, pattern=pattern)
            ramps[server].append(phase)
            if not _report.passes(phase, args.knee_ms):
                going.discard(server)
        if not going:
            break
    return ramps


def _profile_phase(
    target: Target, args: argparse.Namespace, script: Script, scratch: Path, name: str
) -> dict[str, Any]:
    # Streams long enough that the whole recording falls inside the plateau.
    long = replace(script, tokens=int((args.profile_s + args.ramp_up_s + 4) / script.interval_s))
    raw = scratch / f"{name}-profile-{target.workers}w-{args.concurrency}.txt"
    _sitting.wait_quiet(args.max_foreign, args.wait_quiet_s)
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
    _sitting.say(_sitting.line(phase) + " (under py-spy)")
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
    with (
        _sitting.upstream() as upstream,
        tempfile.TemporaryDirectory(prefix="chatsrv-smoke-") as tmp,
    ):
        target = Target(1, f"sqlite:///{tmp}/smoke.db", upstream, Path(tmp), None, 0.2)
        stream = run_phase(target, concurrency=4, script=script)
        disconnect = run_phase(
            target, concurrency=4, script=script, mode="disconnect", disconnect_after=5
        )
        fail = run_phase(target, concurrency=3, script=replace(script, fail_after=10), mode="fail")
        # The naive relay, so that a broken reference cannot land: in bursts of up to 3, which
        # puts one token and several in one upstream read.
        naive = replace(script, burst=3)
        reference = run_phase(replace(target, server="reference"), concurrency=4, script=naive)
        logs = {
            path.name: path.read_text(errors="replace")[-2000:] for path in Path(tmp).glob("*.log")
        }
    phases = {"stream": stream, "disconnect": disconnect, "fail": fail}
    for label, phase in [*phases.items(), ("reference", reference)]:
        _sitting.say(_sitting.line(phase))
        if phase["errors"]:
            checks.append(f"{label}: {phase['error_kinds']} {phase['error_examples']}")
        if phase["server_log_errors"] or phase["server_exit_code"]:
            checks.append(
                f"{label}: the server exited with {phase['server_exit_code']} and logged "
                f"{phase['server_log_examples']}"
            )
    for label, phase in (("stream", stream), ("reference", reference)):
        if phase["tokens_relayed"] != 4 * script.tokens:
            checks.append(
                f"{label}: {phase['tokens_relayed']} tokens relayed, not {4 * script.tokens}"
            )
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
        "machine": _sitting.machine(None),
        "phases": phases,
        "reference": reference,  # the naive relay (bench._reference), stream mode
    }
    if checks:
        result["server_logs"] = logs
    path = _sitting.write(result, out, args.name or "smoke")
    for problem in checks:
        _sitting.say(f"SMOKE FAILED: {problem}")
    _sitting.say(f"smoke {'ok' if not checks else 'FAILED'}; wrote {path}")
    return 1 if checks else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    return smoke(args) if args.smoke else full(args)
