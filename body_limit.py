"""A cap on every request body, so that no request makes the server hold more than a batch.

FastAPI reads a JSON body whole before it checks the caller: without a cap, one anonymous
request of 300 MB grew the process by 590 MB. Publish and batch check their own, smaller limits
as they read; this is the ceiling for everything else. (FastAPI's own `max_body_size` answers
in plain text when a route answers without reading the body, so it would bypass the envelope.)

uvicorn bounds the time between requests (`timeout_keep_alive`) but not the time a body takes:
a client sending one byte a second held its request, and its task, for as long as it liked.
The server's protocol (`http_rules.BoundedHttpTools`) times each request, head and whole body,
with one timer; when the body is late it marks the request's `ReadDeadline` passed and wakes
the route's read, and this answers 408 in the envelope. A timeout around each read measured
19 us a request, the timer about 1 us. The whole body must arrive by the deadline, however it is
split: a gap between reads (nginx's `client_body_timeout`) lets a byte every few seconds through.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errors import BodyTimeout, BodyTooLarge, envelope, too_large

READ_DEADLINE = "pombo.read_deadline"  # the scope key of a request's ReadDeadline


@dataclass(slots=True)
class ReadDeadline:
    """When a request's head and body must have arrived; `passed` once they did not."""

    seconds: float
    passed: bool = False


class BodyLimit:
    """413 `too_large` past `limit` bytes: before reading when Content-Length says so, else as
    soon as the bytes read pass it. 408 `request_timeout` once the request's deadline passed."""

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
        read, deadline = 0, scope.get(READ_DEADLINE)
        assert deadline is None or isinstance(deadline, ReadDeadline)

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            if deadline is not None and deadline.passed:
                raise BodyTimeout(deadline.seconds)  # answered by the error handlers, as below
            read += len(message.get("body", b""))
            if read > self.limit:
                raise BodyTooLarge(self.limit)  # inside the route: answered by the error handlers
            return message

        await self.app(scope, counted, send)
