"""The first released schema: conversations and their messages.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE conversations (
            id UUID PRIMARY KEY,
            title TEXT NULL,
            model TEXT NULL,
            system_prompt TEXT NULL,
            created_at TIMESTAMPTZ NOT NULL
        )
        """
    )
    op.execute(
        """
        CREATE TABLE messages (
            id UUID PRIMARY KEY,
            conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            status TEXT NOT NULL CHECK (
                status IN (
                    'streaming', 'complete', 'interrupted', 'timed_out', 'failed', 'cancelled'
                )
            ),
            stop_reason TEXT NULL,
            error TEXT NULL,
            model TEXT NULL,
            usage JSONB NULL,
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL
        )
        """
    )
    op.execute(
        "CREATE INDEX messages_conversation_order ON messages (conversation_id, created_at, id)"
    )
    op.execute("CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming'")
    op.execute("CREATE INDEX conversations_created ON conversations (created_at, id)")
