"""The local journal on its own: durable appends, replay of this process's records and of those
left by dead processes, never of a live process's file."""

from __future__ import annotations

import fcntl
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from chatsrv._errors import StoreUnavailable
from chatsrv.engine import FinalRecord, Journal


class Applied(list[str]):
    """An ``apply`` for ``Journal.replay`` that records the message ids it is given."""

    async def __call__(self, record: FinalRecord) -> None:
        self.append(record.message_id)


def record(n: int) -> FinalRecord:
    return FinalRecord(f"m{n}", f"content {n}", "interrupted", "server_shutdown", None, None)


async def test_append_then_replay_applies_in_order_and_empties(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "me")
    await journal.open()
    await journal.append(record(1))
    await journal.append(record(2))
    assert journal.holds_records()
    lines = journal.path.read_bytes().splitlines()
    assert [orjson.loads(line)["message_id"] for line in lines] == ["m1", "m2"]

    applied: list[FinalRecord] = []

    async def apply(r: FinalRecord) -> None:
        applied.append(r)

    assert await journal.replay(apply) == 2
    assert applied == [record(1), record(2)]
    assert not journal.holds_records()
    assert journal.path.read_bytes() == b""
    await journal.close()
    assert not journal.path.exists()


async def test_a_failed_replay_keeps_every_record(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "me")
    await journal.open()
    await journal.append(record(1))
    await journal.append(record(2))

    async def database_down(r: FinalRecord) -> None:
        raise StoreUnavailable("down")

    with pytest.raises(StoreUnavailable):
        await journal.replay(database_down)
    assert journal.holds_records()
    applied = Applied()
    assert await journal.replay(applied) == 2
    assert applied == ["m1", "m2"]
    await journal.close()


async def test_a_dead_process_file_is_replayed_and_removed(tmp_path: Path) -> None:
    dead = Journal(tmp_path, "dead")
    await dead.open()
    await dead.append(record(7))
    # Its process is gone: the lock goes with its file descriptor (here: closed by hand).
    assert dead._file is not None
    dead._file.close()

    journal = Journal(tmp_path, "me")
    await journal.open()
    assert journal.holds_records()
    applied = Applied()
    assert await journal.replay(applied) == 1
    assert applied == ["m7"]
    assert not dead.path.exists()
    assert not journal.holds_records()
    await journal.close()


async def test_a_live_process_file_is_never_touched(tmp_path: Path) -> None:
    live = Journal(tmp_path, "live")
    await live.open()
    await live.append(record(3))
    journal = Journal(tmp_path, "me")
    await journal.open()

    async def apply(r: FinalRecord) -> None:
        raise AssertionError("a live process's record was replayed")

    assert await journal.replay(apply) == 0
    assert live.path.exists() and live.pending == 1
    await journal.close()
    await live.close()


async def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "crashed.jsonl"
    path.write_bytes(orjson.dumps(record(1).__dict__) + b"\n" + b'{"message_id": "m2", "con')
    journal = Journal(tmp_path, "me")
    await journal.open()
    applied = Applied()
    assert await journal.replay(applied) == 1
    assert applied == ["m1"]
    await journal.close()


async def test_the_file_is_locked_while_open(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "me")
    await journal.open()
    with pytest.raises(BlockingIOError):
        lock_from_another_process(journal.path)
    await journal.close()


def lock_from_another_process(path: Path) -> None:
    # flock locks belong to an open file description: a second open() behaves like another
    # process would.
    with open(path, "rb") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


async def test_appends_never_wait_for_a_replay(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "me")
    await journal.open()
    await journal.append(record(1))
    database_answers = trio.Event()
    applied: list[str] = []

    async def slow_apply(r: FinalRecord) -> None:
        await database_answers.wait()
        applied.append(r.message_id)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(journal.replay, slow_apply)
            await trio.testing.wait_all_tasks_blocked()
            # The replay waits on the database; a persister journaling now is not held up.
            await journal.append(record(2))
            database_answers.set()
        assert applied == ["m1"]
        assert journal.holds_records()
        assert await journal.replay(slow_apply) == 1
    assert applied == ["m1", "m2"]
    assert not journal.holds_records()
    await journal.close()


async def test_a_damaged_journal_directory_does_not_stop_recovery(tmp_path: Path) -> None:
    (tmp_path / "stray.jsonl").mkdir()  # not a file: passed over
    journal = Journal(tmp_path, "me")
    await journal.open()
    await journal.append(record(1))
    applied = Applied()
    assert await journal.replay(applied) == 1
    assert applied == ["m1"]
    await journal.close()


async def test_a_rejected_record_is_set_aside_not_lost(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "me")
    await journal.open()
    await journal.append(record(1))

    async def refuse(r: FinalRecord) -> None:
        await journal.reject(r, reason="refused")

    assert await journal.replay(refuse) == 1
    assert not journal.holds_records()
    [line] = (tmp_path / "rejected.log").read_bytes().splitlines()
    assert orjson.loads(line) == {"reason": "refused", **record(1).__dict__}
    await journal.close()


async def test_unreplayed_replies_are_known_until_applied(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "me")
    await journal.open()
    await journal.append(record(1))
    await journal.append(record(2))
    assert sorted(journal.unreplayed()) == ["m1", "m2"]

    async def apply_only_m1(r: FinalRecord) -> None:
        if r.message_id != "m1":
            raise StoreUnavailable("down")

    with pytest.raises(StoreUnavailable):
        await journal.replay(apply_only_m1)
    assert journal.unreplayed() == ["m2"]
    await journal.close()


async def test_appends_that_arrive_together_share_one_write(tmp_path: Path) -> None:
    """Group commit: the first append writes alone; every append that arrives while it writes
    waits, then all of them go out in one write and one fsync. Each returns once its own record
    is on disk, and every record is there once, whole."""
    journal = Journal(tmp_path, "me")
    await journal.open()
    returned: list[str] = []

    async def append(n: int) -> None:
        await journal.append(record(n))
        # Durable when append returns: the line is in the file already.
        assert f'"m{n}"'.encode() in journal.path.read_bytes()
        returned.append(f"m{n}")

    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(append, n)
    lines = journal.path.read_bytes().splitlines()
    assert sorted(orjson.loads(line)["message_id"] for line in lines) == sorted(returned)
    assert len(lines) == 50 and journal.pending == 50
    assert sorted(journal.unreplayed()) == sorted(returned)
    assert 2 <= journal.writes <= 3  # one alone, then the other 49 (or nearly) together
    await journal.close()


async def test_a_cancelled_writer_still_writes_its_group(tmp_path: Path) -> None:
    """The appender that is to write a group is cancelled while it waits for the file (a
    replay's rotation holds it): the write is not given up, so its record and the records of
    those waiting on it are all written, and nobody waits forever."""
    journal = Journal(tmp_path, "me")
    await journal.open()
    scope = trio.CancelScope()

    async def cancelled_writer() -> None:
        with scope:
            await journal.append(record(1))

    with trio.fail_after(10):
        await journal._lock.acquire()  # as a replay's rotation holds it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancelled_writer)
            await trio.testing.wait_all_tasks_blocked()  # the writer waits for the file
            nursery.start_soon(journal.append, record(2))
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            journal._lock.release()  # the rotation is over
    ids = [orjson.loads(line)["message_id"] for line in journal.path.read_bytes().splitlines()]
    assert ids == ["m1", "m2"]
    assert journal.pending == 2
    await journal.close()
