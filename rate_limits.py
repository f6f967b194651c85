"""Rate limits: each API request counted against its group's budget, per subject or address.

A request's group follows from its method and path alone (`group_of`), so routes carry nothing
of it. Callers with a token are counted by its subject, callers without one by their address;
requests refused for a bad or missing token are counted by address, in a budget of their own.
Counts live in fixed windows aligned to the clock, in Redis when replicas share one, else in
this process: one round trip tells both what is left and when the window ends, so every
limited answer says so in its headers.
"""

from __future__ import annotations

import math
import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth import Principal
from deps import caller
from errors import ApiError, envelope, rate_limited
from proxies import peer_address
from rate_counts import Count, Counters
from settings import Settings, rate_limits
from streams import busy_stream, wants_event_stream

API = "/api/v1/"
GROUPS = ("publish", "claim", "read", "tokens")
AUTH_FAILURES = "auth_failures"
_CONSUMING = frozenset({"claim", "ack", "nack", "extend"})
_PUBLISHING = (["messages"], ["messages", "batch"])


def group_of(method: str, path: str) -> str | None:
    """The budget an API request counts against; None for those no group limits (managing
    queues, changing one's notifications)."""
    if method == "GET":
        return "read"  # lists, reads, exports, and opening a stream
    parts = path.removeprefix(API).split("/")
    if parts[0] == "tokens":
        return "tokens" if method in ("POST", "DELETE") else None
    if method != "POST":
        return None
    if parts == ["notifications"]:
        return "publish"
    if parts[0] == "queues" and len(parts) > 2:
        tail = parts[2:]
        if tail in _PUBLISHING:
            return "publish"
        if tail[-1] in _CONSUMING:
            return "claim"
    return None


def count_headers(count: Count, now: float) -> list[tuple[bytes, bytes]]:
    """`RateLimit-*` as draft-ietf-httpapi-ratelimit-headers (-06) has them (the reset in seconds
    from now), and `X-RateLimit-*` as GitHub's API made them common (the reset as a Unix time)."""
    limit, remaining = b"%d" % count.limit, b"%d" % count.remaining
    return [
        (b"ratelimit-limit", limit),
        (b"ratelimit-remaining", remaining),
        (b"ratelimit-reset", b"%d" % count.retry_after),
        (b"x-ratelimit-limit", limit),
        (b"x-ratelimit-remaining", remaining),
        (b"x-ratelimit-reset", b"%d" % math.ceil(now + count.reset)),
    ]


class RateLimits:
    """Middleware: counts each API request against its group, answers 429 `rate_limited` past
    the budget (an EventSource a `stream.busy` stream, which it retries), and tells a counted
    request's caller where it stands in `RateLimit-*` headers."""

    def __init__(self, app: ASGIApp, settings: Settings, counters: Counters) -> None:
        self.app = app
        self.budgets = {group: rate_limits(getattr(settings, f"rate_limit_{group}")) for group in GROUPS}
        self.auth_failures = rate_limits(settings.rate_limit_auth_failures)
        self.exempt_admins = settings.rate_limit_exempt_admins
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API):
            await self.app(scope, receive, send)
            return
        group = group_of(scope["method"], scope["path"])
        items = self.budgets.get(group) if group else None
        if not items and (not self.auth_failures or scope["method"] == "OPTIONS"):
            await self.app(scope, receive, send)  # a preflight carries no token, by the spec
            return
        request = Request(scope)
        try:
            principal = caller(request)
        except ApiError:  # the route answers 401 in turn, unless this address has had its fill
            await self._unauthorized(request, receive, send)
            return
        if group is None or not items or (self.exempt_admins and principal.is_admin):
            await self.app(scope, receive, send)
            return
        count = await self.counters.hit(items, group, self._who(request, principal))
        if count is None:
            await self.app(scope, receive, send)
        elif count.over:
            await self._refusal(request, group, count)(scope, receive, send)
        else:
            await self.app(scope, receive, _with_headers(send, count_headers(count, time.time())))

    def _who(self, request: Request, principal: Principal) -> str:
        if principal is request.app.state.anonymous:
            return f"address:{peer_address(request.scope)}"
        return f"subject:{principal.subject}"

    async def _unauthorized(self, request: Request, receive: Receive, send: Send) -> None:
        count = None
        if self.auth_failures:
            address = f"address:{peer_address(request.scope)}"
            count = await self.counters.hit(self.auth_failures, AUTH_FAILURES, address)
        if count is not None and count.over:
            await self._refusal(request, AUTH_FAILURES, count)(request.scope, receive, send)
        else:
            await self.app(request.scope, receive, send)

    def _refusal(self, request: Request, group: str, count: Count) -> Response:
        what = f"{group} requests" if group != AUTH_FAILURES else "requests with a bad or missing token"
        message = f"too many {what}: {count.limit} a window; retry in {count.retry_after} s"
        response: Response
        if request.method == "GET" and wants_event_stream(request.headers.get("accept", "")):
            response = busy_stream("rate_limited", message, count.limit, count.retry_after)
            response.headers["Retry-After"] = str(count.retry_after)
        else:
            response = envelope(rate_limited(message, count.retry_after, group=group, limit=count.limit))
        response.raw_headers.extend(count_headers(count, time.time()))
        return response


def _with_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *headers]
        await send(message)

    return sending
