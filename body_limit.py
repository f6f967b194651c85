"""Bounds on every request body, in size and in time, so that no request makes the server hold
more than a batch, or hold it for long.

FastAPI reads a JSON body whole before it checks the caller: without a cap, one anonymous
request of 300 MB grew the process by 590 MB. Publish and batch check their own, smaller limits
as they read; this is the ceiling for everything else. (FastAPI's own `max_body_size` answers
in plain text when a route answers without reading the body, so it would bypass the envelope.)

uvicorn bounds the time between requests (`timeout_keep_alive`) but not the time a body takes:
a client sending one byte a second held its request, and its task, for as long as it liked.
The whole body must arrive within the deadline, however it is split: a gap between reads
(nginx's `client_body_timeout`) would let a byte every few seconds through.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errors import BodyTimeout, BodyTooLarge, envelope, too_large


class BodyLimit:
    """413 `too_large` past `limit` bytes: before reading when Content-Length says so, else as
    soon as the bytes read pass it. 408 `request_timeout` when the body is not complete
    `timeout` seconds after the request began."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.limit:
            await envelope(too_large(self.limit))(scope, receive, send)
            return
        read, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def counted() -> Message:
            nonlocal read, complete
            if complete:  # past the body, receive() waits for a disconnect: no deadline on that
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.timeout) from None  # answered by the error handlers
            read += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if read > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)
