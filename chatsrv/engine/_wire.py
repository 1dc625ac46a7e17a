"""What chatsrv processes say to each other about running turns, over the store's bus
(PostgreSQL's LISTEN/NOTIFY): the channels and the payloads, one JSON object each.

    chatsrv_control           every process listens; the process running the turn acts
        {"tail": id, "from": n}   publish reply ``id`` from character n on, for a while
        {"cancel": id}            cancel reply ``id``
    chatsrv_reply_<id hex>    one reply's followers listen; its owner publishes while asked
        {"length": n}             the owner holds n characters (its answer to each "tail")
        {"at": n, "text": s}      the characters from offset n on (several such, in order)
        {"end": true}             the reply is final and saved: read the row

A follower asks again every ``TAIL_RENEW_S``; an owner nobody asked for ``TAIL_LEASE_S`` stops
publishing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import orjson

from chatsrv.store import MAX_PAYLOAD_BYTES

CONTROL: Final = "chatsrv_control"
TAIL_RENEW_S: Final = 2.0
TAIL_LEASE_S: Final = 3 * TAIL_RENEW_S


def reply_channel(message_id: str) -> str:
    return "chatsrv_reply_" + message_id.replace("-", "")


def encode(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def decode(payload: str) -> dict[str, Any]:
    message = orjson.loads(payload)
    if not isinstance(message, dict):
        raise ValueError(f"not a message: {payload[:80]!r}")
    return message


def pieces(text: str, at: int) -> Iterator[str]:
    """``{"at": ..., "text": ...}`` payloads for ``text`` starting at offset ``at``, each one
    within a notification's limit."""
    size = 2000  # characters: most text fits at once; JSON escapes and UTF-8 may need halving
    start = 0
    while start < len(text):
        chunk = text[start : start + size]
        payload = encode({"at": at + start, "text": chunk})
        if len(payload.encode()) > MAX_PAYLOAD_BYTES and size > 1:
            size //= 2
            continue
        yield payload
        start += len(chunk)
