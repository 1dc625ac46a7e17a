"""The schema's versions: Alembic migrations (``migrations/``), run by chatsrv itself.

A database is at one of the revisions in ``migrations/`` (Alembic's ``alembic_version`` table
says which), or empty. A database made before chatsrv had migrations has no version table: it is
recognised by its columns and stamped with the revision it matches before anything else runs.
``schema.sql`` at the repository root is the schema at head, written out for readers; a test
fails when it and the migrations disagree.

Everything here is synchronous, on a SQLAlchemy ``Connection`` inside one transaction: the store
calls it through ``AsyncConnection.run_sync`` on its asyncio loop, holding a lock that serialises
workers starting at once. On SQLite the connection has foreign keys off, as SQLite's procedure
for changing a table requires.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from chatsrv._errors import SchemaMismatch

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# The revision of each schema chatsrv had before it had migrations, by a column it added.
_UNVERSIONED = (("lease_expires_at", "0002"), ("id", "0001"))
# The revision of tables made after that, but not by the migrations.
UNPLACED = "unversioned"


@cache
def _script() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS), version_locations=[str(MIGRATIONS)])


def head() -> str:
    """The newest revision."""
    revision = _script().get_current_head()
    assert revision is not None, "no migrations"
    return revision


@dataclass(frozen=True)
class Version:
    """Where a database stands: its revision (None: empty) and whether it is chatsrv's head;
    ``stamped`` when the database says so itself (else the revision is read off its tables)."""

    revision: str | None
    stamped: bool = True

    @property
    def empty(self) -> bool:
        return self.revision is None

    @property
    def current(self) -> bool:
        return self.revision == head()

    @property
    def known(self) -> bool:
        """Whether this chatsrv has the database's revision (a newer chatsrv may have made it)."""
        return self.revision is None or self.revision in _revisions()


@cache
def _revisions() -> frozenset[str]:
    return frozenset(script.revision for script in _script().walk_revisions())


def version(conn: Connection) -> Version:
    """The revision of the database, or of the unversioned schema it holds."""
    stamped = MigrationContext.configure(conn).get_current_revision()
    if stamped is not None:
        return Version(stamped)
    return Version(_unversioned(conn), stamped=False)


def _unversioned(conn: Connection) -> str | None:
    inspector = inspect(conn)
    if not inspector.has_table("messages"):
        return None
    if inspector.has_table("users"):
        # Made after migrations existed, but not by them (schema.sql applied by hand?): which
        # revision it matches cannot be told from its columns.
        return UNPLACED
    columns = {column["name"] for column in inspector.get_columns("messages")}
    return next(revision for column, revision in _UNVERSIONED if column in columns)


def upgrade(conn: Connection) -> list[str]:
    """Bring the database to head; return the revisions applied, oldest first."""
    script = _script()
    context = MigrationContext.configure(conn)
    current = version(conn)
    if current.revision == UNPLACED:
        raise SchemaMismatch(
            "the database has chatsrv's tables but no migration version (alembic_version): "
            "they were not made by chatsrv; make them with `chatsrv db upgrade` on an empty "
            "database"
        )
    if not current.known:
        raise SchemaMismatch(
            f"the database's schema is at revision {current.revision}, newer than this "
            f"chatsrv's {head()}: run a newer chatsrv"
        )
    if not current.stamped and current.revision is not None:
        logger.info("the database predates migrations: its schema is revision %s", current.revision)
        context.stamp(script, current.revision)
    applied: list[str] = []

    def upgrade_revs(revision: Any, _context: MigrationContext) -> Any:
        return script._upgrade_revs("head", revision)

    def applied_one(
        ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any], run_args: Any
    ) -> None:
        applied.append(str(step.up_revision_id))
        logger.info("applied migration %s", step.up_revision_id)

    environment = EnvironmentContext(Config(), script, fn=upgrade_revs, destination_rev="head")
    with environment:
        environment.configure(connection=conn, on_version_apply=applied_one)
        environment.run_migrations()
    return applied
