"""The model upstream as the turn engine sees it: the ``Provider`` interface, its value types, and
``open_provider``, the factory that picks one from the settings and closes it afterwards.

A provider streams one completion: ``generate`` calls ``emit(text)`` synchronously, in order, once
per non-empty content delta, as soon as the delta is parsed (no batching), and returns a
``Completion`` when the upstream finished the stream properly. Every failure is an
``UpstreamError`` whose ``code`` says how it failed; ``trio.Cancelled`` passes through untouched,
and cancelling ``generate`` closes the upstream's HTTP response, so a cancelled turn stops paying
for tokens.

Two providers exist: ``openai`` (``_openai.py``, any OpenAI-compatible endpoint through the
official SDK) and ``demo`` (``_demo.py``, offline and deterministic). Only ``_openai.py`` imports
the SDK or its HTTP client.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from chatsrv._settings import Settings

logger = logging.getLogger(__name__)

# How long closing a provider at shutdown may take (it closes pooled upstream connections).
CLOSE_DEADLINE_S = 5.0


@dataclass(frozen=True)
class Prompt:
    """What one turn asks the upstream for."""

    model: str
    messages: list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]


@dataclass(frozen=True)
class Completion:
    """How a stream that ended properly ended."""

    finish_reason: str  # the upstream's finish_reason ("stop", "length", ...)
    usage: dict[str, Any] | None  # the upstream's usage object, if it sent one


class Provider(Protocol):
    name: str  # "openai" | "demo"

    async def generate(self, prompt: Prompt, emit: Callable[[str], None]) -> Completion:
        """Stream one completion, calling ``emit`` once per non-empty content delta.

        Raises ``UpstreamError`` on every upstream failure; lets ``trio.Cancelled`` through.
        """
        ...

    async def aclose(self) -> None:
        """Release the provider's connections; it is not used afterwards."""
        ...


@contextlib.asynccontextmanager
async def open_provider(settings: Settings) -> AsyncIterator[Provider]:
    """The provider ``settings.provider`` names, closed (pooled connections and all) on exit."""
    provider: Provider
    # Imported here, not at the top: ``_openai`` imports this module's value types, and the demo
    # provider (the default on a fresh machine) should not pay for importing the SDK.
    if settings.provider == "openai":
        from chatsrv._openai import OpenAIProvider

        provider = OpenAIProvider(settings)
    else:
        from chatsrv._demo import DemoProvider

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
