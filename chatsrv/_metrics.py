"""What chatsrv counts, for Prometheus (``GET /metrics``, the text format, prometheus-client).

Every figure is counted where it happens, once per turn, checkpoint, request or client, never
per token. With several hypercorn workers, set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory
made for the run (and removed after it): each worker then writes its figures there, and
``/metrics`` on any worker answers for the whole server (prometheus-client's multiprocess mode;
the running turns and connected clients are the sums over the live workers).
"""

from __future__ import annotations

import os
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

# No "_created" series beside each counter and histogram: Prometheus does not need them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds: from a few milliseconds (a commit, a fast first token) to a minute.
_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

TURNS_RUNNING = Gauge("chatsrv_turns_running", "Turns running now.", multiprocess_mode="livesum")
TURNS_ENDED = Counter(
    "chatsrv_turns_ended", "Turns ended, by status and stop reason.", ["status", "stop_reason"]
)
SAVE_SECONDS = Histogram(
    "chatsrv_turn_save_seconds",
    "From the end of a turn's generation to its reply being committed (or journaled).",
    buckets=_BUCKETS,
)
FIRST_TOKEN_SECONDS = Histogram(
    "chatsrv_first_token_seconds",
    "From a turn's start to its first delta from the upstream.",
    buckets=_BUCKETS,
)
CHECKPOINTS = Counter(
    "chatsrv_checkpoints", "Checkpoint writes of streaming replies, by result.", ["result"]
)
PERSIST_RETRIES = Counter(
    "chatsrv_persist_retries", "Final commits retried because the database was unavailable."
)
JOURNAL_APPENDS = Counter(
    "chatsrv_journal_appends", "Replies written to the local journal instead of the database."
)
JOURNAL_REPLAYS = Counter(
    "chatsrv_journal_replays", "Journaled replies written to the database afterwards."
)
JOURNAL_WAITING = Gauge(
    "chatsrv_journal_waiting",
    "Replies this process journaled that wait to be written to the database (set by the journal).",
    multiprocess_mode="livesum",
)
UPSTREAM_ERRORS = Counter(
    "chatsrv_upstream_errors", "Turns the upstream failed, by how (UpstreamError.code).", ["code"]
)
SSE_CLIENTS = Gauge(
    "chatsrv_sse_clients", "Clients streaming a reply now.", multiprocess_mode="livesum"
)
REQUESTS = Counter(
    "chatsrv_requests", "HTTP requests answered, by route and status.", ["route", "status"]
)

_MULTIPROCESS: Final = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition() -> tuple[bytes, str]:
    """The figures in Prometheus's text format, and its content type."""
    if _MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_exiting() -> None:
    """This process stops: its share of the live sums goes (multiprocess mode)."""
    if _MULTIPROCESS:
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
