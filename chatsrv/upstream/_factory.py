"""``open_provider``: the provider the settings name, opened for the service and closed after it.

It is the one module of the layer that knows every provider, so that no provider module imports
another (each imports only ``_provider.py``'s interface and value types).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import trio

from chatsrv._settings import Settings

from ._provider import Provider

logger = logging.getLogger(__name__)

# How long closing a provider at shutdown may take (it closes pooled upstream connections).
CLOSE_DEADLINE_S = 5.0


@contextlib.asynccontextmanager
async def open_provider(settings: Settings) -> AsyncIterator[Provider]:
    """The provider ``settings.provider`` names, closed (pooled connections and all) on exit."""
    provider: Provider
    # Imported here, not at the top: the demo provider (the default on a fresh machine) should
    # not pay for importing the SDK.
    if settings.provider == "openai":
        from ._openai import OpenAIProvider

        provider = OpenAIProvider(settings)
    else:
        from ._demo import DemoProvider

        provider = DemoProvider(settings)
    try:
        yield provider
    finally:
        # Cleanup may run inside a cancelled scope (shutdown): shield it, with a deadline.
        with trio.move_on_after(CLOSE_DEADLINE_S, shield=True) as scope:
            await provider.aclose()
        if scope.cancelled_caught:
            logger.warning(
                "closing the %s provider took over %.0f s", provider.name, CLOSE_DEADLINE_S
            )
