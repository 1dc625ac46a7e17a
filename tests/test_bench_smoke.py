"""The benchmark's smoke run, as CI runs it: ``python -m bench --smoke`` in a subprocess.

It starts its own fake upstream and a real chatsrv under hypercorn (one worker, SQLite), drives
a few concurrent streams from a separate client process through the three ways a turn ends here
(complete, client disconnect, upstream failure), and exits non-zero on any error. Timings are
not asserted: only that the tool works and reports every figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.processes import assert_clean_log

REPO = Path(__file__).resolve().parent.parent

FIGURES = ("server_cpu_us_per_token", "ttfd_ms", "rss", "tokens_relayed", "errors", "upstream")


def test_bench_smoke_runs_clean_and_reports_every_figure(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        # ~15 s on a quiet machine; room for a loaded one, within pytest-timeout's limit.
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The bench's own stderr (its progress lines, and whatever its client process prints): a
    # traceback there fails the test even when the bench exits 0. The servers' logs are files
    # the bench reads itself, with the same rule: ``server_log_errors`` below.
    assert_clean_log(done.stderr)
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["ok"] is True
    assert report["problems"] == []
    assert set(report["phases"]) == {"stream", "disconnect", "fail"}
    for phase in report["phases"].values():
        assert phase["errors"] == 0
        assert phase["server_log_errors"] == 0, phase["server_log_examples"]
        for figure in FIGURES:
            assert figure in phase, figure
    stream = report["phases"]["stream"]
    assert stream["tokens_relayed"] == stream["streams"] * stream["script"]["tokens"]
    assert stream["added_latency_ms"]["n"] == stream["streams"]
    assert "kb_per_stream" in stream["rss"]
    disconnect = report["phases"]["disconnect"]
    assert disconnect["disconnect_to_commit_ms"]["n"] == disconnect["streams"]
    assert disconnect["upstream"]["disconnects"] == disconnect["streams"]
    fail = report["phases"]["fail"]
    assert fail["upstream"]["failed_on_purpose"] == fail["streams"]
