"""How the lean transport (``_http11.py``) finds the end of a response body: the three HTTP/1.1
framings, as decoders fed with whatever one socket read returned.

``feed(data)`` returns the payload in ``data`` (all of it as one ``bytes``: a chunked body is
decoded in bulk, not chunk by chunk); ``done`` says the body has ended, ``overrun`` that bytes
came past its end (the connection cannot be reused); ``end()`` is the peer's EOF, which raises
``httpx2.RemoteProtocolError`` unless the framing allows it. No I/O happens here.
"""

from __future__ import annotations

import re
from typing import Final

import httpx2

MAX_LINE_BYTES: Final = 4096  # a chunk-size line with its extensions, or a trailer line
MAX_TRAILER_BYTES: Final = 64 * 1024

# RFC 9112 7.1: chunk-size [ BWS ";" chunk-ext ]; h11 takes up to 20 hex digits, 16 fit 64 bits.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")


class UntilClose:
    """A body that the end of the connection ends; the base of the other framings."""

    done = False
    overrun = False  # bytes came past the body's end: the connection cannot be reused

    def feed(self, data: bytes) -> bytes:
        return data

    def end(self) -> None:
        self.done = True


class Counted(UntilClose):
    """A body of ``Content-Length`` bytes."""

    def __init__(self, length: int) -> None:
        self._length = self._remaining = length
        self.done = not length

    def feed(self, data: bytes) -> bytes:
        if len(data) < self._remaining:
            self._remaining -= len(data)
            return data
        self.overrun = len(data) > self._remaining
        data, self._remaining, self.done = data[: self._remaining], 0, True
        return data

    def end(self) -> None:
        raise httpx2.RemoteProtocolError(
            "peer closed connection without sending complete message body "
            f"(received {self._length - self._remaining} bytes, expected {self._length})"
        )


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class Chunked(UntilClose):
    """``Transfer-Encoding: chunked``, over reads split anywhere. Chunk extensions are checked
    for shape, trailers only for size; both are dropped."""

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0  # bytes of the current chunk's data still to come
        self._pending = b""  # an incomplete line, or the "\r" of a data CRLF
        self._trailer_bytes = 0

    def feed(self, data: bytes) -> bytes:
        if self._pending:
            data, self._pending = self._pending + data, b""
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                out.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _DATA_END:
                crlf = data[pos : pos + 2]
                if crlf == b"\r":  # the "\n" is in the next read
                    self._pending = crlf
                    break
                if crlf != b"\r\n":
                    raise httpx2.RemoteProtocolError(f"malformed chunk footer: {crlf!r}")
                pos += 2
                self._state = _SIZE
            else:  # a line: a chunk's size, or a trailer
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self._pending = data[pos:]
                    if len(self._pending) > MAX_LINE_BYTES:
                        raise httpx2.RemoteProtocolError("chunk header or trailer too long")
                    break
                line, pos = data[pos:eol], eol + 2
                if state == _SIZE:
                    match = _CHUNK_SIZE_LINE.fullmatch(line)
                    if match is None:
                        raise httpx2.RemoteProtocolError(f"illegal chunk header: {line[:40]!r}")
                    self._remaining = int(match[1], 16)
                    self._state = _DATA if self._remaining else _TRAILER
                elif line:
                    self._trailer_bytes += len(line) + 2
                    if self._trailer_bytes > MAX_TRAILER_BYTES:
                        raise httpx2.RemoteProtocolError("trailers too long")
                else:  # the empty line that ends the body
                    self.done, self.overrun = True, pos < end
                    break
        return out[0] if len(out) == 1 else b"".join(out)

    def end(self) -> None:
        raise httpx2.RemoteProtocolError(
            "peer closed connection without sending complete message body (incomplete chunked read)"
        )
