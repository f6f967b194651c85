"""Who sent a request: its peer, or behind reverse proxies we trust, the address they forwarded."""

from __future__ import annotations

import ipaddress

from starlette.types import Scope

from settings import Network


def client_address(scope: Scope, trusted: tuple[Network, ...]) -> str:
    """The peer's address; when the peer is a trusted proxy, the right-most untrusted hop of
    `X-Forwarded-For` (each proxy appends the address it got the request from, so hops left of
    the first one a trusted proxy wrote are the client's to invent)."""
    client = scope.get("client")
    address = str(client[0]) if client else ""
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


def _within(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # a Unix socket has no address
    return any(ip in network for network in trusted)


def _forwarded_for(scope: Scope) -> list[str]:
    """Every hop of every `X-Forwarded-For` header, in order (RFC 9110 §5.3: one list)."""
    values = [value.decode("latin-1") for name, value in scope["headers"] if name == b"x-forwarded-for"]
    return ",".join(values).split(",") if values else []
