"""The ``chatsrv`` command as a user runs it, in a subprocess: ``db init``, and ``serve`` with the
embedded defaults (SQLite in the working directory, the demo model) until Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config

from chatsrv._settings import Settings
from tests.processes import chatsrv_environment
from tests.server import ApiClient

REPO = Path(__file__).resolve().parent.parent


async def test_db_init_applies_the_schema_once(tmp_path: Path) -> None:
    env = chatsrv_environment(database_url=f"sqlite:///{tmp_path / 'init.db'}")
    command = [sys.executable, "-m", "chatsrv", "db", "init"]
    with trio.fail_after(30):
        first = await trio.run_process(command, env=env, capture_stdout=True)
        second = await trio.run_process(command, env=env, capture_stdout=True)
    assert first.stdout.decode().strip() == "schema applied"
    assert second.stdout.decode().strip() == "schema already present"


async def test_serve_with_embedded_defaults_then_ctrl_c(tmp_path: Path) -> None:
    env = chatsrv_environment(demo_token_interval_s="0.05", shutdown_grace_s="0.5")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "chatsrv", "serve", "--port", "0"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(30):
            while not (found := re.search(rb"serving on (http://[\d.:]+)", output)):
                output += await process.stdout.receive_some()
        assert b"model chatsrv-demo via demo" in output

        async with httpx.AsyncClient(base_url=found.group(1).decode(), timeout=30) as http:
            api = ApiClient(http)
            conversation_id = await api.new_conversation()

            async def interrupt_at_first_delta(received: int) -> None:
                if received == 1:
                    process.send_signal(signal.SIGINT)

            with trio.fail_after(30):
                stream = await api.stream(
                    conversation_id, "hello", on_delta=interrupt_at_first_delta
                )
                assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

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
