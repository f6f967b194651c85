"""Server-Sent Events for any log: subscribe, replay from the database, then go live.

The subscription is taken before the response starts, so nothing committed after the client
connected can slip between replay and live. Live updates at or below what was sent are dropped;
a jump in sequence numbers, a broker reconnect or an overflowing buffer is filled from the
database. The stream ends at its lifetime (the client resumes) or when its token expires.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from loguru import logger
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from auth import Principal
from broker import Broker, Subscriber
from hub import Hub
from schemas import Update
from settings import Settings

REPLAY_PAGE = 500
DIRECT_SEND = "pombo.direct_send"
HEARTBEAT = b":\n\n"


def frame(update: Update) -> bytes:
    """The SSE frame for an update, encoded once and shared by every subscriber."""
    encoded = update.frame
    if encoded is None:
        encoded = f"id: {update.seq}\nevent: {update.type}\ndata: {update.data}\n\n".encode()
        update.frame = encoded
    return encoded


def control_frame(event: str, data: dict[str, object]) -> bytes:
    """A frame outside the log (no `id:`), so it never moves the client's cursor."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def resume_cursor(header: str | None, query: int | None) -> int | None:
    """`Last-Event-ID` wins over `last_event_id`; neither means live from now."""
    if header is not None and header.strip().isdigit():
        return int(header.strip())
    return query


# A frame outside the log, sent on connect and after each batch of events (e.g. `unread_count`).
SideFrame = Callable[[], Awaitable[bytes]]


@dataclass(frozen=True)
class StreamSpec:
    log: str
    cursor: int | None
    types: frozenset[str] | None
    lifetime: float
    retry_ms: int
    token_expires_at: datetime | None = None
    heartbeat: float = 15.0
    side_frame: SideFrame | None = None


class LogStream:
    def __init__(self, hub: Hub, subscriber: Subscriber, spec: StreamSpec) -> None:
        self._hub = hub
        self._subscriber = subscriber
        self._spec = spec
        self._last = 0

    async def frames(self) -> AsyncGenerator[bytes, None]:
        yield f"retry: {self._spec.retry_ms}\n\n".encode()
        reset = await self._position()
        if reset is not None:
            yield reset
        async for chunk in self._replay():
            yield chunk
        if self._spec.side_frame is not None:
            yield await self._spec.side_frame()
        async for chunk in self._live():
            yield chunk

    async def _position(self) -> bytes | None:
        cursor = self._spec.cursor
        if cursor is None:  # live from now: one query, as most browsers open most streams
            self._last = await self._hub.log_head(self._spec.log)
            return None
        oldest, head = await self._hub.log_bounds(self._spec.log)
        if oldest - 1 <= cursor <= head:
            self._last = cursor
            return None
        # Said out loud, never skipped over: the client learns its cursor did not hold.
        self._last = head if cursor > head else oldest - 1
        reason = "cursor_ahead" if cursor > head else "cursor_expired"
        return control_frame("stream.reset", {"reason": reason, "oldest_seq": oldest})

    async def _replay(self, upto: int | None = None) -> AsyncIterator[bytes]:
        while True:
            batch = await self._hub.read_log(self._spec.log, self._last, REPLAY_PAGE, upto)
            for update in batch:
                chunk = self._advance(update)
                if chunk:
                    yield chunk
            if len(batch) < REPLAY_PAGE:
                return

    async def _live(self) -> AsyncIterator[bytes]:
        subscriber = self._subscriber
        deadline = time.monotonic() + self._remaining()
        while not subscriber.closed and time.monotonic() < deadline:
            beat = time.monotonic() + self._spec.heartbeat
            await _wait(subscriber, min(beat, deadline))
            sent = False
            async for chunk in self._drain():
                sent = True
                yield chunk
            if sent and self._spec.side_frame is not None:
                yield await self._spec.side_frame()
            elif not sent and time.monotonic() >= beat:
                yield HEARTBEAT  # a comment line: keeps proxies from closing an idle stream
        if self._token_expired():
            yield control_frame("stream.expired", {"reason": "token_expired"})

    async def _drain(self) -> AsyncIterator[bytes]:
        subscriber = self._subscriber
        if subscriber.must_catch_up:
            subscriber.must_catch_up = False
            async for chunk in self._replay():
                yield chunk
        while subscriber.inbox:
            update = subscriber.inbox.popleft()
            if update.seq <= self._last:
                continue  # already sent by replay, or a late duplicate
            if update.seq > self._last + 1:
                async for missed in self._replay(upto=update.seq - 1):
                    yield missed
            current = self._advance(update)
            if current:
                yield current

    def _advance(self, update: Update) -> bytes | None:
        self._last = update.seq
        types = self._spec.types
        return frame(update) if types is None or update.type in types else None

    def _remaining(self) -> float:
        remaining = self._spec.lifetime
        expires = self._spec.token_expires_at
        if expires is not None:
            remaining = min(remaining, expires.timestamp() - time.time())
        return max(remaining, 0.0)

    def _token_expired(self) -> bool:
        expires = self._spec.token_expires_at
        return expires is not None and expires.timestamp() <= time.time() + 0.05


async def _wait(subscriber: Subscriber, until: float) -> None:
    """Until the broker wakes the subscriber, or the monotonic time `until`."""
    timer = asyncio.get_running_loop().call_later(max(until - time.monotonic(), 0), subscriber.wakeup.set)
    try:
        await subscriber.wakeup.wait()
    finally:
        timer.cancel()
        subscriber.wakeup.clear()


class StreamResponse(Response):
    """SSE written straight to the ASGI `send`: no task per stream but one disconnect watcher.

    It keeps what a stream needs: the subscription is released however the stream ends, a
    client that stops reading is cut by the `cut_stalled` watchdog, heartbeats come from the
    stream itself, and on shutdown the stream ends cleanly (the client resumes elsewhere).
    Measured against sse-starlette in NOTES.md.
    """

    media_type = "text/event-stream"

    def __init__(self, stream: LogStream, broker: Broker, subscriber: Subscriber) -> None:
        # See https://html.spec.whatwg.org/multipage/server-sent-events.html and nginx's
        # X-Accel-Buffering: a buffering proxy would hold events back.
        super().__init__(headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        # Endless: chunked, never a Content-Length.
        self.raw_headers = [(name, value) for name, value in self.raw_headers if name != b"content-length"]
        self._stream = stream
        self._broker = broker
        self._subscriber = subscriber

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber, loop, task = self._subscriber, asyncio.get_running_loop(), asyncio.current_task()
        subscriber.task = task
        watcher = asyncio.create_task(self._watch(receive))
        frames = self._stream.frames()
        # The start goes through the middleware (status, request id); frames go straight out.
        body = scope.get(DIRECT_SEND, send)
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in frames:
                subscriber.sending_since = loop.time()
                await body({"type": "http.response.body", "body": chunk, "more_body": True})
                subscriber.sending_since = 0.0
            await body({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-write
        except asyncio.CancelledError:
            if not subscriber.stalled:
                raise
            if task is not None:
                task.uncancel()  # cut by the watchdog: end here, and the connection closes
            logger.warning("cut a stream whose client stopped reading")
        finally:
            watcher.cancel()
            self._broker.unsubscribe(subscriber)
            await frames.aclose()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._subscriber.close()


class DirectSend:
    """Outermost ASGI layer: keeps the server's own `send` in the scope for stream frames.

    Each frame of a stream otherwise passes through every middleware's `send` wrapper, which
    profiles showed to be most of the cost of a delivery at 1,000 subscribers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[DIRECT_SEND] = send
        await self.app(scope, receive, send)


def documented_as_sse(description: str) -> dict[str, Any]:
    """Route options that show a stream in OpenAPI: `@router.get(path, **documented_as_sse(…))`."""
    return {
        # OpenAPI reads a status code off the class; the route returns a StreamResponse anyway.
        "response_class": JSONResponse,
        "responses": {200: {"content": {"text/event-stream": {}}, "description": description}},
    }


def open_stream(
    hub: Hub,
    settings: Settings,
    principal: Principal,
    log: str,
    cursor: int | None,
    types: frozenset[str] | None = None,
    side_frame: SideFrame | None = None,
) -> StreamResponse:
    """Subscribe now, before any header is sent, then hand the stream to the response."""
    spec = StreamSpec(
        log=log,
        cursor=cursor,
        types=types,
        lifetime=settings.stream_lifetime_seconds,
        retry_ms=settings.retry_ms,
        token_expires_at=principal.expires_at,
        heartbeat=settings.heartbeat_seconds,
        side_frame=side_frame,
    )
    subscriber = hub.broker.subscribe([log], settings.subscriber_buffer)
    return StreamResponse(LogStream(hub, subscriber, spec), hub.broker, subscriber)
