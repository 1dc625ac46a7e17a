"""The model upstream as the turn engine sees it: the ``Provider`` interface and its value types.

A provider streams one completion: ``generate`` calls ``emit(text)`` synchronously, in order, once
per non-empty content delta, as soon as the delta is parsed (no batching), and returns a
``Completion`` when the upstream finished the stream properly. Every failure is an
``UpstreamError`` whose ``code`` says how it failed; ``trio.Cancelled`` passes through untouched,
and cancelling ``generate`` closes the upstream's HTTP response, so a cancelled turn stops paying
for tokens.

Two providers exist: ``openai`` (``_openai.py``, any OpenAI-compatible endpoint through the
official SDK) and ``demo`` (``_demo.py``, offline and deterministic); ``_factory.py`` opens the
one the settings name. Only ``_openai.py`` and ``_http11.py`` import the SDK or its HTTP client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


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
