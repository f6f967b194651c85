"""Server-Sent Events on the wire: frames, the streaming response, and the ASGI layer that
serves a stream with the server's own `send`.

What a stream says is `streams.py`'s business; how it reaches the socket is this module's. See
https://html.spec.whatwg.org/multipage/server-sent-events.html for the format.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from event_log import Update
from log_pages import Page

CHUNK_BYTES = 64 * 1024
DETACHED = "pombo.detached"
HEAD = "pombo.head"  # set by http_rules.HttpRules on a HEAD it passes on as a GET
HEARTBEAT = b":\n\n"


class Servable(Protocol):
    """A stream the response hands the connection to once its headers are out."""

    request_id: str

    async def serve(self, receive: Receive, send: Send) -> None: ...

    def abandon(self) -> None:
        """The response never started (or was a HEAD): release what the stream holds."""


def frame(update: Update) -> bytes:
    """The SSE frame for an update, encoded once and shared by every subscriber."""
    encoded = update.frame
    if encoded is None:
        encoded = f"id: {update.seq}\nevent: {update.type}\ndata: {update.data}\n\n".encode()
        update.frame = encoded
    return encoded


def labelled_frame(update: Update, label: str, cursor: str) -> bytes:
    """The frame for an update in a stream of several logs: its `id:` is the stream's whole
    cursor, and its data the resource with the log's `label` as `log`."""
    rest = update.labelled
    if rest is None:
        # The resource is a JSON object: `log` goes in as its first member, without a parse.
        members = update.data[1:]
        glue = "" if members.lstrip().startswith("}") else ","
        data = f'{{"log":{json.dumps(label)}{glue}{members}'
        rest = update.labelled = f"event: {update.type}\ndata: {data}\n\n".encode()
    return b"id: " + cursor.encode() + b"\n" + rest


def joined_chunks(frames: list[bytes]) -> list[bytes]:
    """Frames joined into writes of about CHUNK_BYTES (see `page_chunks`)."""
    chunks, piece, size = [], [], 0
    for encoded in frames:
        piece.append(encoded)
        size += len(encoded)
        if size >= CHUNK_BYTES:
            chunks.append(b"".join(piece))
            piece, size = [], 0
    return [*chunks, b"".join(piece)] if piece else chunks


def page_chunks(page: Page) -> list[bytes]:
    """A page's frames joined into writes of about CHUNK_BYTES, once for every stream that sends it.

    A write per frame made a storm of streams catching up spend seconds in socket calls; one
    write per page would copy what the client has not taken yet into every stream's buffer.
    """
    if page.chunks is None:
        page.chunks = joined_chunks([frame(update) for update in page.updates])
    return page.chunks


def control_frame(event: str, data: dict[str, object]) -> bytes:
    """A frame outside the log (no `id:`), so it never moves the client's cursor."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def more_body(chunk: bytes) -> Message:
    """The ASGI message that writes `chunk` and keeps the response open."""
    return {"type": "http.response.body", "body": chunk, "more_body": True}


# See https://html.spec.whatwg.org/multipage/server-sent-events.html and nginx's X-Accel-Buffering:
# a buffering proxy would hold events back. Endless: chunked, never a Content-Length.
SSE_HEADERS = (
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
)


class StreamResponse(Response):
    """SSE written straight to the ASGI `send`, after the request's middleware has finished.

    The response start goes through every middleware (status, request id, access line); then the
    stream is handed to `DirectSend`, the outermost layer, so an idle stream holds no middleware
    frames, no `Request` and no dependency stacks: a few coroutines and one disconnect watcher.
    Heartbeats come from the stream itself, a client that stops reading is cut by the
    `cut_stalled` watchdog, and on shutdown the stream ends cleanly (the client resumes elsewhere).
    Measured in NOTES.md.
    """

    media_type = "text/event-stream"

    def __init__(self, stream: Servable) -> None:
        # Not Response.__init__: the headers are always these, built once (SSE_HEADERS).
        self.status_code = 200
        self.background = None
        self.body = b""
        self.raw_headers = list(SSE_HEADERS)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        try:
            await send(start)
        except BaseException:
            self._stream.abandon()
            raise
        if scope.get(HEAD):  # what a GET would start, without the stream
            self._stream.abandon()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        self._stream.request_id = _request_id(start)
        detached: list[Servable] | None = scope.get(DETACHED)
        if detached is None:  # no DirectSend around the app: stream from here
            await self._stream.serve(receive, send)
        else:
            detached.append(self._stream)


def _request_id(start: Message) -> str:
    for name, value in start["headers"]:
        if name == b"x-request-id":
            return bytes(value).decode("latin-1")
    return "-"


class DirectSend:
    """Outermost ASGI layer: serves streams with the server's own `send`, after the app returned.

    Each frame of a stream otherwise passes through every middleware's `send` wrapper, which
    profiles showed to be most of the cost of a delivery at 1,000 subscribers; and an idle stream
    otherwise keeps every middleware's frame, its `Request` and its scope alive.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detached: list[Servable] = []
        # The app's scope is a copy: what the middleware adds to it is freed when it returns.
        await self.app({**scope, DETACHED: detached}, receive, send)
        if detached:
            await detached.pop().serve(receive, send)


def documented_as_sse(description: str) -> dict[str, Any]:
    """Route options that show a stream in OpenAPI: `@router.get(path, **documented_as_sse(…))`."""
    return {
        # OpenAPI reads a status code off the class; the route returns a StreamResponse anyway.
        "response_class": JSONResponse,
        "responses": {200: {"content": {"text/event-stream": {}}, "description": description}},
    }
