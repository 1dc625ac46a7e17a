"""The chat page: ``GET /`` and its two files under ``/page/``, shipped inside the package
(``page/``: plain HTML, CSS and one ES module; no build step, nothing from another origin).

Served with an ETag and ``Cache-Control: no-cache``, so a browser asks each time and gets
``304 Not Modified`` until chatsrv is upgraded. A Content-Security-Policy lets the page load only
its own files and talk only to its own server: whatever a model writes, the page shows it as
text, and the policy would stop a script that got in anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from quart import Blueprint, Response, send_file
from quart_schema import hide

from chatsrv._errors import NotFound

page = Blueprint("page", __name__)

_FILES: Final = Path(__file__).resolve().parent / "page"
_SERVED: Final = {"page.css": "text/css", "page.js": "text/javascript"}
_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


# Not part of the API's contract: the page is a client of it.
@page.get("/")
@hide
async def index() -> Response:
    return await _send("index.html", "text/html")


@page.get("/page/<name>")
@hide
async def asset(name: str) -> Response:
    if name not in _SERVED:
        raise NotFound("no such file")
    return await _send(name, _SERVED[name])


async def _send(name: str, mimetype: str) -> Response:
    response = await send_file(_FILES / name, mimetype=mimetype, conditional=True)
    response.headers.update(_HEADERS)
    return response
