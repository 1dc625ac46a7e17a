"""What one benchmark stream asks of the fake upstream, and what its reply must then be.

The client cannot talk to the fake directly: chatsrv stands between them. But chatsrv forwards
the user's message to the upstream as the last prompt message, so the client writes the stream's
script into its message (``bench:{"tokens": 200, "interval_s": 0.02}``) and the fake reads it
from the request. Every stream can thus have its own script, with no side channel and no state
shared between the processes.

The tokens are deterministic, so the client knows the exact reply it must receive and that the
database must hold. They include multi-byte characters, quotes, a tab and a newline, so that a
relay that mangles JSON escaping or splits a UTF-8 sequence is caught.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import orjson

PREFIX = "bench:"

WORDS = (
    " The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ",",
    " naïve", " café", ' "quoted"', " tab\t", "\n", " ünïcødé", " 🙂", " back\\slash", ".",
)  # fmt: skip


def token(k: int) -> str:
    """The k-th token (from 0) of every reply."""
    return WORDS[k % len(WORDS)]


def reply(n: int) -> str:
    """The text of a reply of ``n`` tokens."""
    return "".join(token(k) for k in range(n))


def tokens_in(text: str) -> int:
    """How many whole tokens a received prefix of a reply holds."""
    count = 0
    for count, length in enumerate(itertools.accumulate(len(token(k)) for k in itertools.count())):
        if length > len(text):
            return count
    raise AssertionError("unreachable")


# The sizes of the upstream's writes when it sends in bursts, in turn: irregular, as real
# providers' are (several tokens in one read, then a longer gap).
BURSTS = (3, 1, 5, 2, 6, 1, 4, 2)


@dataclass(frozen=True)
class Script:
    tokens: int = 200
    interval_s: float = 0.02  # between two tokens; the first goes out at once
    # Cut the connection (a body that ends mid-stream) once this many tokens were sent.
    fail_after: int | None = None
    # Tokens per write, at most: 1 sends each when it is due; more sends them in groups of the
    # sizes of BURSTS (capped at this), each when its last token is due. The rate, the tokens
    # and the last token's time stay those of the steady stream.
    burst: int = 1

    def group(self, j: int, k: int) -> int:
        """The size of the j-th write, which starts with token k."""
        return max(1, min(BURSTS[j % len(BURSTS)], self.burst, self.tokens - k))

    @property
    def upstream_duration_s(self) -> float:
        """How long the fake itself takes from its first token to its last, by its schedule."""
        return max(self.tokens - 1, 0) * self.interval_s

    def message(self) -> str:
        return PREFIX + orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_request(cls, request: dict[str, Any], default: Script) -> Script:
        """The script in the last user message of a chat completion request, else ``default``."""
        for message in reversed(request.get("messages") or []):
            content = message.get("content")
            if message.get("role") == "user" and isinstance(content, str):
                if content.startswith(PREFIX):
                    return cls(**orjson.loads(content[len(PREFIX) :]))
                break
        return default
