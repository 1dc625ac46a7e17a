"""The local journal: final replies the database could not take, kept on disk until it can.

When a persister cannot make its final commit in time (the database stays down, or shutdown's
deadline arrives), it appends the reply's final record here instead: one JSON line, written and
``fsync``-ed before the persister returns. Records that arrive while a write is under way go out
together in the next one, one fsync for all (group commit: with the database down, every ending
turn arrives at once; 200 of them took 90 ms one fsync each, 10 ms in two groups). A replayer
applies the records to the database once it answers — at startup and periodically — and removes
what it applied. Applying a record is one idempotent UPDATE by id, so a record applied twice (a
crash between applying and removing) does no harm. A reply is lost only if both the database and
this disk are lost.

Each process appends to a file of its own, ``<instance id>.jsonl`` in ``CHATSRV_JOURNAL_DIR``,
and holds an exclusive ``flock`` on it for as long as it lives. To replay its own records, a
process renames the file aside (``<instance id>.<n>.jsonl``) and starts a new one, so appends never
wait for the database. A replayer takes over any other file only if it can lock it, that is, only
once no live process holds it: several workers may share one directory, and a file is never read
while its owner may still append to it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import trio

from chatsrv import _metrics as metrics

log = logging.getLogger("chatsrv.journal")


@dataclass(frozen=True)
class FinalRecord:
    """A reply's final values, as the persister would have committed them."""

    message_id: str
    content: str
    status: str
    stop_reason: str | None
    error: str | None
    usage: dict[str, Any] | None


Apply = Callable[[FinalRecord], Awaitable[None]]


@dataclass
class _Group:
    """Records appended together: one write, one fsync."""

    lines: list[bytes] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    written: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None  # why the write failed, for each of its appenders


class Journal:
    """This process's journal file, and the replay of every file in the directory.

    All methods are called from the Trio thread; the file I/O runs in worker threads, serialised
    by a lock so that an append never interleaves with a replay of the same file.
    """

    def __init__(self, directory: Path, instance_id: str) -> None:
        self.directory = directory
        self.path = directory / f"{_safe(instance_id)}.jsonl"
        self._lock = trio.Lock()
        self._file: BinaryIO | None = None
        self._group = _Group()  # the records waiting for the next write
        self._writing: trio.Event | None = None  # set when the write under way is done
        self.writes = 0  # writes (and fsyncs) of appended records
        self._pending = 0  # records in this process's file
        self._rotations = 0  # files this process's records were moved to for replay
        self._unreplayed: set[str] = set()  # message ids this process journaled, not yet applied

    async def open(self) -> None:
        """Create the directory and this process's file, and lock the file for our lifetime."""
        await trio.to_thread.run_sync(self._open)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = _open_locked(self.path)
        _fsync_directory(self.directory)

    async def close(self) -> None:
        """Release the lock; remove the file if nothing is pending in it."""
        async with self._lock:
            file, self._file = self._file, None
            if file is not None:
                await trio.to_thread.run_sync(self._close, file)

    def _close(self, file: BinaryIO) -> None:
        if file.tell() == 0:
            self.path.unlink(missing_ok=True)
        file.close()

    def unreplayed(self) -> list[str]:
        """The replies this process journaled and has not yet written to the database: their
        rows are still this process's, and their leases are kept alive like a running turn's."""
        return list(self._unreplayed)

    @property
    def pending(self) -> int:
        """Records appended by this process and not yet applied."""
        return self._pending

    def holds_records(self) -> bool:
        """Whether any record, this process's or a dead one's, waits to be replayed."""
        if self._pending:
            return True
        for path in self.files():
            try:
                if path != self.path and path.stat().st_size > 0:
                    return True
            except FileNotFoundError:  # replayed and removed just now
                continue
        return False

    def files(self) -> list[Path]:
        """Every journal file in the directory, this process's included."""
        return sorted(path for path in self.directory.glob("*.jsonl") if path.is_file())

    async def append(self, record: FinalRecord) -> None:
        """Write ``record`` durably: it is on disk (fsync) when this returns.

        Appends commit in groups: records that arrive while a write is under way wait for it,
        then go out together, in one write and one fsync (when the database is down every
        ending turn comes here at once). Whoever finds no write under way writes the group.
        """
        if self._file is None:
            raise RuntimeError("the journal is closed")
        group = self._group
        group.lines.append(orjson.dumps(asdict(record)) + b"\n")
        group.message_ids.append(record.message_id)
        while not group.written.is_set():
            if self._writing is None:
                await self._write_group()
            else:
                await self._writing.wait()
        if group.error is not None:
            raise group.error

    async def _write_group(self) -> None:
        group, self._group = self._group, _Group()
        self._writing = trio.Event()
        try:
            # Shielded: the records of others wait on this write, so it is not given up
            # halfway. (It is bounded by the disk: the thread cannot be abandoned anyway.)
            with trio.CancelScope(shield=True):
                async with self._lock:
                    if self._file is None:
                        raise RuntimeError("the journal is closed")
                    await trio.to_thread.run_sync(_append, self._file, b"".join(group.lines))
            self._pending += len(group.lines)
            self._unreplayed.update(group.message_ids)
            metrics.JOURNAL_WAITING.set(len(self._unreplayed))
            self.writes += 1
        except Exception as exc:
            group.error = exc
        finally:
            group.written.set()
            writing, self._writing = self._writing, None
            writing.set()

    async def replay(self, apply: Apply) -> int:
        """Apply every record of every file that no live process holds; remove what was applied.

        ``apply`` raises when the database cannot take a record: replay stops there, and what
        was not applied stays on disk for the next attempt. Returns how many were applied.
        """
        # This process's records move to a file of their own first, under the lock but without
        # waiting on the database: a persister appending meanwhile never waits for a replay.
        async with self._lock:
            await trio.to_thread.run_sync(self._rotate)
        applied = 0
        for path in self.files():
            if path != self.path:
                applied += await self._replay_file(path, apply)
        return applied

    def _rotate(self) -> None:
        if self._file is None or self._pending == 0:
            return
        self._rotations += 1
        # The new file is opened and locked first, under a name replay does not look at: if
        # that fails, nothing has moved and appends go on into the old file.
        fresh = _open_locked(self.path.with_suffix(".jsonl.new"))
        os.rename(self.path, self.path.with_suffix(f".{self._rotations}.jsonl"))
        os.rename(self.path.with_suffix(".jsonl.new"), self.path)
        _fsync_directory(self.directory)
        full, self._file = self._file, fresh
        full.close()  # its lock goes: from now on it is replayed like any abandoned file
        self._pending = 0

    async def _replay_file(self, path: Path, apply: Apply) -> int:
        try:
            file = await trio.to_thread.run_sync(_lock_if_abandoned, path)
            if file is None:
                return 0  # its process is alive, another replay has it, or it is gone
            try:
                records = await trio.to_thread.run_sync(_read, file, path)
                for record in records:
                    await apply(record)
                    self._unreplayed.discard(record.message_id)
                    metrics.JOURNAL_WAITING.set(len(self._unreplayed))
                await trio.to_thread.run_sync(path.unlink)
            finally:
                file.close()
        except OSError:
            log.exception("cannot replay %s; it stays for the next attempt", path)
            return 0
        if records:
            log.info("replayed %d record(s) from %s", len(records), path.name)
        return len(records)

    async def reject(self, record: FinalRecord, *, reason: str) -> None:
        """Set aside a record the database refuses for good, in ``rejected.log`` beside the
        journal (never replayed, never deleted): an operator decides what becomes of it."""
        line = orjson.dumps({"reason": reason, **asdict(record)}) + b"\n"
        log.critical("the database refuses a journaled reply (%s); set aside: %s", reason, line)
        path = self.directory / "rejected.log"
        await trio.to_thread.run_sync(_append_to, path, line)


def _safe(instance_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in instance_id)


def _append(file: BinaryIO, line: bytes) -> None:
    file.write(line)
    file.flush()
    os.fsync(file.fileno())


def _open_locked(path: Path) -> BinaryIO:
    file = open(path, "ab")  # noqa: SIM115 (held open, and locked, until closed)
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        file.close()
        raise
    return file


def _append_to(path: Path, line: bytes) -> None:
    with open(path, "ab") as file:
        _append(file, line)


def _read(file: BinaryIO, path: Path) -> list[FinalRecord]:
    """The records of a locked file, read through its descriptor (its name may be gone)."""
    records = []
    for number, line in enumerate(file.read().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(FinalRecord(**orjson.loads(line)))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            # A line torn by a crash mid-write: everything before it was fsync-ed whole.
            log.error("%s:%d: skipping a damaged journal line", path, number)
    return records


def _lock_if_abandoned(path: Path) -> BinaryIO | None:
    """The file, open and locked, if no live process holds it and it is still in place."""
    try:
        file = open(path, "rb")  # noqa: SIM115 (returned to the caller, who closes it)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(file.fileno()).st_nlink == 0:
            # Another replay applied and removed it between our open and our lock.
            file.close()
            return None
    except BlockingIOError:
        file.close()
        return None
    except BaseException:
        file.close()
        raise
    return file


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
