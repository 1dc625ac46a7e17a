-- chatsrv's schema at the newest migration (chatsrv/store/migrations), for readers: chatsrv makes
-- and upgrades a database with the migrations (`chatsrv db upgrade`), and a test fails when this
-- file and they disagree. The same text holds on PostgreSQL and on SQLite.
--
-- No statement and no comment may contain a semicolon (tools split this file on them). The
-- application sets every timestamp (strictly increasing within a process) and every id: there
-- are no defaults. SQLite accepts the PostgreSQL type names. Ids are stored there as canonical
-- dashed UUID strings, which its NUMERIC affinity for the name UUID leaves as text.

-- The database's own id, made once by its first migration to hold it: the local journal keeps
-- each database's replies apart (CHATSRV_JOURNAL_DIR/<id>/), whatever URL reaches it.
CREATE TABLE IF NOT EXISTS database_identity (
    id UUID PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL
);

-- Whom conversations belong to. The user 'local' (id 00000000-0000-0000-0000-000000000000) is
-- every request when CHATSRV_AUTH=off, and owns the conversations made before users existed.
CREATE TABLE IF NOT EXISTS users (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL
);

-- API keys: only a keyed hash of each is stored (chatsrv/_keys.py says why that is enough).
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    user_id UUID NOT NULL REFERENCES users (id),
    digest TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ NULL
);

CREATE INDEX IF NOT EXISTS api_keys_user
    ON api_keys (user_id);

CREATE TABLE IF NOT EXISTS conversations (
    id UUID PRIMARY KEY,
    title TEXT NULL,
    model TEXT NULL,
    system_prompt TEXT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    user_id UUID NOT NULL REFERENCES users (id)
);

-- One row per message. An assistant row is inserted as 'streaming' before the first byte of its
-- reply is sent, checkpointed while it streams, and updated once to its final status.
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
    updated_at TIMESTAMPTZ NOT NULL,
    -- An assistant row: the user message it answers.
    parent_id UUID NULL,
    -- An assistant row: the Idempotency-Key of the request that started it (cleared after 24 h).
    idempotency_key TEXT NULL,
    -- While 'streaming': the process writing it, and until when its lease holds. A sweeper
    -- marks rows whose lease expired (their process died) 'interrupted'/'server_crash'.
    owner TEXT NULL,
    lease_expires_at TIMESTAMPTZ NULL
);

-- A conversation's messages in creation order.
CREATE INDEX IF NOT EXISTS messages_conversation_order
    ON messages (conversation_id, created_at, id);

-- Replies still streaming (or left so by a crash): few rows, found by lease without a scan.
CREATE INDEX IF NOT EXISTS messages_streaming
    ON messages (lease_expires_at) WHERE status = 'streaming';

-- One turn per Idempotency-Key in a conversation.
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency
    ON messages (conversation_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- A user's conversations, newest first.
CREATE INDEX IF NOT EXISTS conversations_of_user
    ON conversations (user_id, created_at, id);
