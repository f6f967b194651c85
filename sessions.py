"""The dashboard's sign-in: the token kept in an HttpOnly cookie, so no token sits in a URL.

A browser sends a cookie with every request to its site, whoever made the page that asks, so a
request that changes something and is signed in by the cookie must prove it comes from our own
pages: `Sec-Fetch-Site: same-origin`, or where a browser sends no such header, an `Origin` equal
to the server's own (https://owasp.org/www-community/SameSite and Fetch Metadata). `SameSite=Strict`
already keeps other sites' requests from carrying the cookie; the check also covers sibling
subdomains, which are the same *site*. Reads and streams need no proof: SameSite keeps them from
other sites, and the answers reach only the page that asked (CORS).
"""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response

from errors import cross_origin

COOKIE = "pombo_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def session_token(request: Request) -> str | None:
    """The token the cookie carries; for a state-changing request, only from our own origin."""
    token = request.cookies.get(COOKIE)
    if token and request.method not in SAFE_METHODS:
        require_same_origin(request)
    return token or None


def require_same_origin(request: Request) -> None:
    """403 `cross_origin` unless the browser says the request comes from a page of ours."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        if site != "same-origin":
            raise cross_origin(f"Sec-Fetch-Site is {site!r}")
        return
    origin = request.headers.get("origin")
    if origin is None:
        raise cross_origin("neither Sec-Fetch-Site nor Origin was sent")
    if origin != _own_origin(request):
        raise cross_origin(f"Origin {origin!r} is not this server's")


def _own_origin(request: Request) -> str:
    # The Host the browser sent (a proxy passes it on); the scheme as uvicorn saw it, which
    # honours X-Forwarded-Proto from the trusted proxy.
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def keep(response: Response, request: Request, token: str, expires_at: datetime | None) -> None:
    """Set the session cookie, for as long as the token lives (a browser session without expiry)."""
    max_age = None if expires_at is None else max(int((expires_at - datetime.now(UTC)).total_seconds()), 0)
    response.set_cookie(
        COOKIE,
        token,
        max_age=max_age,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


def forget(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE, path="/", secure=request.url.scheme == "https", httponly=True, samesite="strict"
    )
