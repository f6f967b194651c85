"""A lean HTTP/1.1 client for the load generator: keep-alive requests and SSE streams.

Each connection is an asyncio Protocol whose responses are parsed by httptools, the C parser
uvicorn uses (installed with uvicorn[standard]). A stream costs one transport, one protocol and
one parser: no task, no stream wrapper and no event object per frame, so one process holds
10,000 streams and timestamps their frames without becoming the bottleneck it measures.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

# Closing with a reset leaves no TIME_WAIT behind: 3 x 10,000 streams would exhaust the
# 28,000 ephemeral ports of one loopback address within a minute.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)

FrameHandler = Callable[[bytes, float], None]


class HttpError(Exception):
    """An answer we did not expect: the status and the start of the body."""


@dataclass(frozen=True)
class Target:
    """Where the server listens and the token to send; the host is resolved once."""

    host: str
    port: int
    token: str | None = None

    @classmethod
    def parse(cls, url: str, token: str | None) -> Target:
        parts = urlsplit(url)
        port = parts.port or 80
        address = socket.getaddrinfo(parts.hostname or "127.0.0.1", port, type=socket.SOCK_STREAM)[0][4][0]
        return cls(str(address), port, token)

    def head(self, method: str, path: str, length: int | None = None, stream: bool = False) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        if length is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {length}"]
        if stream:
            lines.append("Accept: text/event-stream")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)

    def expect(self, *statuses: int) -> Response:
        if self.status not in statuses:
            raise HttpError(f"HTTP {self.status}: {self.body[:300]!r}")
        return self


class _Wire(asyncio.Protocol):
    """What both kinds of connection share: a transport, a parser, and how the connection ends."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.fail(error)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.fail(exc or ConnectionResetError("the server closed the connection"))

    def fail(self, error: Exception) -> None:
        """Subclasses wake whoever waits on this connection."""

    def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        self.transport.close()


class Connection(_Wire):
    """One keep-alive connection carrying one request at a time, each answered within `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._seconds = seconds
        self._waiter: asyncio.Future[Response] | None = None
        self._body: list[bytes] = []

    async def request(self, request: bytes) -> Response:
        assert self.transport is not None
        if self.lost:
            raise ConnectionResetError("the connection is closed")
        loop = asyncio.get_running_loop()
        self._waiter, self._body = loop.create_future(), []
        self.transport.write(request)
        # A timer rather than wait_for: no extra task per request on the hot path.
        late = TimeoutError(f"no answer within {self._seconds} s")
        timer = loop.call_later(self._seconds, self.fail, late)
        try:
            return await self._waiter
        finally:
            timer.cancel()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(Response(self.parser.get_status_code(), b"".join(self._body)))

    def fail(self, error: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
            self.close()


class EventStream(_Wire):
    """One SSE stream: every complete frame goes to `on_frame` with the time its bytes arrived."""

    def __init__(self, on_frame: FrameHandler) -> None:
        super().__init__()
        self.opened: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.ended = False
        self._on_frame = on_frame
        self._buffer = b""
        self._arrived = 0.0

    def data_received(self, data: bytes) -> None:
        self._arrived = time.monotonic()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        if not self.opened.done():
            self.opened.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        buffer = self._buffer + body
        if b"\r" in buffer:  # sse-starlette ends its own lines (pings) with CRLF
            buffer = buffer.replace(b"\r\n", b"\n")
        *frames, self._buffer = buffer.split(b"\n\n")
        for frame in frames:
            self._on_frame(frame, self._arrived)

    def on_message_complete(self) -> None:
        self.ended = True

    def fail(self, error: Exception) -> None:
        self.ended = True
        if not self.opened.done():
            self.opened.set_exception(error)


class Client:
    """A keep-alive connection to `target`, opened again after an error."""

    def __init__(self, target: Target, seconds: float = 30.0) -> None:
        self.target = target
        self.seconds = seconds
        self._connection: Connection | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> Response:
        connection = self._connection
        if connection is None or connection.lost:
            _, connection = await asyncio.get_running_loop().create_connection(
                lambda: Connection(self.seconds), self.target.host, self.target.port
            )
            self._connection = connection
        head = self.target.head(method, path, None if body is None else len(body))
        try:
            return await connection.request(head + (body or b""))
        except BaseException:
            self._connection = None
            raise

    async def post_json(self, path: str, payload: Any) -> Response:
        return await self.request("POST", path, json.dumps(payload).encode())

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


async def open_stream(target: Target, path: str, on_frame: FrameHandler) -> EventStream:
    """An SSE stream whose response headers arrived with 200; closed again on any failure.

    It waits as long as it takes: callers bound it with `asyncio.timeout`.
    """
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(lambda: EventStream(on_frame), target.host, target.port)
    assert stream.transport is not None
    stream.transport.write(target.head("GET", path, stream=True))
    try:
        status = await stream.opened
        if status != 200:
            raise HttpError(f"HTTP {status} opening {path}")
    except BaseException:
        stream.close()
        raise
    return stream
