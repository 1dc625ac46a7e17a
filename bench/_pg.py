"""PostgreSQL for a benchmark run: a fresh database, created at the start and dropped at the end,
and the count of the statements chatsrv sends to it.

How statements are counted. ``pg_stat_statements`` is installable here but not preloaded
(``shared_preload_libraries`` is empty), so it collects nothing, and loading it would mean
restarting a server that others use. ``pg_stat_database.xact_commit``/``xact_rollback`` and
``pg_stat_user_tables.n_tup_*`` are cumulative counters that a backend flushes at most once a
second and otherwise only after 10 s idle or at exit (PostgreSQL 15), so they cannot be cut at the
edges of a few-second window. Instead, the bench database gets ``log_statement = 'all'`` (a
setting of that database only, so nothing else is logged), and the server's log file is read
between two byte offsets taken at the window's edges: every statement chatsrv's sessions
started in the window, exactly, each classified by its first keyword (``BEGIN``, ``SELECT``,
``INSERT``, ``UPDATE``, ``COMMIT``, ``ROLLBACK``...). One thing does not appear there: asyncpg's
empty query (``;``), which a connection ping sends between a ``BEGIN`` and a ``ROLLBACK`` (chatsrv
pings a pooled connection that sat idle for a second or more); each such pair is counted as one
ping, i.e. one more round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432"
LOG_CANDIDATES = sorted(Path("/var/log/postgresql").glob("postgresql-*-main.log"), reverse=True)
# "2026-11-28 07:14:15.155 UTC [20877] postgres@db LOG:  statement: BEGIN;"
# "... postgres@db LOG:  execute __asyncpg_stmt_2__: select $1::int"
_STATEMENT = re.compile(r"@(\S+) LOG:  (?:statement|execute [^:]*): \s*(\w+)?")


def _run(server: str, *statements: str, database: str = "postgres") -> list[Any]:
    async def main() -> list[Any]:
        conn = await asyncpg.connect(f"{server.rstrip('/')}/{database}", timeout=10)
        try:
            return [await conn.fetch(statement) for statement in statements]
        finally:
            await conn.close()

    return asyncio.run(main())


class StatementLog:
    """The PostgreSQL server's log file, read between offsets for one database's statements."""

    def __init__(self, path: Path, database: str) -> None:
        self.path = path
        self.database = database

    def offset(self) -> int:
        return self.path.stat().st_size

    def count(self, start: int, end: int) -> Counter[str]:
        with self.path.open("rb") as log:
            log.seek(start)
            text = log.read(end - start).decode(errors="replace")
        kinds: Counter[str] = Counter()
        for match in _STATEMENT.finditer(text):
            if match.group(1) == self.database:
                kinds[(match.group(2) or "EMPTY").upper()] += 1
        return kinds


def summarize_statements(kinds: Counter[str], turns: int) -> dict[str, Any]:
    """Per turn: statements by kind, all statements, round trips, transactions."""
    # A ping is BEGIN; <empty query>; ROLLBACK. chatsrv itself never rolls back on success.
    pings = kinds.get("ROLLBACK", 0)
    logged = sum(kinds.values())
    data = sum(n for kind, n in kinds.items() if kind not in {"BEGIN", "COMMIT", "ROLLBACK"})
    per = 1 / turns if turns else 0.0
    return {
        "source": "log_statement=all on the bench database, parsed from the server log",
        "turns": turns,
        "by_kind_per_turn": {kind: n * per for kind, n in sorted(kinds.items())},
        "statements_per_turn": logged * per,
        "data_statements_per_turn": data * per,
        "pre_pings_per_turn": pings * per,
        "round_trips_per_turn": (logged + pings) * per,
        "transactions_per_turn": (kinds.get("COMMIT", 0) + kinds.get("ROLLBACK", 0)) * per,
    }


class Database:
    """A fresh database on ``server``, dropped by :meth:`drop`."""

    def __init__(self, server: str = DEFAULT_SERVER) -> None:
        self.server = server.rstrip("/")
        self.name = f"chatsrv_bench_{secrets.token_hex(4)}"
        _run(self.server, f'CREATE DATABASE "{self.name}"')
        self.log: StatementLog | None = None
        for path in LOG_CANDIDATES:
            with contextlib.suppress(OSError):
                with path.open("rb"):
                    pass
                _run(self.server, f"ALTER DATABASE \"{self.name}\" SET log_statement = 'all'")
                self.log = StatementLog(path, self.name)
                break

    @property
    def url(self) -> str:
        return f"{self.server}/{self.name}"

    def backend_pids(self) -> list[int]:
        rows = _run(
            self.server,
            f"SELECT pid FROM pg_stat_activity WHERE datname = '{self.name}' "
            "AND application_name = 'chatsrv'",
        )[0]
        return [row["pid"] for row in rows]

    def drop(self) -> None:
        _run(self.server, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_database(server: str = DEFAULT_SERVER) -> Iterator[Database]:
    database = Database(server)
    try:
        yield database
    finally:
        database.drop()
