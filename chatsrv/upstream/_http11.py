"""A lean, trio-native HTTP/1.1 transport for the openai SDK: ``Http11Transport``.

It owns the upstream sockets: connecting (TCP; TLS with SNI, hostname check and ALPN
``http/1.1``), writing a request, reading a response, and a small keep-alive pool. The SDK uses
it through httpx2's public seam: ``openai.DefaultAsyncHttpxClient(transport=Http11Transport())``.

Why. With the SDK's default transport, a token that arrives in its own socket read was profiled
at ~63 µs of CPU before our code sees it: httpcore2's pool and connection streams, h11's chunked
reader (~17 µs alone), an exception-mapping context manager and an anyio timeout per read. Here
a wake-up is one read of up to 64 KiB (of the socket itself, without TLS), and a chunked body is
decoded in bulk: all the complete data of one read comes out as one ``bytes``. h11 still writes
the request and parses the response head, where correctness matters more than speed. With
``time_body_reads=False`` a body's reads get no timeout, and no cancel scope each: the caller
watches for silence itself (``_openai`` does, with one scope per stream).

What it does not do: HTTP/2; proxies (httpx2 ignores ``HTTP(S)_PROXY`` once a transport is
given, so keep the SDK's default transport when a proxy is configured); protocol upgrades; a
limit on active connections (so no pool timeout); the ``sni_hostname`` extension.

Errors are httpx2's, raised where the default transport raises them, so that the SDK and
``_openai`` see no difference::

    connect  OSError, TLS failure (trio.BrokenResourceError)     ConnectError
             connect or TLS handshake deadline                   ConnectTimeout
    write    broken socket: suppressed, the response may still come (as httpcore2 does)
             deadline                                            WriteTimeout
    read     reset, broken or closed socket                      ReadError
             nothing for ``read`` seconds                        ReadTimeout
             closed before a whole response head; malformed
             head or chunk; body cut short of its framing        RemoteProtocolError
    request  a head or body h11 refuses to write                 LocalProtocolError

``trio.Cancelled`` passes through untouched; it, and every error, closes the connection. A pooled
connection that the server closed meanwhile is noticed before use (its socket is readable). One
the server closes just as the request goes out fails the request, as with httpcore2: a chat
completion is not idempotent, so sending it twice is for the SDK's retries to decide.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import h11
import httpx2
import trio

from ._framing import Chunked, Counted, UntilClose

READ_SIZE: Final = 65536
MAX_HEAD_BYTES: Final = 100 * 1024  # as httpcore2

_Origin = tuple[str, str, int]  # scheme, host, port
_Receive = Callable[[int], Awaitable[bytes | bytearray]]


class Http11Transport(httpx2.AsyncBaseTransport):
    """HTTP/1.1 over trio sockets; keeps up to ``max_idle`` connections for ``keepalive_s``."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle: int = 100,
        keepalive_s: float = 5.0,
        time_body_reads: bool = True,
    ) -> None:
        if ssl_context is None:
            # The CAs httpx2's own transport trusts (SSL_CERT_FILE/DIR, the OS store on macOS
            # and Windows, the system bundle on Linux); hostnames checked.
            ssl_context = httpx2.create_ssl_context()
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._ssl_context = ssl_context
        self._time_body_reads = time_body_reads
        self._max_idle = max_idle
        self._keepalive_s = keepalive_s
        self._idle: list[_Connection] = []  # oldest first
        self._closed = False

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"Http11Transport cannot send {url.scheme!r} URLs")
        port = url.port or (443 if url.scheme == "https" else 80)
        origin = (url.scheme, url.raw_host.decode("ascii"), port)
        timeouts: Mapping[str, float | None] = request.extensions.get("timeout", {})
        conn = self._checkout(origin)
        if conn is None:
            conn = await self._connect(origin, _seconds(timeouts.get("connect")))
        return await self._exchange(conn, request, timeouts)

    async def aclose(self) -> None:
        """Close the idle connections; one still carrying a response closes with it."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # --- the pool: no await anywhere, so it needs no lock and cannot be cancelled halfway ----

    def _checkout(self, origin: _Origin) -> _Connection | None:
        now = trio.current_time()
        found, keep, drop = None, [], []
        for conn in reversed(self._idle):  # the most recently used first
            if now - conn.idle_since > self._keepalive_s:
                drop.append(conn)
            elif found is None and conn.origin == origin:
                # Readable while idle: the server closed it (or sent junk); unusable either way.
                if conn.socket.is_readable():
                    drop.append(conn)
                else:
                    found = conn
            else:
                keep.append(conn)
        self._idle = keep[::-1]
        for conn in drop:
            conn.close()
        return found

    def _checkin(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = trio.current_time()
        self._idle.append(conn)
        if len(self._idle) > self._max_idle:
            self._idle.pop(0).close()

    # --- one exchange ---------------------------------------------------------------------------

    async def _connect(self, origin: _Origin, connect_s: float) -> _Connection:
        scheme, host, port = origin
        try:
            with trio.fail_after(connect_s):
                tcp = await trio.open_tcp_stream(host, port)
                stream: trio.abc.Stream = tcp
                if scheme == "https":
                    stream = trio.SSLStream(
                        tcp, self._ssl_context, server_hostname=host, https_compatible=True
                    )
                    try:
                        await stream.do_handshake()
                    except BaseException:
                        tcp.socket.close()
                        raise
        except trio.TooSlowError as exc:
            raise httpx2.ConnectTimeout(
                f"no connection to {host}:{port} in {connect_s:g} s"
            ) from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise httpx2.ConnectError(_why(exc)) from exc
        return _Connection(origin, stream, tcp.socket)

    async def _exchange(
        self,
        conn: _Connection,
        request: httpx2.Request,
        timeouts: Mapping[str, float | None],
    ) -> httpx2.Response:
        read_s = _seconds(timeouts.get("read"))
        h11_conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            sent_all = await _send_request(conn.stream, h11_conn, request, timeouts)
            head = await _receive_head(conn.receive, h11_conn, read_s)
        except BaseException:
            conn.close()
            raise
        # The body's framing, decided as h11 would (h11 has validated these headers).
        chunked, length, keep_alive = False, None, sent_all and head.http_version == b"1.1"
        for name, value in head.headers:  # lowercased names
            if name == b"transfer-encoding":
                chunked = True  # h11 accepts only "chunked"
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection" and _says_close(value):
                keep_alive = False
        if _says_close(request.headers.get("connection", "").encode()):
            keep_alive = False
        decoder: UntilClose
        if request.method == "HEAD" or head.status_code in (204, 304):
            decoder = Counted(0)
        elif chunked:
            decoder = Chunked()
        elif length is not None:
            decoder = Counted(length)
        else:
            decoder, keep_alive = UntilClose(), False
        leftover = h11_conn.trailing_data[0]  # what h11 read past the head: the body's start
        pool = self if keep_alive else None
        return httpx2.Response(
            head.status_code,
            headers=head.headers.raw_items(),
            stream=_ResponseBody(
                conn, decoder, leftover, read_s if self._time_body_reads else math.inf, pool
            ),
            extensions={"http_version": b"HTTP/" + head.http_version, "reason_phrase": head.reason},
        )


@dataclass(eq=False, slots=True)
class _Connection:
    origin: _Origin
    stream: trio.abc.Stream
    socket: trio.socket.SocketType  # beneath any TLS: probed for readability while idle
    idle_since: float = 0.0

    @property
    def receive(self) -> _Receive:
        # Without TLS, read the socket itself: SocketStream.receive_some adds a conflict detector
        # and an error-translating context manager to every read (~5% of a worker's CPU, in
        # the profile of a paced stream).
        return (
            self.socket.recv
            if isinstance(self.stream, trio.SocketStream)
            else self.stream.receive_some
        )

    def close(self) -> None:
        # Synchronous, so that it also runs to its end in a cancelled scope. Like aclose_forcefully
        # it sends no TLS close_notify; trio wakes any task waiting on the socket.
        self.socket.close()


class _ResponseBody(httpx2.AsyncByteStream):
    """One response's body. ``aclose()`` hands the connection to ``pool`` if the body was read
    to its end and both sides allow keep-alive (``pool`` is then set), else closes it."""

    def __init__(
        self,
        conn: _Connection,
        decoder: UntilClose,
        leftover: bytes,
        read_s: float,
        pool: Http11Transport | None,
    ) -> None:
        self._conn: _Connection | None = conn
        self._receive = conn.receive  # kept after aclose: a read then fails as ReadError
        self._decoder = decoder
        self._leftover = leftover
        self._read_s = read_s
        self._pool = pool

    async def __aiter__(self) -> AsyncIterator[bytes]:
        decoder, receive, read_s = self._decoder, self._receive, self._read_s
        data, self._leftover = self._leftover, b""
        try:
            while True:
                if data:
                    out = decoder.feed(data)
                    if out:
                        yield out  # no cancel scope is open here: each read closes its own
                if decoder.done:
                    return
                data = await _receive(receive, read_s)
                if not data:
                    decoder.end()  # raises unless the end of the connection ends the body
                    return
        except BaseException:
            # Failed, cancelled or abandoned (GeneratorExit): mid-body, this closes the
            # connection at once rather than when the response is closed.
            self._release()
            raise

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._pool is not None and self._decoder.done and not self._decoder.overrun:
            self._pool._checkin(conn)
        else:
            conn.close()


# --- socket operations, each under a deadline of its own, mapped to httpx2's errors ------------


async def _receive(receive: _Receive, read_s: float) -> bytes:
    # This runs once per token. A cancel scope costs ~5% of a worker's CPU there, so none is
    # opened without a read timeout: a caller that passes none watches for silence itself
    # (``_openai`` does, with one scope per stream). Otherwise a bare CancelScope rather than
    # fail_after, whose context-manager wrapper costs a few µs more.
    try:
        if read_s == math.inf:
            return bytes(await receive(READ_SIZE))
        with trio.CancelScope(deadline=trio.current_time() + read_s):
            # bytes() of a bytes object is that object: only the type checker needs it.
            return bytes(await receive(READ_SIZE))
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise httpx2.ReadError(_why(exc)) from exc
    raise httpx2.ReadTimeout(f"nothing received for {read_s:g} s")  # the deadline struck


async def _send_all(stream: trio.abc.Stream, data: bytes, write_s: float) -> bool:
    """Whether ``data`` went out: a broken socket is no error yet (see the module docstring)."""
    try:
        with trio.CancelScope(deadline=trio.current_time() + write_s):
            await stream.send_all(data)
            return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    raise httpx2.WriteTimeout(f"could not send for {write_s:g} s")


async def _send_request(
    stream: trio.abc.Stream,
    h11_conn: h11.Connection,
    request: httpx2.Request,
    timeouts: Mapping[str, float | None],
) -> bool:
    """Write the request, small pieces joined into one write; whether all of it went out."""
    write_s = _seconds(timeouts.get("write"))
    head = h11.Request(
        method=request.method, target=request.url.raw_path, headers=request.headers.raw
    )
    pending = [_h11_send(h11_conn, head)]
    size = len(pending[0])
    assert isinstance(request.stream, httpx2.AsyncByteStream)
    parts = request.stream.__aiter__()
    try:
        async for part in parts:
            pending.append(_h11_send(h11_conn, h11.Data(data=part)))
            size += len(pending[-1])
            if size >= READ_SIZE:
                if not await _send_all(stream, b"".join(pending), write_s):
                    return False
                pending, size = [], 0
    finally:
        if isinstance(parts, AsyncGenerator):
            await parts.aclose()
    pending.append(_h11_send(h11_conn, h11.EndOfMessage()))
    return await _send_all(stream, b"".join(pending), write_s)


async def _receive_head(receive: _Receive, h11_conn: h11.Connection, read_s: float) -> h11.Response:
    while True:
        try:
            event = h11_conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx2.RemoteProtocolError(str(exc)) from exc
        if event is h11.NEED_DATA:
            data = await _receive(receive, read_s)
            if not data:
                raise httpx2.RemoteProtocolError("Server disconnected without sending a response.")
            h11_conn.receive_data(data)
        elif isinstance(event, h11.Response):
            return event
        elif not isinstance(event, h11.InformationalResponse):  # h11.PAUSED: a protocol switch
            raise httpx2.RemoteProtocolError(f"unexpected {event!r} before the response head")


def _h11_send(h11_conn: h11.Connection, event: h11.Request | h11.Data | h11.EndOfMessage) -> bytes:
    try:
        return bytes(h11_conn.send(event) or b"")
    except h11.LocalProtocolError as exc:
        raise httpx2.LocalProtocolError(str(exc)) from exc


def _says_close(value: bytes) -> bool:
    return b"close" in (token.strip().lower() for token in value.split(b","))


def _seconds(timeout: Any) -> float:
    return float("inf") if timeout is None else float(timeout)


def _why(exc: BaseException) -> str:
    """trio's Broken/ClosedResourceError often say nothing; the OS or TLS error beneath does."""
    for candidate in (exc, exc.__cause__):
        if candidate is not None and str(candidate):
            return str(candidate)
    return type(exc).__name__
