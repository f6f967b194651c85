"""What every response obeys, whatever route or error answered it: security headers, HEAD
answered wherever GET is, and the envelope even for a request too large for the app to see.

`HttpRules` touches only the response start (a list of headers joined on), so it costs publish
next to nothing and reaches streams too: their start passes through it before `DirectSend`
serves their frames.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable
from typing import Any, cast

from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from body_limit import READ_DEADLINE, ReadDeadline
from sse import HEAD

Headers = list[tuple[bytes, bytes]]

# The dashboard's policy (scripts and styles from files of our own origin, nothing inline), and
# the API's: a JSON answer opened in a browser runs nothing either way.
POLICY = "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'; form-action 'self'"
# The dashboard's page also enforces Trusted Types (https://w3c.github.io/trusted-types/dist/spec/):
# no string can become HTML or script there, since its code only ever builds elements and sets
# text; its one policy, `pombo`, admits the URL of its own SharedWorker and nothing else.
TRUSTED_POLICY = f"{POLICY}; require-trusted-types-for 'script'; trusted-types pombo"
# Swagger UI starts from an inline script: its page allows that script by hash, nothing else
# inline. ReDoc inserts its styles at run time (styled-components), which no hash can name: its
# page alone takes inline styles (never scripts). Its search runs in a worker made from a blob;
# Swagger UI's icons are data: images. Checked in Chromium (tests/test_http.py).
DOCS_POLICY = (
    "default-src 'self'; script-src 'self'{scripts}; style-src 'self'{styles}; "
    "img-src 'self' data:; worker-src 'self' blob:; base-uri 'none'; object-src 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
# A year, as https://hstspreload.org asks at least; no includeSubDomains: other hosts are not ours.
HSTS = b"max-age=31536000"
_INLINE = {
    "scripts": re.compile(rb"<script>(.*?)</script>", re.S),
    "styles": re.compile(rb"<style>(.*?)</style>", re.S),
}


def security_headers(hsts: bool) -> Headers:
    headers = [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
    ]
    return [*headers, (b"strict-transport-security", HSTS)] if hsts else headers


class HttpRules:
    """Outermost middleware (inside `DirectSend`): joins the security headers onto every start,
    and passes a HEAD on as a GET, whose body the server then leaves out (uvicorn sends none for
    a HEAD it received). `docs_pages` get a policy allowing their own inline code by hash;
    `trusted_pages` one that enforces Trusted Types."""

    def __init__(
        self,
        app: ASGIApp,
        hsts: bool,
        docs_pages: Iterable[str],
        styled_at_run_time: Iterable[str] = (),
        trusted_pages: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.headers = [*security_headers(hsts), (b"content-security-policy", POLICY.encode())]
        self.trusted_headers = [
            *security_headers(hsts),
            (b"content-security-policy", TRUSTED_POLICY.encode()),
        ]
        self.trusted_pages = frozenset(trusted_pages)
        self.docs_headers = security_headers(hsts)
        self.docs_pages = frozenset(docs_pages)
        self.styled_at_run_time = frozenset(styled_at_run_time)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            scope = {**scope, "method": "GET", HEAD: True}
        path = scope["path"]
        if path in self.docs_pages:
            page = _DocsPage(send, self.docs_headers, path in self.styled_at_run_time)
            await self.app(scope, receive, page.send)
            return
        extra = self.trusted_headers if path in self.trusted_pages else self.headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class GzipReads:
    """Starlette's `GZipMiddleware` for GET answers only (HEAD arrives here as GET): lists,
    exports, the docs. Other methods answer one resource, and publish did not pay the wrapper's
    per-request work lightly (NOTES.md)."""

    def __init__(self, app: ASGIApp, minimum_size: int, compresslevel: int) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=minimum_size, compresslevel=compresslevel)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            await self.gzip(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class _DocsPage:
    """Holds a docs page's start until its body is known, to name its inline code's hashes."""

    def __init__(self, send: Send, headers: Headers, styled_at_run_time: bool) -> None:
        self._send = send
        self._headers = headers
        self._styled_at_run_time = styled_at_run_time
        self._start: Message | None = None
        self._body: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._start = message
            return
        if message["type"] != "http.response.body" or self._start is None:
            await self._send(message)
            return
        self._body.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self._body)
        sources = {kind: _hashes(pattern, body) for kind, pattern in _INLINE.items()}
        if self._styled_at_run_time:  # with a hash beside it, 'unsafe-inline' would be ignored
            sources["styles"] = " 'unsafe-inline'"
        policy = DOCS_POLICY.format(**sources)
        self._start["headers"] = [
            *self._start.get("headers", ()),
            *self._headers,
            (b"content-security-policy", policy.encode()),
        ]
        await self._send(self._start)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


def _hashes(pattern: re.Pattern[bytes], page: bytes) -> str:
    found = (base64.b64encode(hashlib.sha256(code).digest()).decode() for code in pattern.findall(page))
    return "".join(f" 'sha256-{digest}'" for digest in found)


# Beyond these the server refuses before the app sees the request, as nginx does (its request
# line and header buffers are 8 KiB each): a longer URL is 414, more header bytes 431. A stream
# of many queues and a token in its URL stays far below; without the header cap, httptools
# would hold a 10 MB header whole.
MAX_URL_BYTES = 16 * 1024
MAX_HEADER_BYTES = 32 * 1024


class _Refused(Exception):
    def __init__(self, status: int, part: str, limit: int) -> None:
        super().__init__(part)
        self.status, self.part, self.limit = status, part, limit


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on the URL and the headers, a deadline for each
    request, and every request it refuses itself (too large, too slow, or not HTTP) answered in
    the error envelope, not plain text.

    uvicorn times only the wait between requests: a client that connected and sent nothing, or
    sent its headers or its body a byte at a time, held its connection for good (slow loris).
    Now a request must be whole `read_timeout` seconds after its first byte (or after the
    connection, for its first request). A late head is answered here; a late body by the app
    (`body_limit.ReadDeadline`), in the envelope and its access line like any other answer.
    """

    hsts = False
    read_timeout = 60.0
    _header_bytes = 0
    _refused: _Refused | None = None
    _timer: asyncio.TimerHandle | None = None
    _due = 0.0
    _head_done = False
    _deadline: ReadDeadline | None = None

    @classmethod
    def configured(cls, hsts: bool, read_timeout: float) -> type[BoundedHttpTools]:
        return type(cls.__name__, (cls,), {"hsts": hsts, "read_timeout": read_timeout})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._due = self.loop.time() + self.read_timeout
        self._arm(self._nothing_came)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._deadline = ReadDeadline(self.read_timeout)
        cast(dict[str, Any], self.scope)[READ_DEADLINE] = self._deadline
        self._due, self._head_done = self.loop.time() + self.read_timeout, False
        self._arm(self._too_slow)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._head_done = True

    def on_message_complete(self) -> None:
        self._arm(None)
        super().on_message_complete()

    def _arm(self, expired: Callable[[], None] | None) -> None:
        """Call `expired` at the deadline (None: disarm)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if expired is None else self.loop.call_at(self._due, expired)

    def _nothing_came(self) -> None:
        self.transport.close()  # nothing to answer, as after an idle keep-alive

    def _too_slow(self) -> None:
        if self.transport.is_closing():
            return
        if self._head_done:
            self._body_too_slow()
            return
        message = f"the request's headers did not arrive within {self.read_timeout:g} s"
        self._refuse(408, "request_timeout", message, {"timeout": self.read_timeout})

    def _body_too_slow(self) -> None:
        cycle, deadline = self.cycle, self._deadline
        if cycle.response_complete or deadline is None:  # answered without its body (a 401)
            self.transport.close()
            return
        deadline.passed = True  # BodyLimit answers 408 at the route's next read...
        cycle.keep_alive = False  # ...after which the rest of the body cannot be told apart
        cycle.message_event.set()  # wake that read now

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_URL_BYTES:
            self._refused = _Refused(414, "url", MAX_URL_BYTES)
            raise self._refused  # httptools stops parsing: uvicorn calls send_400_response

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refused = _Refused(431, "headers", MAX_HEADER_BYTES)
            raise self._refused
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        self._arm(None)
        refused = self._refused
        if refused is None:
            self._refuse(400, "malformed_request", "not a valid HTTP/1.1 request", {})
            return
        message = f"the request's {refused.part} exceed {refused.limit} bytes"
        self._refuse(refused.status, "too_large", message, {"limit": refused.limit})

    def _refuse(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        """Answer in the envelope, then close: the rest of the request cannot be read."""
        body = json.dumps({"error": {"code": code, "message": message, "details": details}}).encode()
        lines = [b"HTTP/1.1 %d %s" % (status, _REASONS[status])]
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-request-id", f"{random.getrandbits(128):032x}".encode()),
            *security_headers(self.hsts),
            (b"content-security-policy", POLICY.encode()),
        ]
        lines += [name + b": " + value for name, value in headers]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transport.close()


_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}
