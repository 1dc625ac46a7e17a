"""API keys: how one is made, and the only thing of it that is stored.

A key is ``csk_`` + its id (12 hex digits, public: ``chatsrv keys list`` shows it, ``revoke``
takes it) + ``_`` + 256 random bits (URL-safe base64). The database keeps its id and a digest:
HMAC-SHA-256 of the whole key under a fixed, public key that only separates these digests from
any other SHA-256 of the same bytes.

Why a fast hash is enough: a slow password hash (bcrypt, scrypt, Argon2) exists to make guessing
a low-entropy secret from a stolen digest expensive. A key holds 256 random bits; no number of
guesses at any hash speed comes near it, so a stolen table of digests gives nothing away, and a
request pays microseconds, not the tens of milliseconds a password hash would cost it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

PREFIX: Final = "csk_"
_DOMAIN: Final = b"chatsrv api key v1"


def new_key() -> tuple[str, str]:
    """A new key's id, and the key."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def digest(key: str) -> str:
    """What the database stores of ``key`` (and looks it up by)."""
    return hmac.new(_DOMAIN, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
