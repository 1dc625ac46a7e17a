"""``Http11Transport``: HTTP/1.1 against real loopback servers, through httpx2 and the openai SDK.

Rules: every server listens on 127.0.0.1 with port 0 and is written here with ``trio.serve_tcp``
and raw bytes, so each test controls the exact bytes, their splits and when the connection ends.
Every test runs under a ``trio.fail_after``. Nothing sleeps to let things settle: a server that
must wait for the client to have consumed what it sent waits for ``wait_all_tasks_blocked()``
(then the client is parked in its next read), and timeouts and keep-alive expiry run on the
autojump clock. Where a failure has a counterpart in httpx2's default transport, the test runs
against both and asserts the same exception type. The chunked decoder is also fed seeded random
splits directly, where hundreds of cases cost nothing. TLS runs against a server whose
certificate comes from a throwaway CA made by ``trustme``.
"""

from __future__ import annotations

import contextlib
import functools
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
import trio
import trio.testing
import trustme

from chatsrv.upstream._framing import Chunked
from chatsrv.upstream._http11 import Http11Transport
from tests.fake_upstream import DEFAULT_TOKENS, FakeUpstream, refusing_port

TIME_LIMIT_S = 10
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def ok(body: bytes = b"hello", *headers: bytes) -> bytes:
    """A complete response with a Content-Length body."""
    extra = b"".join(header + b"\r\n" for header in headers)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def chunk(data: bytes, extension: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), extension, data)


# --- the server side ----------------------------------------------------------------------------


class Peer:
    """The server's end of one connection: reads whole requests, writes raw bytes."""

    def __init__(self, stream: trio.SocketStream, server: Server) -> None:
        self.stream = stream
        self.server = server
        self._buffer = b""

    async def read_request(self) -> bytes | None:
        """The next request (head and body), or None if the client closed the connection."""
        while b"\r\n\r\n" not in self._buffer:
            if not await self._fill():
                return None
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
        if fields.get(b"transfer-encoding") == b"chunked":
            while LAST_CHUNK not in self._buffer:
                await self._fill()
            body, self._buffer = self._buffer.split(LAST_CHUNK, 1)
        else:
            length = int(fields.get(b"content-length", b"0"))
            while len(self._buffer) < length:
                await self._fill()
            body, self._buffer = self._buffer[:length], self._buffer[length:]
        self.server.requests += 1
        return head + b"\r\n\r\n" + body

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def wait_closed(self) -> None:
        """Until the client closes its end; it must send nothing more before that."""
        assert await self.stream.receive_some(65536) == b""

    def reset(self) -> None:
        """Make the close that follows a TCP reset instead of a FIN."""
        self.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self._buffer += data
        return bool(data)


@dataclass
class Server:
    port: int = 0
    connections: int = 0
    requests: int = 0
    alpn: list[str | None] = field(default_factory=list)  # TLS: the protocol of each connection

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/path?q=1"


async def serve(nursery: trio.Nursery, handle: Callable[[Peer], Awaitable[None]]) -> Server:
    """Serve each connection with ``handle``; trio closes it when ``handle`` returns."""
    server = Server()

    async def handler(stream: trio.SocketStream) -> None:
        server.connections += 1
        await handle(Peer(stream, server))

    serve_tcp = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
    listeners = await nursery.start(serve_tcp)
    server.port = listeners[0].socket.getsockname()[1]
    return server


async def answer_each(peer: Peer, response: bytes = ok()) -> None:
    """Keep-alive: answer every request on the connection with ``response``."""
    while await peer.read_request() is not None:
        await peer.send(response)


async def send_one(response: bytes, peer: Peer) -> None:
    """Answer one request with ``response``, then close (or keep open: the client must close)."""
    await peer.read_request()
    await peer.send(response)


# --- the client side ----------------------------------------------------------------------------


async def streamed_body() -> AsyncIterator[bytes]:
    """A request body httpx2 sends chunked, and that cannot be sent twice."""
    yield b"part one, "
    yield b"part two"


@pytest.fixture(params=["http11", "httpx2-default"])
def make_transport(request: pytest.FixtureRequest) -> Callable[[], httpx2.AsyncBaseTransport]:
    """For behaviour that must match httpx2's own transport: each test runs against both."""
    if request.param == "http11":
        return Http11Transport
    return httpx2.AsyncHTTPTransport


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=Http11Transport()) as opened:
        yield opened


async def fetch(client: httpx2.AsyncClient, url: str, **kwargs: Any) -> list[bytes]:
    """The raw body, as the transport yielded it."""
    async with client.stream("POST", url, content=b'{"q": 1}', **kwargs) as response:
        assert response.status_code == 200
        return [part async for part in response.aiter_raw()]


# --- bodies ---------------------------------------------------------------------------------------


async def test_content_length_body_after_a_100_continue(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        response = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"x" * 100_000)
        server = await serve(nursery, functools.partial(answer_each, response=response))
        assert b"".join(await fetch(client, server.url)) == b"x" * 100_000


async def test_close_delimited_body(nursery: trio.Nursery, client: httpx2.AsyncClient) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, functools.partial(send_one, b"HTTP/1.1 200 OK\r\n\r\nbye"))
        for _ in range(2):
            assert b"".join(await fetch(client, server.url)) == b"bye"
        assert server.connections == 2  # the end of the body was the end of the connection


async def test_what_arrives_in_one_read_comes_out_as_one_bytes(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        body = chunk(b"data: a\n\n") + chunk(b"data: b\n\n", b";ext=1") + LAST_CHUNK
        server = await serve(nursery, functools.partial(answer_each, response=CHUNKED_HEAD + body))
        assert await fetch(client, server.url) == [b"data: a\n\ndata: b\n\n"]


async def test_chunk_extensions_and_trailers_are_dropped(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        body = (
            chunk(b"abc", b";name=value")
            + chunk(b"def", b' ; quoted="x;y"')
            + b"0;last\r\nExpires: never\r\nX-Trailer: 1\r\n\r\n"
        )
        server = await serve(nursery, functools.partial(answer_each, response=CHUNKED_HEAD + body))
        assert b"".join(await fetch(client, server.url)) == b"abcdef"
        assert b"".join(await fetch(client, server.url)) == b"abcdef"
        assert server.connections == 1  # the trailers were consumed: the connection was reusable


async def test_chunked_body_split_anywhere_over_the_socket(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    rng = random.Random(20240611)
    payloads = [rng.randbytes(rng.choice([1, 2, 9, 16, 17, 200])) for _ in range(60)]
    body = b"".join(chunk(p, b";e=1" if i % 7 == 0 else b"") for i, p in enumerate(payloads))
    wire = CHUNKED_HEAD + body + b"0\r\nX-Trailer: yes\r\n\r\n"

    async def dribble(peer: Peer) -> None:
        await peer.read_request()
        pos = 0
        while pos < len(wire):  # pieces of 1 to 7 bytes, each in a read of its own
            step = rng.randint(1, 7)
            await peer.send(wire[pos : pos + step])
            pos += step
            await trio.testing.wait_all_tasks_blocked()
        await answer_each(peer)

    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, dribble)
        parts = await fetch(client, server.url)
        assert b"".join(parts) == b"".join(payloads)
        assert len(parts) > len(payloads)  # the splits reached the decoder
        assert b"".join(await fetch(client, server.url)) == b"hello"
        assert server.connections == 1


@pytest.mark.parametrize("seed", range(300))
def test_chunked_decoder_split_anywhere(seed: int) -> None:
    rng = random.Random(seed)
    payloads = [rng.randbytes(rng.randint(1, 40)) for _ in range(rng.randint(0, 6))]
    extensions = [b"", b";a=b", b" ;x", b"\t"]
    wire = b"".join(chunk(p, rng.choice(extensions)) for p in payloads)
    wire += b"0\r\n" + rng.choice([b"", b"T: 1\r\n", b"A: 1\r\nB: 2\r\n"]) + b"\r\n"
    cuts = sorted(rng.sample(range(1, len(wire)), k=min(len(wire) - 1, rng.randint(1, 30))))
    decoder = Chunked()
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        assert not decoder.done
        part = decoder.feed(wire[start:end])
        assert type(part) is bytes
        out.append(part)
    assert decoder.done
    assert not decoder.overrun
    assert b"".join(out) == b"".join(payloads)


def test_chunked_decoder_notices_bytes_past_the_end() -> None:
    decoder = Chunked()
    assert decoder.feed(chunk(b"abc") + LAST_CHUNK + b"HTTP/1.1") == b"abc"
    assert decoder.done
    assert decoder.overrun


@pytest.mark.parametrize(
    "wire",
    [
        b"zz\r\n",  # not hex
        b"-3\r\nabc\r\n",
        b"0x3\r\nabc\r\n",
        b" 3\r\nabc\r\n",
        b"\r\nabc\r\n",  # no size
        b"12345678901234567\r\n",  # more than 64 bits
        b"3\nabc\r\n",  # a bare LF ends nothing
        b"3\r\nabcXY",  # no CRLF after the data
        b"3\r\nabc\rX",
        b"1" * 5000,  # a size line that never ends
    ],
)
def test_chunked_decoder_refuses_malformed_framing(wire: bytes) -> None:
    with pytest.raises(httpx2.RemoteProtocolError):
        Chunked().feed(wire)


# --- failures, compared with httpx2's default transport -----------------------------------------


async def reset_mid_body(peer: Peer) -> None:
    await peer.read_request()
    await peer.send(CHUNKED_HEAD + chunk(b"abc"))
    await trio.testing.wait_all_tasks_blocked()  # the client has the chunk and waits for more
    peer.reset()


@pytest.mark.parametrize(
    ("handle", "expected"),
    [
        (functools.partial(send_one, b""), httpx2.RemoteProtocolError),
        (functools.partial(send_one, b"HTTP/1.1 200 OK\r\nContent-Le"), httpx2.RemoteProtocolError),
        (functools.partial(send_one, b"HTTP/1.1 2x0 OK\r\n\r\n"), httpx2.RemoteProtocolError),
        (functools.partial(send_one, ok(b"0123456789")[:-4]), httpx2.RemoteProtocolError),
        (functools.partial(send_one, CHUNKED_HEAD + b"a\r\nabc"), httpx2.RemoteProtocolError),
        (functools.partial(send_one, CHUNKED_HEAD + chunk(b"abc")), httpx2.RemoteProtocolError),
        (functools.partial(send_one, CHUNKED_HEAD + b"zz\r\nabc\r\n"), httpx2.RemoteProtocolError),
        (reset_mid_body, httpx2.ReadError),
    ],
    ids=[
        "closed-before-response",
        "closed-mid-head",
        "malformed-status-line",
        "content-length-cut-short",
        "chunked-cut-mid-chunk",
        "chunked-cut-before-last-chunk",
        "malformed-chunk-size",
        "reset-mid-body",
    ],
)
async def test_failures_raise_as_httpx2_does(
    nursery: trio.Nursery,
    make_transport: Callable[[], httpx2.AsyncBaseTransport],
    handle: Callable[[Peer], Awaitable[None]],
    expected: type[Exception],
) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, handle)
        async with httpx2.AsyncClient(transport=make_transport()) as client:
            with pytest.raises(httpx2.TransportError) as caught:
                await fetch(client, server.url)
    assert type(caught.value) is expected


async def test_read_timeout(
    nursery: trio.Nursery,
    make_transport: Callable[[], httpx2.AsyncBaseTransport],
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def stall(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(CHUNKED_HEAD + chunk(b"abc"))
        await trio.sleep_forever()

    with trio.fail_after(TIME_LIMIT_S * 10):
        server = await serve(nursery, stall)
        async with httpx2.AsyncClient(transport=make_transport()) as client:
            start = trio.current_time()
            with pytest.raises(httpx2.ReadTimeout):
                await fetch(client, server.url, timeout=httpx2.Timeout(5.0))
            assert trio.current_time() - start == pytest.approx(5.0)


async def test_connect_refused(make_transport: Callable[[], httpx2.AsyncBaseTransport]) -> None:
    with trio.fail_after(TIME_LIMIT_S), refusing_port() as port:
        async with httpx2.AsyncClient(transport=make_transport()) as client:
            with pytest.raises(httpx2.ConnectError):
                await fetch(client, f"http://127.0.0.1:{port}/")


# --- the keep-alive pool ------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, answer_each)
        for _ in range(3):
            assert b"".join(await fetch(client, server.url)) == b"hello"
        assert server.connections == 1


@pytest.mark.parametrize(
    "response",
    [
        ok(b"hello", b"Connection: close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_no_reuse_when_the_server_says_close(
    nursery: trio.Nursery, client: httpx2.AsyncClient, response: bytes
) -> None:
    async def answer_and_wait(peer: Peer) -> None:
        await send_one(response, peer)
        await peer.wait_closed()  # the server keeps it open: the client must close it

    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, answer_and_wait)
        await fetch(client, server.url)
        await fetch(client, server.url)
        assert server.connections == 2


async def test_no_reuse_when_the_client_says_close(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, answer_each)
        await fetch(client, server.url, headers={"Connection": "close"})
        await fetch(client, server.url)
        assert server.connections == 2


async def test_no_reuse_after_a_partly_read_body(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    async def long_body(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(CHUNKED_HEAD + chunk(b"first"))
        await peer.wait_closed()

    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, long_body)
        async with client.stream("GET", server.url) as response:
            parts = response.aiter_raw()
            async with aclosing(parts):  # a generator left for the GC is a warning, so an error
                assert await anext(parts) == b"first"
        async with client.stream("GET", server.url) as response:
            pass  # closed before any of the body was read
        async with client.stream("GET", server.url) as response:
            pass
        assert server.connections == 3


@pytest.mark.parametrize(
    ("method", "response"),
    [
        # Content-Length here is that of the body a GET would get.
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
    ],
    ids=["HEAD", "204", "304"],
)
async def test_a_response_without_a_body_keeps_the_connection(
    nursery: trio.Nursery, client: httpx2.AsyncClient, method: str, response: bytes
) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, functools.partial(answer_each, response=response))
        for _ in range(2):
            assert (await client.request(method, server.url)).content == b""
        assert server.connections == 1


async def test_an_idle_connection_the_server_closed_is_not_used(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    closed = trio.Event()

    async def answer_once_then_close(peer: Peer) -> None:
        await send_one(ok(), peer)
        if peer.server.connections == 1:
            await peer.stream.aclose()
            closed.set()
        else:
            await answer_each(peer)

    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, answer_once_then_close)
        await fetch(client, server.url)
        await closed.wait()
        # Had the closed connection been used, this would fail.
        assert (await client.post(server.url, content=streamed_body())).content == b"hello"
        assert (server.connections, server.requests) == (2, 2)


async def test_a_connection_closed_as_the_request_goes_out_fails_it(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    """No resend: the server may have acted on the request (httpcore2 does not resend either)."""

    async def drop_the_second_request(peer: Peer) -> None:
        await send_one(ok(), peer)
        await peer.read_request()

    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, drop_the_second_request)
        await fetch(client, server.url)
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.post(server.url, content=b"once")
        assert (server.connections, server.requests) == (1, 2)


async def test_a_streamed_request_body_goes_out_chunked(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    received: list[bytes] = []

    async def record(peer: Peer) -> None:
        request = await peer.read_request()
        assert request is not None
        received.append(request)
        await peer.send(ok())

    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, record)
        assert (await client.post(server.url, content=streamed_body())).content == b"hello"
    head, sent = received[0].split(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/path?q=1 HTTP/1.1\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert sent == chunk(b"part one, ") + chunk(b"part two")


async def test_idle_connections_expire(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(TIME_LIMIT_S * 10):
        server = await serve(nursery, answer_each)
        async with httpx2.AsyncClient(transport=Http11Transport(keepalive_s=5.0)) as client:
            await fetch(client, server.url)
            await trio.sleep(4.0)
            await fetch(client, server.url)
            assert server.connections == 1
            await trio.sleep(6.0)
            await fetch(client, server.url)
            assert server.connections == 2


async def test_the_pool_keeps_at_most_max_idle(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIME_LIMIT_S):
        first = await serve(nursery, answer_each)
        second = await serve(nursery, answer_each)
        async with httpx2.AsyncClient(transport=Http11Transport(max_idle=1)) as client:
            for server in (first, second, first):
                await fetch(client, server.url)
        assert (first.connections, second.connections) == (2, 1)


async def test_cancelled_mid_body_closes_the_connection(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    gone = trio.Event()

    async def stream_until_gone(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(CHUNKED_HEAD + chunk(b"first"))
        await peer.wait_closed()
        gone.set()

    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, stream_until_gone)
        async with client.stream("GET", server.url) as response:
            with trio.CancelScope() as scope:
                async for part in response.aiter_raw():
                    assert part == b"first"
                    scope.cancel(reason="the test is done with this body")
            assert scope.cancelled_caught
        await gone.wait()


async def test_closing_the_transport_closes_idle_connections(nursery: trio.Nursery) -> None:
    gone = trio.Event()

    async def answer_until_gone(peer: Peer) -> None:
        await answer_each(peer)
        gone.set()

    with trio.fail_after(TIME_LIMIT_S):
        server = await serve(nursery, answer_until_gone)
        async with httpx2.AsyncClient(transport=Http11Transport()) as client:
            await fetch(client, server.url)
        await gone.wait()


# --- the openai SDK over it -----------------------------------------------------------------------


async def test_openai_sdk_streams_through_it(upstream: FakeUpstream) -> None:
    http_client = openai.DefaultAsyncHttpxClient(transport=Http11Transport())
    sdk = openai.AsyncOpenAI(
        base_url=upstream.base_url, api_key="test", max_retries=0, http_client=http_client
    )
    async with sdk:
        for _ in range(2):
            with trio.fail_after(TIME_LIMIT_S):
                async with sdk.chat.completions.with_streaming_response.create(
                    model="test-model",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                ) as response:
                    assert response.http_response.http_version == "HTTP/1.1"
                    body = b"".join([part async for part in response.http_response.aiter_bytes()])
            events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
            assert events[-1] == b"[DONE]"
            contents = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-2]]
            assert contents == list(DEFAULT_TOKENS)
    assert len(upstream.clients) == 1  # both streams went over one kept-alive connection


# --- TLS ------------------------------------------------------------------------------------------


async def serve_tls(nursery: trio.Nursery, ca: trustme.CA, hostname: str) -> Server:
    """Keep-alive over TLS, with a certificate for ``hostname`` signed by ``ca``."""
    server = Server()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        server.connections += 1
        with contextlib.suppress(trio.BrokenResourceError):  # a client that refused the handshake
            await stream.do_handshake()
            server.alpn.append(stream.selected_alpn_protocol())
            await answer_each(Peer(stream, server))  # type: ignore[arg-type]  # a Stream will do

    serve = functools.partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1")
    listeners = await nursery.start(serve)
    server.port = listeners[0].transport_listener.socket.getsockname()[1]
    return server


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_https_with_a_trusted_certificate(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The transport's own TLS context, as chatsrv uses it: the system's trust store (here the
    test CA, through SSL_CERT_FILE), the name checked against the certificate, ALPN http/1.1,
    and the TLS connection kept alive for the next request."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    with trio.fail_after(TIME_LIMIT_S):
        server = await serve_tls(nursery, ca, "localhost")
        url = f"https://localhost:{server.port}/v1/path"
        async with httpx2.AsyncClient(transport=Http11Transport()) as client:
            for _ in range(2):
                assert b"".join(await fetch(client, url)) == b"hello"
        assert (server.connections, server.requests) == (1, 2)
        assert server.alpn == ["http/1.1"]


@pytest.mark.parametrize("case", ["unknown CA", "wrong hostname"])
async def test_https_refuses_an_untrusted_certificate(nursery: trio.Nursery, case: str) -> None:
    ca = trustme.CA()
    trusted = trustme.CA() if case == "unknown CA" else ca
    hostname = "localhost" if case == "unknown CA" else "other.example"
    with trio.fail_after(TIME_LIMIT_S):
        server = await serve_tls(nursery, ca, hostname)
        transport = Http11Transport(ssl_context=trusting(trusted))
        async with httpx2.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(f"https://localhost:{server.port}/")
        assert server.requests == 0
