"""Who is asking: the user of a request's API key (``CHATSRV_AUTH=keys``), or the one local user
(``off``), and the refusal to serve keyless on anything but loopback.

A key's verdict is kept for ``FRESH_S``: a request pays a database read at most that often per
key and process, and a revoked key is refused within it on every process. When the database
does not answer, a key accepted within ``STALE_S`` is still accepted (a reply may be resumed
through a blink of the database); an unknown key never is.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

import trio

from chatsrv._errors import StoreUnavailable, Unauthorized, UnsafeSettings
from chatsrv.store import LOCAL_USER_ID, Store

FRESH_S: Final = 0.5
STALE_S: Final = 60.0
# Keys remembered per process; past this the memory is cleared (and refilled from the database).
_REMEMBERED: Final = 10_000

CHALLENGE: Final = 'Bearer realm="chatsrv"'


@dataclass
class _Verdict:
    user: str
    at: float


class Authenticator:
    """The user of a request, from its ``Authorization`` header."""

    def __init__(self, store: Store, *, keys: bool) -> None:
        self._store = store
        self._keys = keys
        self._known: dict[str, _Verdict] = {}

    async def user(self, authorization: str | None) -> str:
        """The user's id; :class:`Unauthorized` without a valid key when keys are on."""
        if not self._keys:
            await trio.lowlevel.checkpoint()
            return LOCAL_USER_ID
        key = _bearer(authorization)
        now = trio.current_time()
        known = self._known.get(key)
        if known is not None and now - known.at < FRESH_S:
            await trio.lowlevel.checkpoint()
            return known.user
        try:
            user = await self._store.key_user(key)
        except StoreUnavailable:
            if known is not None and now - known.at < STALE_S:
                return known.user
            raise
        if user is None:
            self._known.pop(key, None)
            raise Unauthorized("the API key is not valid (unknown or revoked)")
        if len(self._known) >= _REMEMBERED:
            self._known.clear()
        self._known[key] = _Verdict(user, trio.current_time())
        return user


def _bearer(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    return key


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is on this machine only. A Unix socket's
    path counts as loopback; a name other than localhost does not."""
    host = host.strip("[]")
    if host == "localhost" or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_keyless(binds: list[str]) -> None:
    """Raise :class:`UnsafeSettings` if any of ``binds`` (host:port, or a Unix socket's path) is
    not loopback: with ``CHATSRV_AUTH=off`` anyone who can reach chatsrv is its user."""
    exposed = [bind for bind in binds if not is_loopback(_host(bind))]
    if exposed:
        raise UnsafeSettings(
            f"refusing to serve on {', '.join(exposed)} with CHATSRV_AUTH=off: anyone "
            "who can reach it could read and write every conversation. Set CHATSRV_AUTH=keys "
            "(and make keys with `chatsrv keys create --user NAME`), or listen on 127.0.0.1."
        )


def _host(bind: str) -> str:
    if bind.startswith("unix:"):
        return bind.removeprefix("unix:")
    host, _, _ = bind.rpartition(":")
    return host or bind
