"""The store: conversations and messages in PostgreSQL or SQLite, behind a Trio-facing API.

It owns the database completely: the schema (made and upgraded by the migrations,
``_migrate.py``; written out in ``schema.sql`` and described to the query builder by
``_tables.py``), the users' API keys (``_keys.py``: only a digest is stored), the SQL
(``_statements.py``, and a turn's starting transactions in ``_starts.py``), the SQLAlchemy async
engine and its drivers (``_database.py``), the asyncio loop thread they run on (``_aio.py``), the
notifications between processes on PostgreSQL (``_bus.py``), the records it returns
(``_records.py``), and the error boundary: every driver exception leaves as ``StoreError``.
Nothing outside this package imports SQLAlchemy, asyncpg or aiosqlite.

May import: ``chatsrv._settings``, ``chatsrv._errors``. Nothing else of chatsrv.
"""

from ._bus import MAX_PAYLOAD_BYTES, Bus, Subscription
from ._migrate import head as schema_head
from ._records import LOCAL_USER_ID, ApiKey, Conversation, Message, RunningReply, TurnStart
from ._store import Store

__all__ = [
    "LOCAL_USER_ID",
    "MAX_PAYLOAD_BYTES",
    "ApiKey",
    "Bus",
    "Conversation",
    "Message",
    "RunningReply",
    "Store",
    "Subscription",
    "TurnStart",
    "schema_head",
]
