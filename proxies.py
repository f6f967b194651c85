"""Who sent a request, and how: its peer and scheme, or behind reverse proxies we trust
(`POMBO_TRUSTED_PROXIES`), the address and scheme they forwarded."""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from settings import Network

SCHEMES = {"http", "https"}


class TrustedProxies:
    """Middleware: behind a trusted proxy, the request's `client` and `scheme` become the ones
    it forwarded, so everything after (rate limits, the session cookie's `Secure`, the
    same-origin check) reads the client's. uvicorn's own handling is off: it believes any local
    peer."""

    def __init__(self, app: ASGIApp, trusted: tuple[Network, ...]) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and _within(peer_address(scope), self.trusted):
            scope["client"] = (client_address(scope, self.trusted), 0)
            proto = _last_hop(scope, b"x-forwarded-proto").lower()
            if proto in SCHEMES:
                scope["scheme"] = proto if scope["type"] == "http" else {"http": "ws", "https": "wss"}[proto]
        await self.app(scope, receive, send)


def client_address(scope: Scope, trusted: tuple[Network, ...]) -> str:
    """The peer's address; when the peer is a trusted proxy, the right-most untrusted hop of
    `X-Forwarded-For` (each proxy appends the address it got the request from, so hops left of
    the first one a trusted proxy wrote are the client's to invent)."""
    address = peer_address(scope)
    if not trusted or not _within(address, trusted):
        return address
    for hop in reversed(_forwarded_for(scope)):
        try:
            ip = ipaddress.ip_address(hop.strip().strip("[]"))
        except ValueError:
            return address  # not written by a proxy of ours: the last hop we believe
        address = str(ip)
        if not any(ip in network for network in trusted):
            return address
    return address  # proxies all the way: the left-most is as far as anyone can tell


def peer_address(scope: Scope) -> str:
    """The address the connection came from ("" for a Unix socket); behind `TrustedProxies`,
    the client's."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def _within(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # a Unix socket has no address
    return any(ip in network for network in trusted)


def _forwarded_for(scope: Scope) -> list[str]:
    return _hops(scope, b"x-forwarded-for")


def _hops(scope: Scope, header: bytes) -> list[str]:
    """Every hop of every `header` header, in order (RFC 9110 §5.3: one list)."""
    values = [value.decode("latin-1") for name, value in scope["headers"] if name == header]
    return ",".join(values).split(",") if values else []


def _last_hop(scope: Scope, header: bytes) -> str:
    """What the nearest proxy wrote."""
    hops = _hops(scope, header)
    return hops[-1].strip() if hops else ""
