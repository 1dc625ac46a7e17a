"""chatsrv: an LLM chat streaming server on Trio. A reply that has started is never lost."""

__version__ = "0.1.0"
