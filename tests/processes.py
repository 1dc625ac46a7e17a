"""chatsrv as operators run it: ``hypercorn -c <config> "chatsrv.app:create_app()"`` in a real
subprocess (its own session, so a test can kill the whole process group), with an environment
that holds exactly the settings the test gives it — and what such a server logs.

A subprocess server's log is everything it writes to stderr: hypercorn's error log, chatsrv's
log, anything Python prints. It is collected as it arrives (``ProcessLog``) until the pipe's end
of file, that is until every process of the server has exited — after a SIGKILL too, so the log
checked is everything written up to the kill. Every test that runs a server ends with
``assert_clean_log``: no traceback, and no ERROR or CRITICAL record but those the test expects,
each named by a regex (and a comment saying why it is expected).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trio


def chatsrv_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any chatsrv or OpenAI setting, plus ``CHATSRV_<NAME>``
    for each of ``settings``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CHATSRV_") and name != "OPENAI_API_KEY"
    }
    env.update({f"CHATSRV_{name.upper()}": value for name, value in settings.items()})
    return env


# --- checking a log ----------------------------------------------------------------------------

# The first line of a log record, and its level, in the formats a chatsrv process writes:
# chatsrv's own ("2025-01-02 03:04:05,678 ERROR chatsrv.persister: ..."), hypercorn's error log
# ("[2025-01-02 03:04:05 +0000] [4242] [ERROR] ...") and Quart's ("[2025-01-02 03:04:05,678] ERROR
# in app: ..."). Any other line continues the record above it: a traceback from log.exception.
_RECORD_HEAD = re.compile(
    r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<chatsrv>[A-Z]+) "
    r"|\[\d{4}-\d\d-\d\d [^\]]*\] \[\d+\] \[(?P<hypercorn>[A-Z]+)\] "
    r"|\[\d{4}-\d\d-\d\d [^\]]*\] (?P<quart>[A-Z]+) in )"
)
_SEVERE = {"ERROR", "CRITICAL"}
# What Python prints for an exception: raised and not caught (or logged with its traceback, or
# in an exception group), or raised where it cannot propagate (a __del__, a callback).
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^Exception ignored in", re.MULTILINE)


def log_problems(log: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """The records of ``log`` that hold a traceback or have the level ERROR or CRITICAL, except
    those whose first line matches (``re.search``) one of the ``allowed`` regexes. Lines before
    the first record (a traceback printed before logging was set up) are a record of their own,
    with no level. A traceback right after a record is read as that record's own (as from
    ``log.exception``), so an allowed record is allowed with it: keep the patterns narrow."""
    records: list[list[str]] = [[]]
    for line in log.splitlines():
        if _RECORD_HEAD.match(line):
            records.append([])
        records[-1].append(line)
    problems = []
    for lines in filter(None, records):
        head = _RECORD_HEAD.match(lines[0])
        level = next(filter(None, head.groups()), None) if head else None
        text = "\n".join(lines)
        if (level in _SEVERE or _TRACEBACK.search(text)) and not any(
            re.search(pattern, lines[0]) for pattern in allowed
        ):
            problems.append(text)
    return problems


def assert_clean_log(log: str, *allowed: str) -> None:
    """Fail, showing them, if ``log`` holds records ``log_problems`` reports."""
    problems = log_problems(log, allowed)
    assert not problems, "unexpected in the server's log:\n" + "\n".join(problems)


class ProcessLog:
    """What a process (and its children) write to one pipe, collected as it arrives.

    Run ``collect`` in a nursery; ``ended`` is set at the pipe's end of file, once every process
    holding its write end has exited.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._changed = trio.Event()  # set, then replaced, whenever a chunk arrives
        self.ended = trio.Event()

    async def collect(self, pipe: trio.abc.ReceiveStream) -> None:
        async with pipe:
            async for data in pipe:
                self._chunks.append(bytes(data))
                self._changed.set()
                self._changed = trio.Event()
        self.ended.set()
        self._changed.set()

    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """Until ``pattern`` occurs in the log; its match. Fails if the pipe ends first."""
        while not (found := re.search(pattern, self.text())):
            assert not self.ended.is_set(), f"the process ended without {pattern!r}:\n{self.text()}"
            await self._changed.wait()
        return found

    def assert_clean(self, *allowed: str) -> None:
        """``assert_clean_log`` on the whole log: only once it has ended, so nothing escapes."""
        assert self.ended.is_set(), "the log is checked before the process has exited"
        assert_clean_log(self.text(), *allowed)


# --- a hypercorn subprocess -------------------------------------------------------------------


@dataclass
class Hypercorn:
    process: trio.Process
    log: ProcessLog
    url: str = ""

    def output(self) -> str:
        return self.log.text()

    def kill_all(self) -> None:
        """SIGKILL hypercorn and its workers at once, as the OOM killer or a power cut would.
        Nothing happens if they have all exited already."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def exited(self) -> int:
        """Until hypercorn and every process it started have exited; hypercorn's exit code."""
        code = await self.process.wait()
        await self.log.ended.wait()
        return code


async def start_hypercorn(
    nursery: trio.Nursery, config_dir: Path, env: dict[str, str], *, graceful_timeout: float
) -> Hypercorn:
    """Start hypercorn on a kernel-chosen loopback port; return once it listens. Its log is
    collected by a task in ``nursery``, which ends when the last of its processes exits: the
    caller makes sure it does (``kill_all`` in a ``finally``)."""
    config = config_dir / "hypercorn.toml"
    config.write_text(
        'bind = ["127.0.0.1:0"]\nworker_class = "trio"\nworkers = 1\n'
        f"graceful_timeout = {graceful_timeout}\n"
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "hypercorn", "-c", str(config), "chatsrv.app:create_app()"],
        env=env,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stderr is not None
    server = Hypercorn(process, ProcessLog())
    nursery.start_soon(server.log.collect, process.stderr)
    try:
        with trio.fail_after(30):
            found = await server.log.wait_for(r"Running on (http://\S+)")
    except BaseException:
        server.kill_all()
        raise
    server.url = found.group(1)
    return server
