"""The chat page as HTTP serves it: ``GET /`` and its two files, from the package, with an ETag
(a second request with ``If-None-Match`` is a 304), a Content-Security-Policy that allows only
the page's own files and server, no key needed to load it, and no place in the API's contract.
(tests/page/ drives it in a browser.)"""

from __future__ import annotations

import pytest

from tests.server import Chatsrv, StartChatsrv

FILES = [("/", "text/html"), ("/page/page.js", "text/javascript"), ("/page/page.css", "text/css")]


@pytest.mark.parametrize(("path", "kind"), FILES)
async def test_the_page_is_served_with_an_etag_and_revalidated(
    chatsrv: Chatsrv, path: str, kind: str
) -> None:
    first = await chatsrv.client.get(path)
    assert first.status_code == 200
    assert first.headers["content-type"].startswith(kind)
    assert first.headers["cache-control"] == "no-cache"
    etag = first.headers["etag"]
    again = await chatsrv.client.get(path, headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""


async def test_the_page_may_load_only_its_own_files_and_talk_only_to_its_server(
    chatsrv: Chatsrv,
) -> None:
    page = await chatsrv.client.get("/")
    policy = dict(
        part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert 'src="/page/page.js"' in page.text and 'href="/page/page.css"' in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from another origin


async def test_an_unknown_file_is_a_404(chatsrv: Chatsrv) -> None:
    for path in ("/page/nope.js", "/page/..%2F_page.py", "/page/index.html"):
        response = await chatsrv.client.get(path)
        assert response.status_code == 404, path


async def test_the_page_needs_no_key_and_is_not_in_the_contract(
    start_chatsrv: StartChatsrv,
) -> None:
    keyed = await start_chatsrv(auth="keys")
    assert (await keyed.client.get("/")).status_code == 200
    assert (await keyed.client.get("/page/page.js")).status_code == 200
    assert (await keyed.client.get("/v1/conversations")).status_code == 401
    paths = (await keyed.client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths and not any(path.startswith("/page") for path in paths)
