"""The ``demo`` provider: an offline, deterministic stand-in for a model, so that ``chatsrv serve``
works on a fresh machine with no upstream configured.

The reply is derived from the last user message alone (a SHA-256 seed, never Python's randomised
``hash``): the same prompt always streams the same deltas, different prompts stream different
ones. Deltas are word-ish tokens with their leading space, as a real tokenizer would send them,
paced at ``settings.demo_token_interval_s`` each with ``trio.sleep`` (a checkpoint even at 0 s,
so a turn on the demo provider can always be cancelled).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable

import trio

from chatsrv._settings import Settings

from ._provider import Completion, Prompt

_OPENERS = (
    "Good question about {topic}.",
    "Here is a short take on {topic}.",
    "Let me think about {topic} for a moment.",
    "Thanks for asking about {topic}; this is the offline demo model, so take it lightly.",
    "Speaking as chatsrv's demo model, {topic} is a fine thing to ask about.",
)
_SENTENCES = (
    "The short answer is that it depends on what you need most.",
    "A useful first step is to write down the constraints you cannot change.",
    "Most of the time the simplest approach that works is also the easiest one to maintain.",
    "It helps to try a small experiment before committing to a design.",
    "Measure before you optimise, and keep the measurement around for later.",
    "If something can fail halfway, decide up front what the other side should see.",
    "Timeouts and cancellation deserve as much thought as the happy path.",
    "Write the test that proves the behaviour you care about, then make it pass.",
    "Small, well-named pieces are easier to reason about than one clever one.",
    "When in doubt, prefer the option that is easy to undo.",
    "Look at how others solved the same problem before inventing a new answer.",
    "A reply that has started streaming should never be lost, even when the client goes away.",
)
_CLOSERS = (
    "I hope that helps.",
    "Let me know if you want more detail on any part of this.",
    "Happy to go deeper on {topic} if that is useful.",
)
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]{2,}")
_TOKEN = re.compile(r"\s*\S+")


def reply_tokens(text: str) -> list[str]:
    """The deltas the demo model streams in answer to ``text``: a few sentences, ~40-100 tokens."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    # The topic: the message's three longest words, in the order they appear.
    words = list(dict.fromkeys(_WORD.findall(text)))
    longest = set(sorted(words, key=len, reverse=True)[:3])
    topic = " ".join(w for w in words if w in longest) or "that"
    sentences = [rng.choice(_OPENERS)]
    sentences += rng.sample(_SENTENCES, rng.randint(3, 5))
    sentences.append(rng.choice(_CLOSERS))
    return _TOKEN.findall(" ".join(sentences).format(topic=topic))


class DemoProvider:
    """Streams a canned, prompt-dependent reply at a steady pace; never touches the network."""

    name = "demo"

    def __init__(self, settings: Settings) -> None:
        self._interval_s = settings.demo_token_interval_s

    async def aclose(self) -> None:
        pass

    async def generate(self, prompt: Prompt, emit: Callable[[str], None]) -> Completion:
        last_user = next(
            (m["content"] for m in reversed(prompt.messages) if m.get("role") == "user"), ""
        )
        tokens = reply_tokens(last_user)
        for token in tokens:
            await trio.sleep(self._interval_s)
            emit(token)
        # Rough counts, in the shape OpenAI reports them.
        prompt_tokens = sum(len(m.get("content", "").split()) + 3 for m in prompt.messages)
        return Completion(
            finish_reason="stop",
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
        )
