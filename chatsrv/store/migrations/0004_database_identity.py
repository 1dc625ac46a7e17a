"""The database's own id: the local journal is kept per database, so that a reply journaled for
one database is never replayed into another that shares the journal's directory.

Revision ID: 0004
Revises: 0003
"""

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE database_identity (
            id UUID PRIMARY KEY,
            created_at TIMESTAMPTZ NOT NULL
        )
        """
    )
    identity = sa.table(
        "database_identity",
        sa.column("id", sa.String(36).with_variant(postgresql.UUID(as_uuid=False), "postgresql")),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    op.bulk_insert(identity, [{"id": str(uuid.uuid4()), "created_at": datetime.now(UTC)}])
