"""The ``chatsrv`` command as a user runs it, in a subprocess: ``db init``; ``serve`` with the
embedded defaults (SQLite in the working directory, the demo model) until Ctrl-C; ``serve
--workers 2`` serving from two processes until SIGTERM, in CHATSRV_LOG_FORMAT; a worker count
below 1 refused. None may log a traceback or an error."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config

from chatsrv._settings import Settings
from tests.processes import ProcessLog, assert_clean_log, chatsrv_environment
from tests.server import ApiClient, Stream
from tests.test_keys import chatsrv
from tests.test_logs import json_lines, serve
from tests.test_metrics import scrape

REPO = Path(__file__).resolve().parent.parent


async def test_db_init_applies_the_schema_once(tmp_path: Path) -> None:
    env = chatsrv_environment(database_url=f"sqlite:///{tmp_path / 'init.db'}")
    command = [sys.executable, "-m", "chatsrv", "db", "init"]
    runs = []
    with trio.fail_after(30):
        for _ in range(2):
            run = await trio.run_process(
                command, env=env, capture_stdout=True, capture_stderr=True, check=False
            )
            assert run.returncode == 0, run.stderr.decode(errors="replace")
            assert_clean_log(run.stderr.decode(errors="replace"))
            runs.append(run.stdout.decode().strip())
    assert runs == ["applied 0001, 0002, 0003, 0004", "the schema is up to date"]


async def test_serve_with_embedded_defaults_then_ctrl_c(tmp_path: Path) -> None:
    # A token every 250 ms: the demo reply to "hello" (81 tokens) would take 20 s, far past the
    # 0.5 s grace, so it is still streaming when the grace ends, however late the signal lands.
    env = chatsrv_environment(demo_token_interval_s="0.25", shutdown_grace_s="0.5")
    stdout, stderr = ProcessLog(), ProcessLog()
    with trio.fail_after(45):
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "chatsrv", "serve", "--port", "0"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert process.stdout is not None and process.stderr is not None
            nursery.start_soon(stdout.collect, process.stdout)
            nursery.start_soon(stderr.collect, process.stderr)
            try:
                found = await stdout.wait_for(r"serving on (http://[\d.:]+)")
                assert "model chatsrv-demo via demo" in stdout.text()

                async with httpx.AsyncClient(base_url=found.group(1), timeout=30) as http:
                    api = ApiClient(http)
                    conversation_id = await api.new_conversation()

                    async def interrupt_at_first_delta(received: int) -> None:
                        if received == 1:
                            process.send_signal(signal.SIGINT)

                    stream = await api.stream(
                        conversation_id, "hello", on_delta=interrupt_at_first_delta
                    )
                # The client's idle connection is closed now: hypercorn need not wait for it.
                assert await process.wait() == 0, stderr.text()
            finally:
                if process.returncode is None:  # a failure above left it running
                    process.kill()
                    with trio.move_on_after(5, shield=True):
                        await process.wait()
    assert "INFO chatsrv: SIGINT: draining" in stderr.text()
    stderr.assert_clean()

    assert stream.text
    assert stream.done is not None
    assert (stream.done["status"], stream.done["stop_reason"]) == (
        "interrupted",
        "server_shutdown",
    )
    # The embedded default database is a file in the working directory.
    assert (tmp_path / "chatsrv.db").exists()


def test_shipped_hypercorn_config_drains_before_hypercorn_closes_connections() -> None:
    config = Config.from_toml(REPO / "hypercorn.toml")
    assert config.worker_class == "trio"
    defaults = Settings()
    assert config.graceful_timeout > defaults.shutdown_grace_s + defaults.persist_grace_s


async def test_serve_with_two_workers_serves_from_both_and_drains_both_on_sigterm(
    tmp_path: Path,
) -> None:
    # As above: replies far longer than the grace, so each is still streaming when it ends.
    env = chatsrv_environment(demo_token_interval_s="0.25", shutdown_grace_s="0.5")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # chatsrv makes its own for the run...
    env["TMPDIR"] = str(tmp_path / "tmp")  # ... there, to be seen gone after it
    (tmp_path / "tmp").mkdir()
    stdout, stderr = ProcessLog(), ProcessLog()
    streams: list[Stream] = []
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "chatsrv", "serve", "--workers", "2", "--port", "0"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a failure below kills the workers too
            )
            assert process.stdout is not None and process.stderr is not None
            nursery.start_soon(stdout.collect, process.stdout)
            nursery.start_soon(stderr.collect, process.stderr)
            try:
                found = await stdout.wait_for(r"serving on (http://[\d.:]+)  \(2 workers")
                url = found.group(1)
                # Each worker says so once it has started and listens.
                await stderr.wait_for(r"(?s)Running on .*Running on ")
                async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                    api = ApiClient(http)
                    async with trio.open_nursery() as clients:
                        # New replies until both workers run one: GET /v1/turns lists every
                        # process's, each with the process that owns it.
                        owners: set[str] = set()
                        while len(owners) < 2:
                            assert len(streams) < 20, "every reply landed on one worker"
                            conversation_id = await api.new_conversation()
                            streams.append(await api.stream_until(clients, conversation_id))
                            async with httpx.AsyncClient(base_url=url) as probe:  # either worker
                                turns = (await probe.get("/v1/turns")).json()["turns"]
                            owners = {turn["owner"] for turn in turns}
                        # Whichever worker a scrape lands on, it counts both workers' turns.
                        for _ in range(4):
                            async with httpx.AsyncClient(base_url=url) as probe:
                                figures = await scrape(probe)
                            assert figures("chatsrv_turns_running") == len(streams)
                        process.send_signal(signal.SIGTERM)
                    # Every client got its `done`: both workers drained before hypercorn closed
                    # the connections.
                # The clients' idle connections are closed now: no worker need wait for them.
                assert await process.wait() == 0, stderr.text()
                await stderr.ended.wait()  # every worker has exited
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # only if a failure left it running
    stderr.assert_clean()
    assert stderr.text().count("INFO chatsrv.engine: draining") == 2
    for stream in streams:
        assert stream.done is not None
        assert (stream.done["status"], stream.done["stop_reason"]) == (
            "interrupted",
            "server_shutdown",
        )
    with contextlib.closing(sqlite3.connect(tmp_path / "chatsrv.db")) as conn:
        saved = dict(conn.execute("SELECT id, content FROM messages WHERE status = 'interrupted'"))
    assert {stream.message_id: stream.text for stream in streams} == saved
    assert not list((tmp_path / "tmp").iterdir())  # the metrics directory went with the run


async def test_serve_with_two_workers_logs_json_lines_on_stderr(tmp_path: Path) -> None:
    env = chatsrv_environment(log_format="json", demo_token_interval_s="0")
    command = [sys.executable, "-m", "chatsrv", "serve", "--workers", "2", "--port", "0"]
    # Once both workers say they listen (one that was still starting when another exited would
    # be stopped by hypercorn's master before it logged).
    both = r"(?s)Running on (http://[\d.:]+).*Running on "
    stdout, stderr = await serve(command, env, tmp_path, both)
    assert_clean_log(stderr)
    # Every line the workers write is JSON, hypercorn's "Running on" and access lines too, and
    # the access log is on stderr, as with one worker.
    records = json_lines(stderr)
    assert sum(r["message"].startswith("Running on") for r in records) == 2
    [turn] = [r for r in records if r["logger"] == "chatsrv.persister"]
    assert turn["status"] == "complete" and turn["saved"] == "committed"
    access = [r for r in records if r["logger"] == "hypercorn.access" and r["status"]]
    assert [(r["method"], r["status"]) for r in access] == [("POST", 201), ("POST", 200)]
    [serving] = stdout.splitlines()  # the master's one line, and nothing from the workers
    assert "serving on http://127.0.0.1:" in serving and "(2 workers" in serving


@pytest.mark.parametrize(
    ("arguments", "settings", "refusal"),
    [
        (["--workers", "0"], {}, "--workers: 0: chatsrv needs at least 1 worker"),
        (["--workers", "-2"], {}, "--workers: -2: chatsrv needs at least 1 worker"),
        (["--workers", "two"], {}, "--workers: 'two' is not a number of processes"),
        ([], {"workers": "0"}, "chatsrv: CHATSRV_WORKERS: Input should be greater than or equal"),
    ],
)
async def test_serve_refuses_fewer_than_one_worker(
    tmp_path: Path, arguments: list[str], settings: dict[str, str], refusal: str
) -> None:
    env = chatsrv_environment(database_url=f"sqlite:///{tmp_path / 'chatsrv.db'}", **settings)
    run = await chatsrv(env, "serve", "--port", "0", *arguments)
    stderr = run.stderr.decode(errors="replace")
    assert run.returncode == 2, stderr
    assert refusal in stderr
    assert "Traceback" not in stderr and b"serving on" not in run.stdout
    assert not (tmp_path / "chatsrv.db").exists()  # refused before anything was opened
