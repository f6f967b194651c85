"""A cap on every request body, so that no request makes the server hold more than a batch.

FastAPI reads a JSON body whole before it checks the caller: without a cap, one anonymous
request of 300 MB grew the process by 590 MB. Publish and batch check their own, smaller limits
as they read; this is the ceiling for everything else. (FastAPI's own `max_body_size` answers
in plain text when a route answers without reading the body, so it would bypass the envelope.)
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errors import BodyTooLarge, envelope, too_large


class BodyLimit:
    """413 `too_large` past `limit` bytes: before reading when Content-Length says so, else as
    soon as the bytes read pass it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.limit:
            await envelope(too_large(self.limit))(scope, receive, send)
            return
        read = 0

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.limit:
                raise BodyTooLarge(self.limit)  # inside the route: answered by the error handlers
            return message

        await self.app(scope, counted, send)
