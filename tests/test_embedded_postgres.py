"""The embedded PostgreSQL server that the tests start when ``CHATSRV_TEST_DATABASE_URL`` is
unset (``tests/db.py``): it runs, it is PostgreSQL 18, and no process of it, nor its directory,
outlives the run, however the run ends.

Rules: these tests start servers of their own, whatever ``CHATSRV_TEST_DATABASE_URL`` says, and
read the process table from Linux's ``/proc``. A run that is interrupted is a real pytest in a
subprocess and a session of its own, signalled as a terminal's Ctrl-C, ``timeout`` or the OOM
killer would signal it: its whole process group. Every wait is bounded; a process that has
exited but that nobody reaped yet (a zombie) counts as gone.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.db import plain_url
from tests.embedded_postgres import DATABASE_URL_VARIABLE, embedded_postgresql

REPO = Path(__file__).resolve().parent.parent

# A whole test run that holds the embedded server until it is interrupted.
HOLDING_RUN = """
import os
import time
from pathlib import Path

from tests.db import postgresql_url  # the fixture, as tests/conftest.py provides it


def test_holds_the_server(postgresql_url):
    report = Path(os.environ["REPORT"])
    report.with_suffix(".partial").write_text(postgresql_url)
    report.with_suffix(".partial").rename(report)
    time.sleep(120)
"""


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    state: str
    args: list[str]


def process_table() -> dict[int, Process]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # it exited while we looked
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        table[int(entry.name)] = Process(int(entry.name), int(ppid), state, args)
    return table


def server_processes(data: Path) -> set[int]:
    """The live processes of the server on ``data``: the postmaster, whose command line names
    the data directory, and its children (whose command lines do not)."""
    table = {pid: p for pid, p in process_table().items() if p.state != "Z"}
    postmasters = {pid for pid, p in table.items() if str(data) in p.args}
    return postmasters | {pid for pid, p in table.items() if p.ppid in postmasters}


def leftovers(directory: Path, pids: set[int]) -> list[str]:
    """What is left of the server that ran in ``directory`` with processes ``pids``."""
    table = process_table()
    left = [
        f"{p.pid} {' '.join(p.args)}"
        for p in table.values()
        if p.state != "Z" and (p.pid in pids or any(str(directory) in arg for arg in p.args))
    ]
    if directory.exists():
        left.append(f"the directory {directory}")
    return left


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def fetchval(url: str, query: str) -> str:
    async def main() -> str:
        conn = await asyncpg.connect(plain_url(url), timeout=10)
        try:
            return str(await conn.fetchval(query))
        finally:
            await conn.close()

    return asyncio.run(main())


def owner(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def test_the_server_is_postgresql_18_on_loopback_and_leaves_nothing_behind() -> None:
    with embedded_postgresql() as server:
        assert fetchval(server.url, "SELECT version()").startswith("PostgreSQL 18.")
        assert fetchval(server.url, "SHOW data_directory") == str(server.directory / "data")
        assert server.url.startswith("postgresql://postgres@127.0.0.1:")
        pids = server_processes(server.directory / "data")
        assert server.pid in pids and len(pids) > 1  # the postmaster and its helpers
        # PostgreSQL refuses root: as root, the server runs as nobody.
        as_user = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
        assert {owner(pid) for pid in pids} == {as_user}
    assert leftovers(server.directory, pids) == []


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGINT, id="ctrl-c"),  # pytest tears its fixtures down
        pytest.param(signal.SIGTERM, id="sigterm"),  # Python dies at once: no teardown
        pytest.param(signal.SIGKILL, id="sigkill"),
    ],
)
def test_an_interrupted_run_leaves_no_server_behind(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "test_holding.py").write_text(HOLDING_RUN)
    report = tmp_path / "url"
    env = {name: value for name, value in os.environ.items() if name != DATABASE_URL_VARIABLE}
    env["REPORT"] = str(report)
    with (tmp_path / "output").open("wb") as output:
        run = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_holding.py"],
            cwd=tmp_path,
            env=env | {"PYTHONPATH": str(REPO)},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert wait_until(lambda: report.exists() or run.poll() is not None, 60)
        assert report.exists(), (tmp_path / "output").read_text()
        data = Path(fetchval(report.read_text(), "SHOW data_directory"))
        assert data.parent.name.startswith("chatsrv-test-postgresql-")
        pids = server_processes(data)
        assert pids

        os.killpg(run.pid, sig)
        run.wait(timeout=30)
        if sig == signal.SIGINT:  # pytest stopped the test and tore the session down
            assert run.returncode == pytest.ExitCode.INTERRUPTED

        assert wait_until(lambda: not leftovers(data.parent, pids), 20), leftovers(
            data.parent, pids
        )
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
