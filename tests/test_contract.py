"""The published contract, fuzzed: schemathesis generates requests from ``/openapi.json`` against
a live chatsrv (a real hypercorn subprocess, SQLite, the demo model) and checks that no answer is
a 5xx, that every answer has a documented status and matches its documented schema; then the
database must hold no half-written turn. The examples per route are bounded so that CI stays
short; the seed and the run's figures are written to the test output.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
import trio

from tests.processes import chatsrv_environment, start_hypercorn

SEED = 2026
EXAMPLES = 15  # per route and phase


def schemathesis() -> list[str]:
    st = shutil.which("st", path=os.path.dirname(sys.executable))
    assert st is not None, "schemathesis is a test dependency: pip install -e '.[test]'"
    return [st]


async def test_the_published_contract_holds_under_fuzzing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "chatsrv.db"
    env = chatsrv_environment(
        database_url=f"sqlite:///{database}",
        journal_dir=str(tmp_path / "journal"),
        demo_token_interval_s="0",
        log_level="WARNING",
    )
    async with trio.open_nursery() as nursery:
        server = await start_hypercorn(nursery, tmp_path, env, graceful_timeout=2.0)
        try:
            with trio.fail_after(10):
                async with httpx.AsyncClient(base_url=server.url) as http:
                    spec = (await http.get("/openapi.json")).json()
            command = [
                *schemathesis(),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "not_a_server_error,status_code_conformance,response_schema_conformance",
                "--max-examples",
                str(EXAMPLES),
                "--seed",
                str(SEED),
                "--no-color",
            ]
            with trio.fail_after(90):
                # In tmp_path: schemathesis keeps a cache in its working directory.
                run = await trio.run_process(
                    command,
                    cwd=tmp_path,
                    capture_stdout=True,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
            server.process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await server.exited() == 0
        finally:
            server.kill_all()
    output = run.stdout.decode(errors="replace")
    with capsys.disabled():
        summary = [line for line in output.splitlines() if line.strip()][-12:]
        print(f"\nschemathesis (seed {SEED}, {EXAMPLES} examples a route):", *summary, sep="\n  ")
    assert run.returncode == 0, output
    assert len(spec["paths"]) >= 10
    server.log.assert_clean()

    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT id, conversation_id, role, status, parent_id FROM messages"
        ).fetchall()
    by_id = {row[0]: row for row in rows}
    users = [row for row in rows if row[2] == "user"]
    assistants = [row for row in rows if row[2] == "assistant"]
    # A turn writes its two rows together or not at all; every reply is final once stopped.
    assert sorted(row[4] for row in assistants) == sorted(row[0] for row in users)
    for _, conversation_id, _, status, parent_id in assistants:
        assert status != "streaming"
        assert by_id[parent_id][1] == conversation_id
    print(orjson.dumps({"turns": len(assistants)}).decode())
