"""The upstream: the model that writes the replies, as the turn engine sees it.

It owns the ``Provider`` interface and its value types (``_provider.py``), the provider for any
OpenAI-compatible endpoint through the official SDK (``_openai.py``) and its lean HTTP/1.1
transport (``_http11.py``, ``_framing.py``), the offline demo model (``_demo.py``), and
``open_provider``, which picks one from the settings (``_factory.py``). Nothing outside this
package imports openai or httpx2; importing the package does not import the SDK.

May import: ``chatsrv._settings``, ``chatsrv._errors``. Nothing else of chatsrv.
"""

from ._factory import open_provider
from ._provider import Completion, Prompt, Provider

__all__ = ["Completion", "Prompt", "Provider", "open_provider"]
