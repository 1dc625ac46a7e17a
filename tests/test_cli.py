"""The ``chatsrv`` command as a user runs it, in a subprocess: ``db init``, and ``serve`` with the
embedded defaults (SQLite in the working directory, the demo model) until Ctrl-C; neither may log
a traceback or an error."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio
import trio.testing
from hypercorn.config import Config

from chatsrv._settings import Settings
from tests.processes import ProcessLog, assert_clean_log, chatsrv_environment
from tests.server import ApiClient

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
