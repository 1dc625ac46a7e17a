"""Where a stream's memory goes: ``python -m bench._memory [--concurrency 100]``.

A diagnostic, not a figure: it runs chatsrv under ``tracemalloc`` (which slows it down), so its
numbers say *what* holds memory per stream, while ``python -m bench`` says *how much* RSS.

chatsrv is not changed for this: the server's ``PYTHONPATH`` gets a temporary directory with a
``sitecustomize.py`` that, in each worker, starts tracemalloc and writes a snapshot to a file on
SIGUSR1. We take one snapshot after the warm-up (idle) and one while every stream is active, and
print the allocation sites that grew, per active stream, grouped by source line and by package.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from bench import _proc
from bench._pg import fresh_database
from bench._run import Client, Target, chatsrv_env, client_config, warm_up
from bench._script import Script

SITECUSTOMIZE = """
import os, signal, sys, tracemalloc
if "spawn_main" in " ".join(sys.argv) or "--multiprocessing-fork" in sys.argv:
    tracemalloc.start(1)
    _count = [0]
    def _dump(signum, frame):
        _count[0] += 1
        path = os.path.join({directory!r}, "snapshot-%d-%d.pickle" % (os.getpid(), _count[0]))
        tracemalloc.take_snapshot().dump(path + ".tmp")
        os.rename(path + ".tmp", path)
    signal.signal(signal.SIGUSR1, _dump)
"""


def snapshot(pid: int, directory: Path, n: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    path = directory / f"snapshot-{pid}-{n}.pickle"
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no tracemalloc snapshot from the worker")
        time.sleep(0.05)
    return tracemalloc.Snapshot.load(str(path))


def package(filename: str) -> str:
    parts = Path(filename).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    if "chatsrv" in parts:
        return "chatsrv"
    return "stdlib: " + Path(filename).name


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._memory", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    script = Script(tokens=400, interval_s=0.02)
    with (
        tempfile.TemporaryDirectory(prefix="chatsrv-memory-") as tmp,
        fresh_database() as database,
    ):
        directory = Path(tmp)
        (directory / "sitecustomize.py").write_text(SITECUSTOMIZE.format(directory=tmp))
        upstream = _proc.Upstream()
        try:
            target = Target(
                1, database.url, upstream, directory, env=(("PYTHONPATH", tmp),), ramp_up_s=1.0
            )
            with _proc.running_server(
                workers=1, env=chatsrv_env(target), log_path=directory / "server.log"
            ) as server:
                try:
                    warm_up(server)
                except RuntimeError:
                    print((directory / "server.log").read_text()[-3000:])
                    raise
                pid = server.worker_pids[0]
                client = Client(client_config(server, args.concurrency, script, ramp_up_s=1.0))
                client.expect("ready", 120)
                idle = snapshot(pid, directory, 1)
                idle_rss = server.rss_bytes()
                client.say("go")
                time.sleep(1.0 + 2.0)  # the ramp-up, then a while with every stream active
                busy = snapshot(pid, directory, 2)
                busy_rss = server.rss_bytes()
                client.expect("streamed", script.upstream_duration_s + 120)
                client.say("verify")
                client.expect("result", 120)
                client.wait()
                server.close()
        finally:
            upstream.close()
    n = args.concurrency
    diff = busy.compare_to(idle, "lineno")
    traced = sum(d.size_diff for d in diff)
    print(f"RSS growth {(busy_rss - idle_rss) / 1024 / n:.1f} KB/stream under tracemalloc; "
          f"traced Python allocations {traced / 1024 / n:.1f} KB/stream")  # fmt: skip
    by_package: Counter[str] = Counter()
    for d in diff:
        by_package[package(d.traceback[0].filename)] += d.size_diff
    print("\nby package of the allocating line (KB per stream):")
    for name, size in by_package.most_common(12):
        print(f"  {size / 1024 / n:7.2f}  {name}")
    print(f"\ntop {args.top} allocating lines (KB per stream, blocks per stream):")
    for d in sorted(diff, key=lambda d: -d.size_diff)[: args.top]:
        frame = d.traceback[0]
        where = "/".join(Path(frame.filename).parts[-2:])
        print(f"  {d.size_diff / 1024 / n:7.2f} KB {d.count_diff / n:6.1f}  {where}:{frame.lineno}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
