"""Durability: a reply's parent, its Idempotency-Key, and the lease of the process writing it.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for column in (
        "parent_id UUID NULL",
        "idempotency_key TEXT NULL",
        "owner TEXT NULL",
        "lease_expires_at TIMESTAMPTZ NULL",
    ):
        op.execute(f"ALTER TABLE messages ADD COLUMN {column}")
    # Streaming rows are now found by their lease.
    op.execute("DROP INDEX messages_streaming")
    op.execute(
        "CREATE INDEX messages_streaming ON messages (lease_expires_at) WHERE status = 'streaming'"
    )
    op.execute(
        "CREATE UNIQUE INDEX messages_idempotency ON messages (conversation_id, idempotency_key) "
        "WHERE idempotency_key IS NOT NULL"
    )
