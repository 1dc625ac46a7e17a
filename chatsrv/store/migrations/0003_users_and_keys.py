"""Users and their API keys; every conversation has an owner.

Conversations made before this revision belong to the user ``local`` (the one every request is
when ``CHATSRV_AUTH=off``); an operator can give them to another user.

Revision ID: 0003
Revises: 0002
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# chatsrv.store._records.LOCAL_USER_ID, as it was when this revision was written.
LOCAL_USER_ID = "00000000-0000-0000-0000-000000000000"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE users (
            id UUID PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at TIMESTAMPTZ NOT NULL
        )
        """
    )
    users = sa.table(
        "users",
        sa.column("id", sa.String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")),
        sa.column("name", sa.Text),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    op.bulk_insert(users, [{"id": LOCAL_USER_ID, "name": "local", "created_at": datetime.now(UTC)}])
    op.execute(
        """
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            user_id UUID NOT NULL REFERENCES users (id),
            digest TEXT NOT NULL UNIQUE,
            created_at TIMESTAMPTZ NOT NULL,
            revoked_at TIMESTAMPTZ NULL
        )
        """
    )
    op.execute("CREATE INDEX api_keys_user ON api_keys (user_id)")

    if op.get_bind().dialect.name == "sqlite":
        _owned_conversations_on_sqlite()
    else:
        # The default only fills the existing rows: chatsrv always names the owner.
        op.execute(
            "ALTER TABLE conversations ADD COLUMN user_id UUID NOT NULL "
            f"DEFAULT '{LOCAL_USER_ID}' REFERENCES users (id)"
        )
        op.execute("ALTER TABLE conversations ALTER COLUMN user_id DROP DEFAULT")
    op.execute("DROP INDEX IF EXISTS conversations_created")
    op.execute("CREATE INDEX conversations_of_user ON conversations (user_id, created_at, id)")


def _owned_conversations_on_sqlite() -> None:
    """SQLite's ALTER TABLE cannot add a NOT NULL column that references another table without
    a default: the table is made anew, the procedure of https://www.sqlite.org/lang_altertable.html
    (section 7). chatsrv runs migrations with foreign keys off, as that procedure requires:
    dropping the old table would otherwise delete every message (ON DELETE CASCADE)."""
    bind = op.get_bind()
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError("SQLite migrations must run with foreign keys off")
    op.execute(
        """
        CREATE TABLE conversations_new (
            id UUID PRIMARY KEY,
            title TEXT NULL,
            model TEXT NULL,
            system_prompt TEXT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            user_id UUID NOT NULL REFERENCES users (id)
        )
        """
    )
    op.execute(
        "INSERT INTO conversations_new (id, title, model, system_prompt, created_at, user_id) "
        f"SELECT id, title, model, system_prompt, created_at, '{LOCAL_USER_ID}' FROM conversations"
    )
    op.execute("DROP TABLE conversations")
    op.execute("ALTER TABLE conversations_new RENAME TO conversations")
    problems = bind.exec_driver_sql("PRAGMA foreign_key_check").all()
    if problems:
        raise RuntimeError(f"foreign keys broken by the migration: {problems[:5]}")
