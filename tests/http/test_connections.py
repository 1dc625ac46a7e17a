"""Connections that must close do close: every route, asked with ``Connection: close`` over
HTTP/1.1 and over HTTP/1.0, answers in full and then the server closes the connection (a client
that reads to end of file gets it). ``chatsrv/http/_close.py`` says why this needed a workaround.

Rules: a raw trio socket client against the real hypercorn of the ``chatsrv`` fixture; every
exchange under a time limit far below the old behaviour's (the connection stayed open for good).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from tests.server import Chatsrv

FORMS = {
    "http/1.1 close": b"HTTP/1.1\r\nHost: chatsrv\r\nConnection: close",
    "http/1.0": b"HTTP/1.0\r\nHost: chatsrv",
}


async def exchange(
    chatsrv: Chatsrv, form: bytes, method: str, path: str, body: Any = None
) -> bytes:
    """Send one raw request and read to end of file; the whole response."""
    url = chatsrv.client.base_url
    assert url.host and url.port
    payload = b"" if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
    head = b"%s %s %s" % (method.encode(), path.encode(), form)
    if payload:
        head += b"\r\nContent-Type: application/json\r\nContent-Length: %d" % len(payload)
    stream = await trio.open_tcp_stream(url.host, url.port)
    async with stream:
        await stream.send_all(head + b"\r\n\r\n" + payload)
        received = b""
        with trio.fail_after(10):  # the server used to keep it open for good
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    """The status, the headers and the body (de-chunked) of a whole response."""
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines)
    }
    if headers.get("transfer-encoding") == "chunked":
        chunks, rest = [], body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            rest = rest[size + 2 :]
        body = b"".join(chunks)
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
async def test_every_route_answers_in_full_then_closes(
    chatsrv: Chatsrv, upstream: Any, form: bytes
) -> None:
    conversation_id = await chatsrv.new_conversation()
    doomed = await chatsrv.new_conversation()
    with trio.fail_after(20):
        reply = await chatsrv.stream(conversation_id)
    message_id = reply.message_id
    requests: list[tuple[str, str, Any, int]] = [
        ("GET", "/healthz", None, 200),
        ("GET", "/readyz", None, 200),
        ("GET", "/v1/conversations", None, 200),
        ("POST", "/v1/conversations", {"title": "t"}, 201),
        ("POST", "/v1/conversations", b"{not json", 400),
        ("GET", f"/v1/conversations/{conversation_id}", None, 200),
        ("GET", f"/v1/conversations/{conversation_id}/messages", None, 200),
        ("POST", f"/v1/conversations/{conversation_id}/messages", {"content": "hi"}, 200),
        ("POST", f"/v1/conversations/{conversation_id}/messages", {"content": ""}, 422),
        ("GET", f"/v1/messages/{message_id}", None, 200),
        ("GET", f"/v1/messages/{message_id}/events", None, 200),
        ("POST", f"/v1/messages/{message_id}/cancel", None, 200),
        ("POST", f"/v1/messages/{message_id}/continue", None, 409),
        ("GET", "/v1/turns", None, 200),
        ("DELETE", f"/v1/conversations/{doomed}", None, 204),
        ("GET", "/v1/conversations/not-an-id", None, 404),
        ("GET", "/nowhere", None, 404),
    ]
    for method, path, body, expected in requests:
        status, headers, content = split(await exchange(chatsrv, form, method, path, body))
        where = f"{method} {path}"
        assert status == expected, (where, status, content[:200])
        assert headers.get("connection", "").lower() == "close", (where, headers)
        if headers.get("content-type", "").startswith("text/event-stream"):
            assert content.rstrip().split(b"\n\n")[-1].startswith(b"event: done"), where
        elif "content-length" in headers:
            assert len(content) == int(headers["content-length"]), where
