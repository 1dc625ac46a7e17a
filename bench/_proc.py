"""The processes of a benchmark run, and what the kernel says they cost.

- :class:`Server`: the server under test, as a deployment runs chatsrv: ``hypercorn -c
  hypercorn.toml`` (the repository's own config: trio worker, access log to stdout) with
  ``--workers N``, bound to a loopback socket that we create, bind to port 0 and hand over as
  ``fd://N`` (no port race). Its ASGI app is chatsrv (``CHATSRV_APP``) or the reference relay
  (``REFERENCE_APP``, ``bench._reference``), on the same command. Its workers are the hypercorn
  process's ``multiprocessing`` children.
- :class:`Upstream`: the fake upstream (``bench._upstream``) in a process of its own.
- ``cpu_s``, ``rss_bytes``, ``machine_jiffies``: read from ``/proc`` — ``utime + stime`` of every
  thread of a process (the store's asyncio thread included), ``VmRSS``, and the machine's busy
  and total time. :class:`RssSampler` samples RSS in a thread while a window is measured.

Processes are started in sessions of their own and stopped by their own ids: SIGTERM, then, if
one outlives its grace, SIGKILL to its process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

REPO = Path(__file__).resolve().parent.parent
# CHATSRV_MAX_STREAMS_PER_USER for every server a benchmark starts. All its streams are one
# user's (CHATSRV_AUTH=off: the user 'local'), and chatsrv refuses a user's streams past its
# limit (20 by default) with 429: the benchmark measures the server, not that limit, so it sets
# the limit above any concurrency it runs. (A chatsrv from before the limit ignores it.)
MAX_STREAMS_PER_USER = "1000000"
# The ASGI apps a Server runs, as hypercorn's command line names them.
CHATSRV_APP = "chatsrv.app:create_app()"
REFERENCE_APP = "bench._reference:app"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of all the process's threads (``/proc/<pid>/stat``)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15


def cpu_split_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of all the process's threads."""
    fields = _stat_fields(pid)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def main_thread_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process's main thread alone (the trio thread)."""
    raw = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


class RssSampler:
    """Samples the summed RSS of ``pids`` every ``period_s`` in a thread, with monotonic times."""

    def __init__(self, pids: list[int], period_s: float = 0.05) -> None:
        self.samples: list[tuple[float, int]] = []
        self._pids = pids
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic(), sum(map(rss_bytes, self._pids))))
            self._stop.wait(self._period_s)


def http_json(url: str, *, method: str = "GET", timeout_s: float = 5.0) -> Any:
    data = b"" if method == "POST" else None
    with urllib.request.urlopen(
        urllib.request.Request(url, data=data, method=method), timeout=timeout_s
    ) as response:
        return orjson.loads(response.read())


def snapshot(ref: str, directory: Path) -> Path:
    """The committed chatsrv of ``ref`` (its package, hypercorn.toml and schema.sql), extracted
    into ``directory`` with ``git archive``: a server started there runs that code, whatever
    the working tree holds meanwhile."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "chatsrv", "hypercorn.toml", "schema.sql"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def _stop(process: subprocess.Popen[Any], grace_s: float) -> int | None:
    """SIGTERM, then SIGKILL to its process group after ``grace_s``; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


class Upstream:
    """The fake upstream in its own process; ``url`` is its OpenAI base URL (``.../v1``)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench._upstream"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the fake upstream did not start")
        self.url: str = orjson.loads(line)["url"]
        self.pid = self.process.pid

    def reset(self) -> None:
        http_json(self.url.removesuffix("/v1") + "/stats/reset", method="POST")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json(self.url.removesuffix("/v1") + "/stats")
        return result

    def close(self) -> None:
        _stop(self.process, 5.0)


class Server:
    """``hypercorn -c hypercorn.toml --workers N APP`` on 127.0.0.1, run in ``root`` (where
    hypercorn.toml is, and first on the workers' ``sys.path``); ``app`` is chatsrv's by default."""

    def __init__(
        self,
        *,
        workers: int,
        env: dict[str, str],
        log_path: Path,
        root: Path = REPO,
        app: str = CHATSRV_APP,
    ) -> None:
        self.workers_wanted = workers
        self.app = app
        self.log_path = log_path
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        self.port: int = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log: IO[bytes] = log_path.open("wb")
        command = [
            sys.executable, "-m", "hypercorn", "-c", "hypercorn.toml",
            "--bind", f"fd://{listener.fileno()}", "--workers", str(workers),
            "--backlog", "4096", app,
        ]  # fmt: skip
        try:
            self.process = subprocess.Popen(
                command,
                cwd=root,  # hypercorn.toml, and (python -m puts the cwd first) chatsrv itself
                env=env,
                pass_fds=[listener.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            listener.close()  # hypercorn has its own copy
        self.worker_pids: list[int] = []

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every worker has started serving (hypercorn logs "Running on" once per worker,
        after the app's startup) and ``/healthz`` answers."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.app} exited at startup; see {self.log_path}")
            running = self.log_path.read_bytes().count(b"Running on")
            if running >= self.workers_wanted:
                with contextlib.suppress(OSError):
                    if http_json(self.url + "/healthz", timeout_s=2.0)["status"] == "ok":
                        self.worker_pids = [
                            pid
                            for pid in children(self.process.pid)
                            if "spawn_main" in cmdline(pid)
                        ]
                        if len(self.worker_pids) == self.workers_wanted:
                            return
            time.sleep(0.05)
        raise RuntimeError(f"{self.app} did not start in {timeout_s} s; see {self.log_path}")

    def cpu_s(self) -> list[tuple[float, float]]:
        """(user, system) CPU seconds of each worker."""
        return [cpu_split_s(pid) for pid in self.worker_pids]

    def main_thread_cpu_s(self) -> float:
        return sum(main_thread_cpu_s(pid) for pid in self.worker_pids)

    def rss_bytes(self) -> int:
        return sum(rss_bytes(pid) for pid in self.worker_pids)

    def close(self) -> tuple[int | None, list[str]]:
        """Stop it; its exit code and the log lines that report errors."""
        code = _stop(self.process, 30.0)
        self._log.close()
        problems = []
        within = False
        for line in self.log_path.read_text(errors="replace").splitlines():
            if any(mark in line for mark in (" ERROR ", "[ERROR]", " CRITICAL ")):
                within = True
            elif not line.startswith((" ", "\t", "Traceback", "+", "|")):
                within = False
            if within or "Traceback" in line:
                problems.append(line)
        return code, problems


@contextlib.contextmanager
def running_server(
    *, workers: int, env: dict[str, str], log_path: Path, root: Path = REPO, app: str = CHATSRV_APP
) -> Iterator[Server]:
    server = Server(workers=workers, env=env, log_path=log_path, root=root, app=app)
    try:
        server.wait_ready()
        yield server
    finally:
        if server.process.poll() is None:
            server.close()
