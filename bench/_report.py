"""The benchmark's outputs besides the JSON: a PNG plot (matplotlib, Agg backend), a text table,
and the verdict against the targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The targets: one worker, 2 cores, PostgreSQL, streams of 200 tokens at 50 tokens/s.
TARGETS = {
    "cpu_us_per_token_at_50": 180.0,
    "p99_added_latency_ms_at_50": 50.0,
    "knee_streams": 150,
    "rss_kb_per_stream": 30.0,
    "disconnect_to_commit_p99_ms": 100.0,
}


def knee(ramp: list[dict[str, Any]], limit_ms: float) -> int | None:
    """The largest concurrency that passed: no error, p99 added latency ≤ ``limit_ms``."""
    best = None
    for phase in sorted(ramp, key=lambda p: p["concurrency"]):
        if not passes(phase, limit_ms):
            break
        best = phase["concurrency"]
    return best


def passes(phase: dict[str, Any], limit_ms: float) -> bool:
    p99 = (phase.get("added_latency_ms") or {}).get("p99")
    return phase["errors"] == 0 and p99 is not None and p99 <= limit_ms


def marginal_rss_kb(ramp: list[dict[str, Any]], limit_ms: float) -> float | None:
    """The slope of (plateau - idle) RSS against concurrency over the ramp's passing levels, by
    least squares: the memory one more stream costs, without what grows once (pool connections,
    caches) and is charged to every stream by the single-level figure."""
    points = [
        (p["concurrency"], (p["rss"]["plateau_mb"] - p["rss"]["idle_mb"]) * 1024)
        for p in ramp
        if passes(p, limit_ms) and "plateau_mb" in p.get("rss", {})
    ]
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def scaling(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per worker count: the knee, the tokens/s relayed there, and the standard phase's CPU."""
    rows = []
    for config in run["configs"]:
        at_knee = next(
            (p for p in config.get("ramp", []) if p["concurrency"] == config.get("knee")), None
        )
        standard = config.get("standard") or {}
        rows.append(
            {
                "workers": config["workers"],
                "knee_streams": config.get("knee"),
                "tokens_per_s_at_knee": at_knee["tokens_per_s"] if at_knee else None,
                "machine_busy_pct_at_knee": at_knee["machine_busy_pct"] if at_knee else None,
                "cpu_us_per_token_standard": standard.get("server_cpu_us_per_token"),
                "added_p99_ms_standard": (standard.get("added_latency_ms") or {}).get("p99"),
            }
        )
    return rows


def verdict(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target against the one-worker figures."""
    config = next((c for c in run["configs"] if c["workers"] == 1), None)
    if config is None:
        return []
    standard = config.get("standard") or {}
    disconnect = config.get("disconnect") or {}
    rows = []

    def row(name: str, target: str, value: Any, met: bool | None) -> None:
        rows.append({"target": name, "wanted": target, "measured": value, "met": met})

    repeats = config.get("standard_repeats") or []

    def spread(key: str) -> None:
        values = sorted(r[key] for r in repeats if r.get(key) is not None)
        if len(values) > 1:
            rows[-1]["measured"] = values[len(values) // 2]
            rows[-1]["range"] = [values[0], values[-1]]

    cpu = standard.get("server_cpu_us_per_token")
    row(
        f"server CPU per relayed token at {standard.get('concurrency')} streams",
        "≤ 180 µs",
        cpu,
        None if cpu is None else cpu <= TARGETS["cpu_us_per_token_at_50"],
    )
    spread("server_cpu_us_per_token")
    if rows[-1]["measured"] is not None:
        rows[-1]["met"] = rows[-1]["measured"] <= TARGETS["cpu_us_per_token_at_50"]
    p99 = (standard.get("added_latency_ms") or {}).get("p99")
    row(
        f"p99 added latency at {standard.get('concurrency')} streams",
        "≤ 50 ms",
        p99,
        None if p99 is None else p99 <= TARGETS["p99_added_latency_ms_at_50"],
    )
    spread("added_latency_ms_p99")
    if rows[-1]["measured"] is not None:
        rows[-1]["met"] = rows[-1]["measured"] <= TARGETS["p99_added_latency_ms_at_50"]
    k = config.get("knee")
    row(
        "knee (p99 added latency ≤ 300 ms)",
        "≥ 150 streams",
        k,
        None if not config.get("ramp") else (k or 0) >= TARGETS["knee_streams"],
    )
    rss = (standard.get("rss") or {}).get("kb_per_stream")
    row(
        "server RSS per active stream",
        "≤ 30 KB",
        rss,
        None if rss is None else rss <= TARGETS["rss_kb_per_stream"],
    )
    spread("rss_kb_per_stream")
    if rows[-1]["measured"] is not None:
        rows[-1]["met"] = rows[-1]["measured"] <= TARGETS["rss_kb_per_stream"]
    commit = (disconnect.get("disconnect_to_commit_ms") or {}).get("p99")
    row(
        "disconnect → committed row, p99",
        "≤ 100 ms",
        commit,
        None if commit is None else commit <= TARGETS["disconnect_to_commit_p99_ms"],
    )
    db = standard.get("db")
    interval = run.get("chatsrv", {}).get("checkpoint_interval_s")
    if db is not None:
        # Checkpoints are UPDATEs every interval; the 2 are the turn's first write and its last.
        turn_s = run["script"]["interval_s"] * max(0, run["script"]["tokens"] - 1)
        allowed = 2 + (turn_s / interval if interval else 0.0)
        measured = db["data_statements_per_turn"]
        row(
            "database statements per turn (SELECT/INSERT/UPDATE; "
            f"{db['statements_per_turn']:.1f} with BEGIN/COMMIT/ROLLBACK)",
            f"≤ 2 + {turn_s:.2f} s / {interval} s = {allowed:.1f}",
            measured,
            measured <= allowed,
        )
    return rows


def table(run: dict[str, Any]) -> str:
    """A plain-text table of every phase."""
    header = (
        f"{'phase':<20} {'err':>4} {'tok/s':>7} {'cpu µs/tok':>10} {'busy%':>6} "
        f"{'add p50':>8} {'add p99':>8} {'ttfd p50':>8} {'ttfd p99':>8} {'KB/str':>7} "
        f"{'disc→commit p50/p99':>20} {'stmts/turn':>10} {'other':>5}"
    )
    lines = [header]
    for config in run["configs"]:
        for phase in _phases(config):
            add = phase.get("added_latency_ms") or {}
            ttfd = phase.get("ttfd_ms") or {}
            commit = phase.get("disconnect_to_commit_ms") or {}
            db = phase.get("db") or {}
            lines.append(
                f"{phase['label']:<20} {phase['errors']:>4} {phase['tokens_per_s']:>7.0f} "
                f"{_f(phase.get('server_cpu_us_per_token')):>10} "
                f"{phase['machine_busy_pct']:>6.0f} "
                f"{_f(add.get('p50')):>8} {_f(add.get('p99')):>8} "
                f"{_f(ttfd.get('p50')):>8} {_f(ttfd.get('p99')):>8} "
                f"{_f((phase.get('rss') or {}).get('kb_per_stream')):>7} "
                f"{_f(commit.get('p50')) + ' / ' + _f(commit.get('p99')):>20} "
                f"{_f(db.get('statements_per_turn')):>10} "
                f"{phase.get('foreign_cpu_cores', 0.0):>5.2f}"
            )
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _phases(config: dict[str, Any]) -> list[dict[str, Any]]:
    phases = [config[name] for name in ("standard", "disconnect", "fail") if config.get(name)]
    standard = config.get("standard")
    phases += [p for p in config.get("ramp", []) if p is not standard]
    return phases


def plot(run: dict[str, Any], path: Path) -> bool:
    """Latency, CPU per token and RSS per stream against concurrency, one line per worker
    count. False when matplotlib is missing (the smoke run does not need it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (lat, cpu, mem) = plt.subplots(1, 3, figsize=(15, 4.6))
    for config in run["configs"]:
        points = sorted(
            {
                p["concurrency"]: p for p in [*config.get("ramp", []), config.get("standard")] if p
            }.values(),
            key=lambda p: p["concurrency"],
        )
        if not points:
            continue
        w = config["workers"]
        xs = [p["concurrency"] for p in points]
        style = "-" if w == 1 else "--"

        def ys(key: str, q: str, pts: list[dict[str, Any]] = points) -> list[float]:
            return [(p.get(key) or {}).get(q) or float("nan") for p in pts]

        lat.plot(xs, ys("added_latency_ms", "p99"), "o" + style, label=f"{w}w added p99")
        lat.plot(xs, ys("added_latency_ms", "p50"), "s" + style, label=f"{w}w added p50")
        lat.plot(xs, ys("ttfd_ms", "p99"), "^" + style, label=f"{w}w first delta p99")
        cpu.plot(
            xs,
            [p.get("server_cpu_us_per_token") or float("nan") for p in points],
            "o" + style,
            label=f"{w}w server CPU/token",
        )
        busy = cpu.twinx() if w == 1 else None
        if busy is not None:
            busy.plot(xs, [p["machine_busy_pct"] for p in points], "x:", color="grey")
            busy.set_ylabel("machine busy % (grey, 1w)")
            busy.set_ylim(0, 105)
        mem.plot(
            xs,
            [(p.get("rss") or {}).get("kb_per_stream") or float("nan") for p in points],
            "o" + style,
            label=f"{w}w RSS/stream",
        )
    lat.axhline(300, color="red", lw=0.8, ls=":", label="knee limit 300 ms")
    lat.axhline(50, color="orange", lw=0.8, ls=":", label="target p99 @50: 50 ms")
    lat.set_yscale("log")
    lat.set(xlabel="concurrent streams", ylabel="ms", title="latency vs concurrency")
    cpu.axhline(180, color="red", lw=0.8, ls=":", label="target 180 µs")
    cpu.set(xlabel="concurrent streams", ylabel="µs", title="server CPU per relayed token")
    cpu.set_ylim(bottom=0)
    mem.axhline(30, color="red", lw=0.8, ls=":", label="target 30 KB")
    mem.set(xlabel="concurrent streams", ylabel="KB", title="server RSS per active stream")
    for axis in (lat, cpu, mem):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    machine = run.get("machine", {})
    fig.suptitle(
        f"chatsrv: {run['script']['tokens']} tokens at "
        f"{1 / run['script']['interval_s']:.0f} tok/s per stream; "
        f"{machine.get('cores')} cores, {machine.get('database')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
