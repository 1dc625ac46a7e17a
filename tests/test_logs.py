"""Log lines as an operator reads them: ``CHATSRV_LOG_FORMAT=json`` makes every line of chatsrv's
and hypercorn's logs one JSON object (``chatsrv serve``, and the hypercorn entry point with its
access log), the access lines carry the request's fields, and each turn ends with one line that
has its ids, status, sizes and timings (the user too, with keys on)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from tests.processes import ProcessLog, assert_clean_log, chatsrv_environment
from tests.server import ApiClient
from tests.test_keys import chatsrv


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object (the test fails on a line that is not one)."""
    lines = []
    for line in text.splitlines():
        record = orjson.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        lines.append(record)
    return lines


async def serve(
    command: list[str],
    env: dict[str, str],
    cwd: Path,
    url: str,
    headers: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Run a server, post one message (with ``headers``) once ``url`` (a regex on its output)
    shows it listens, then SIGTERM it; its stdout and stderr."""
    stdout, stderr = ProcessLog(), ProcessLog()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            assert process.stdout is not None and process.stderr is not None
            nursery.start_soon(stdout.collect, process.stdout)
            nursery.start_soon(stderr.collect, process.stderr)
            try:
                found = await (stdout if "serving" in url else stderr).wait_for(url)
                async with httpx.AsyncClient(
                    base_url=found.group(1), headers=headers, timeout=30
                ) as http:
                    api = ApiClient(http)
                    stream = await api.stream(await api.new_conversation(), "hello")
                    assert stream.done is not None
            finally:
                process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    return stdout.text(), stderr.text()


async def test_chatsrv_serve_logs_json_lines_and_one_line_per_turn(tmp_path: Path) -> None:
    env = chatsrv_environment(log_format="json", demo_token_interval_s="0")
    command = [sys.executable, "-m", "chatsrv", "serve", "--port", "0"]
    _, stderr = await serve(command, env, tmp_path, r"serving on (http://[\d.:]+)")
    assert_clean_log(stderr)
    records = json_lines(stderr)
    [turn] = [r for r in records if r["logger"] == "chatsrv.persister"]
    assert turn["status"] == "complete" and turn["stop_reason"] == "stop"
    assert turn["characters"] > 0 and turn["saved"] == "committed"
    assert 0 <= turn["first_token_s"] <= turn["duration_s"]
    assert turn["save_ms"] >= 0
    assert {"conversation_id", "message_id"} <= turn.keys() and "user" not in turn
    access = [r for r in records if r["logger"] == "hypercorn.access" and r["status"]]
    assert [(r["method"], r["status"]) for r in access] == [("POST", 201), ("POST", 200)]
    assert access[1]["path"] == f"/v1/conversations/{turn['conversation_id']}/messages"
    assert all(r["duration_ms"] >= 0 for r in access)


async def test_the_hypercorn_entry_point_logs_json_lines_with_its_access_log(
    tmp_path: Path,
) -> None:
    config = tmp_path / "hypercorn.toml"
    config.write_text(
        'bind = ["127.0.0.1:0"]\nworker_class = "trio"\nworkers = 1\n'
        'accesslog = "-"\nerrorlog = "-"\n'
    )
    env = chatsrv_environment(
        log_format="json",
        demo_token_interval_s="0",
        database_url=f"sqlite:///{tmp_path / 'chatsrv.db'}",
        journal_dir=str(tmp_path / "journal"),
    )
    command = [sys.executable, "-m", "hypercorn", "-c", str(config), "chatsrv.app:create_app()"]
    stdout, stderr = await serve(command, env, tmp_path, r"Running on (http://\S+)")
    # The master's own first lines are hypercorn's text; the worker's are JSON.
    worker = "\n".join(line for line in stderr.splitlines() if line.startswith("{"))
    assert_clean_log(stderr)
    assert any(r["logger"] == "chatsrv.persister" for r in json_lines(worker))
    access = [r for r in json_lines(stdout) if r.get("status")]
    assert [(r["logger"], r["method"], r["status"]) for r in access] == [
        ("hypercorn.access", "POST", 201),
        ("hypercorn.access", "POST", 200),
    ]


async def test_the_turn_line_names_the_user_when_keys_are_on(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'chatsrv.db'}"
    env = chatsrv_environment(
        log_format="json", demo_token_interval_s="0", auth="keys", database_url=database
    )
    created = await chatsrv(env, "keys", "create", "--user", "alice")
    assert created.returncode == 0, created.stderr
    key = created.stdout.decode().splitlines()[-1]
    command = [sys.executable, "-m", "chatsrv", "serve", "--port", "0"]
    headers = {"Authorization": f"Bearer {key}"}
    _, stderr = await serve(command, env, tmp_path, r"serving on (http://[\d.:]+)", headers)
    [turn] = [r for r in json_lines(stderr) if r["logger"] == "chatsrv.persister"]
    assert turn["user"] and turn["user"] != "00000000-0000-0000-0000-000000000000"
