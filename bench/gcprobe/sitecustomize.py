"""A probe of the cyclic garbage collector in chatsrv's workers, loaded without changing chatsrv:

    python -m bench --workers 1 --no-ramp --disconnect-after 0 --repeat 1 \
        --env PYTHONPATH=$PWD/bench/gcprobe --env BENCH_GC_LOG_DIR=$PWD/bench/out

Python imports ``sitecustomize`` at startup from ``PYTHONPATH``; in hypercorn's worker processes
(started with ``--multiprocessing-fork``) this one appends one line per collection to
``$BENCH_GC_LOG_DIR/gc-<pid>.log``: ``<time.monotonic()> gen<N> <pause>ms collected=<n>``, on the
same clock as the client's stream timestamps (bench/out/streams-*.json). With
``BENCH_GC_FREEZE_AFTER_S=S`` it also runs ``gc.collect(); gc.freeze()`` S seconds after the
worker started, which is what chatsrv would do once its startup is over.
"""

import gc
import os
import sys
import threading
import time

if "--multiprocessing-fork" in sys.argv and os.environ.get("BENCH_GC_LOG_DIR"):
    _started = [0.0]
    _log = open(  # noqa: SIM115 (open for the life of the process)
        os.path.join(os.environ["BENCH_GC_LOG_DIR"], f"gc-{os.getpid()}.log"), "a", buffering=1
    )

    def _on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        pause_ms = 1e3 * (time.perf_counter() - _started[0])
        _log.write(
            f"{time.monotonic():.3f} gen{info['generation']} {pause_ms:.2f}ms "
            f"collected={info['collected']}\n"
        )

    gc.callbacks.append(_on_gc)

    if os.environ.get("BENCH_GC_FREEZE_AFTER_S"):

        def _freeze() -> None:
            gc.collect()
            gc.freeze()
            _log.write(f"{time.monotonic():.3f} froze {gc.get_freeze_count()} objects\n")

        threading.Timer(float(os.environ["BENCH_GC_FREEZE_AFTER_S"]), _freeze).start()
