"""The log check that every subprocess test ends with (``tests/processes.py``), on logs written
here: it must see each kind of trouble a server can print, and allow only what a test names."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.processes import ProcessLog, assert_clean_log, log_problems

QUIET_LOG = """\
[2025-01-02 03:04:05 +0000] [4242] [INFO] Running on http://127.0.0.1:8000 (CTRL + C to quit)
chatsrv: SIGINT, draining
2025-01-02 03:04:06,123 WARNING chatsrv.persister: turn m1: checkpoint failed (TooSlowError())
2025-01-02 03:04:06,200 INFO chatsrv.persister: turn m1 conversation c1: complete/stop, 12 chars
"""
TRACEBACK = """\
Traceback (most recent call last):
  File "/srv/chatsrv/engine/_engine.py", line 297, in _run
ValueError: boom
"""


@pytest.mark.parametrize(
    "problem",
    [
        pytest.param(
            "2025-01-02 03:04:07,000 ERROR chatsrv: unhandled error\n" + TRACEBACK, id="chatsrv"
        ),
        pytest.param(
            "2025-01-02 03:04:07,000 CRITICAL chatsrv.persister: turn m1: reply lost\n",
            id="critical",
        ),
        pytest.param(
            "[2025-01-02 03:04:07 +0000] [4242] [ERROR] Error in ASGI Framework\n" + TRACEBACK,
            id="hypercorn",
        ),
        pytest.param("[2025-01-02 03:04:07,000] ERROR in app: Exception on request\n", id="quart"),
        pytest.param(TRACEBACK, id="uncaught"),
        pytest.param(
            "  + Exception Group Traceback (most recent call last):\n"
            '  |   File "/srv/trio/_core/_run.py", line 1117, in __aexit__\n',
            id="exception-group",
        ),
        pytest.param("Exception ignored in: <coroutine object stream at 0x7f>\n", id="unraisable"),
    ],
)
@pytest.mark.parametrize("where", ["first", "last"])
def test_the_log_check_fails_on_a_traceback_or_an_error(problem: str, where: str) -> None:
    log = problem + QUIET_LOG if where == "first" else QUIET_LOG + problem
    assert_clean_log(QUIET_LOG)
    [found] = log_problems(log)
    assert problem.strip() in found
    with pytest.raises(AssertionError, match="unexpected in the server's log"):
        assert_clean_log(log)


def test_the_log_check_allows_only_the_errors_a_test_names() -> None:
    expected = (
        "2025-01-02 03:04:07,000 ERROR chatsrv.persister: turn m1: no final commit within 1.0 s"
    )
    other = "2025-01-02 03:04:07,001 ERROR chatsrv.persister: turn m2: the final commit failed\n"
    allowed = r" ERROR chatsrv\.persister: turn \S+: no final commit within "
    assert_clean_log(f"{QUIET_LOG}{expected}\n", allowed)
    assert log_problems(f"{QUIET_LOG}{expected}\n{other}{TRACEBACK}", (allowed,)) == [
        other + TRACEBACK.rstrip("\n")
    ]


async def test_a_process_log_is_checked_only_once_it_has_ended() -> None:
    log = ProcessLog()
    sender, receiver = trio.testing.memory_stream_one_way_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.collect, receiver)
            await sender.send_all(QUIET_LOG.encode())
            with pytest.raises(AssertionError, match="before the process has exited"):
                log.assert_clean()
            await sender.send_all(TRACEBACK.encode())
            await sender.aclose()
    with pytest.raises(AssertionError, match="ValueError: boom"):
        log.assert_clean()
