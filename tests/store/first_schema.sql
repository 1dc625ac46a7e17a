-- chatsrv's schema: the canonical definition, applied unchanged to PostgreSQL and to SQLite.
--
-- The store splits this file on semicolons and runs each statement on its own, so no statement
-- and no comment may contain one. Every statement is idempotent (IF NOT EXISTS). The application
-- sets every timestamp (strictly increasing within a process) and every id: there are no
-- defaults. SQLite accepts the PostgreSQL type names. Ids are stored there as canonical dashed
-- UUID strings, which its NUMERIC affinity for the name UUID leaves as text.

CREATE TABLE IF NOT EXISTS conversations (
    id UUID PRIMARY KEY,
    title TEXT NULL,
    model TEXT NULL,
    system_prompt TEXT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

-- One row per message. An assistant row is inserted as 'streaming' before the first byte of its
-- reply is sent, and updated once to its final status.
CREATE TABLE IF NOT EXISTS messages (
    id UUID PRIMARY KEY,
    conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    status TEXT NOT NULL CHECK (
        status IN ('streaming', 'complete', 'interrupted', 'timed_out', 'failed', 'cancelled')
    ),
    stop_reason TEXT NULL,
    error TEXT NULL,
    model TEXT NULL,
    usage JSONB NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- A conversation's messages in creation order.
CREATE INDEX IF NOT EXISTS messages_conversation_order
    ON messages (conversation_id, created_at, id);

-- Replies still streaming (or left so by a crash): few rows, found without a scan.
CREATE INDEX IF NOT EXISTS messages_streaming
    ON messages (status) WHERE status = 'streaming';

-- Newest conversations first.
CREATE INDEX IF NOT EXISTS conversations_created
    ON conversations (created_at, id);
