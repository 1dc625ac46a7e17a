"""The store's tables as SQLAlchemy Core objects, and the file that shows them.

The migrations (``migrations/``) make the schema, and ``schema.sql`` at the repository root
writes it out (DDL is never generated from these objects); the :class:`~sqlalchemy.Table`
objects here only describe it to the query builder, with the types that make values round-trip
identically on PostgreSQL and on SQLite. Only the store imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, Text
from sqlalchemy.dialects import postgresql

MESSAGE_ROLES: Final = ("system", "user", "assistant")
MESSAGE_STATUSES: Final = (
    "streaming",
    "complete",
    "interrupted",
    "timed_out",
    "failed",
    "cancelled",
)

# An id is a ``str`` everywhere: a native UUID on PostgreSQL, and on SQLite the canonical dashed
# string (SQLite's NUMERIC affinity for the type name UUID would turn some 32-hex forms into
# numbers).
Id = String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")
# TIMESTAMPTZ on PostgreSQL; on SQLite a fixed-width text that sorts in time order (the zone is
# not stored: every timestamp is UTC).
Timestamp = DateTime(timezone=True)
# none_as_null: a missing usage is SQL NULL, not the JSON text 'null'.
Usage = JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", Id, primary_key=True),
    Column("name", Text, nullable=False),
    Column("created_at", Timestamp, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True),
    Column("user_id", Id, nullable=False),
    Column("digest", Text, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("revoked_at", Timestamp, nullable=True),
)

conversations = Table(
    "conversations",
    metadata,
    Column("id", Id, primary_key=True),
    Column("title", Text, nullable=True),
    Column("model", Text, nullable=True),
    Column("system_prompt", Text, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("user_id", Id, nullable=False),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True),
    Column("conversation_id", Id, nullable=False),
    Column("role", Text, nullable=False),
    Column("content", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("stop_reason", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("model", Text, nullable=True),
    Column("usage", Usage, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("parent_id", Id, nullable=True),
    Column("idempotency_key", Text, nullable=True),
    Column("owner", Text, nullable=True),
    Column("lease_expires_at", Timestamp, nullable=True),
)


def schema_path() -> Path:
    """Where ``schema.sql`` is: the repository root, else the copy shipped beside this module."""
    here = Path(__file__).resolve().parent
    root = here.parents[1] / "schema.sql"
    if root.is_file():
        return root
    return here / "schema.sql"


def schema_statements(sql: str | None = None) -> list[str]:
    """The statements of ``schema.sql`` (or of ``sql``), one string each, comments removed.

    The file is split on ``;``: asyncpg runs one statement per call, and SQLite's driver too.
    (Only the tests apply it, to check it against the migrations.)
    """
    if sql is None:
        sql = schema_path().read_text(encoding="utf-8")
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]
