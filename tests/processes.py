"""chatsrv as operators run it: ``hypercorn -c <config> "chatsrv.app:create_app()"`` in a real
subprocess (its own session, so a test can kill the whole process group), with an environment
that holds exactly the settings the test gives it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
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


@dataclass
class Hypercorn:
    process: trio.Process
    url: str = ""
    log: list[bytes] = field(default_factory=list)

    def output(self) -> str:
        return b"".join(self.log).decode(errors="replace")

    def kill_all(self) -> None:
        """SIGKILL hypercorn and its workers at once, as the OOM killer or a power cut would."""
        os.killpg(self.process.pid, signal.SIGKILL)


async def start_hypercorn(
    nursery: trio.Nursery, config_dir: Path, env: dict[str, str], *, graceful_timeout: float
) -> Hypercorn:
    """Start hypercorn on a kernel-chosen loopback port; return once it listens. Its log is
    collected by a task in ``nursery``."""
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
    server = Hypercorn(process)
    listening = trio.Event()

    async def read_log() -> None:
        assert process.stderr is not None
        async for data in process.stderr:
            server.log.append(bytes(data))
            if not listening.is_set():
                found = re.search(rb"Running on (http://\S+)", b"".join(server.log))
                if found:
                    server.url = found.group(1).decode()
                    listening.set()

    nursery.start_soon(read_log)
    with trio.fail_after(30):
        await listening.wait()
    return server
