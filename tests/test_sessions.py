"""The dashboard's session cookie on a real server: what it is, what it may do, and from where."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import Server, assert_error, auth, mint, snapshot, unique


@pytest.fixture
async def http(sqlite_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """A client with no token of its own: what it may do, the cookie lets it."""
    async with sqlite_server.client(headers={}) as client:
        yield client


def own(server: Server) -> dict[str, str]:
    return {"Origin": server.url}


async def sign_in(http: httpx.AsyncClient, server: Server, token: str) -> httpx.Response:
    return await http.post("/api/v1/session", json={"token": token}, headers=own(server))


async def test_signing_in_sets_an_http_only_strict_cookie_for_the_tokens_lifetime(
    sqlite_server: Server, http: httpx.AsyncClient
) -> None:
    answer = await sign_in(http, sqlite_server, mint("dora", "subscribe:*", ttl=600))
    assert answer.status_code == 200 and answer.json()["subject"] == "dora"
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    # The token's remaining lifetime, less the seconds minting and signing in took on a busy machine.
    max_age = re.search(r"max-age=([0-9]+);", cookie)
    assert max_age and 590 <= int(max_age.group(1)) <= 600, cookie
    assert "secure" not in cookie  # plain HTTP
    assert (await http.get("/api/v1/me")).json()["subject"] == "dora"
    assert (await http.get("/api/v1/session")).json()["me"]["subject"] == "dora"

    signed_out = await http.delete("/api/v1/session", headers=own(sqlite_server))
    assert signed_out.status_code == 204 and 'pombo_session=""' in signed_out.headers["set-cookie"]
    assert (await http.get("/api/v1/session")).json() == {"me": None, "ended": None}
    assert_error(await http.get("/api/v1/me"), 401, "unauthorized")


async def test_behind_a_trusted_https_proxy_the_cookie_is_secure(make_server: Any) -> None:
    server = make_server(trusted_proxies="127.0.0.1").start()
    host = server.url.removeprefix("http://")
    headers = {"X-Forwarded-Proto": "https", "Origin": f"https://{host}"}
    async with server.client(headers={}) as http:
        answer = await http.post("/api/v1/session", json={"token": mint()}, headers=headers)
    assert answer.status_code == 200 and "secure" in answer.headers["set-cookie"].lower()


async def test_an_untrusted_peer_cannot_claim_https(sqlite_server: Server, http: httpx.AsyncClient) -> None:
    host = sqlite_server.url.removeprefix("http://")
    claimed = {"X-Forwarded-Proto": "https", "Origin": f"https://{host}"}
    refused = await http.post("/api/v1/session", json={"token": mint()}, headers=claimed)
    assert_error(refused, 403, "cross_origin")  # the page was not served over HTTPS by us
    plain = {"X-Forwarded-Proto": "https", "Origin": sqlite_server.url}
    answer = await http.post("/api/v1/session", json={"token": mint()}, headers=plain)
    assert answer.status_code == 200 and "secure" not in answer.headers["set-cookie"].lower()


async def test_a_bad_token_sets_no_cookie(sqlite_server: Server, http: httpx.AsyncClient) -> None:
    refused = await sign_in(http, sqlite_server, mint(secret="another-secret-" + "y" * 40))
    assert_error(refused, 401, "unauthorized")
    assert "set-cookie" not in refused.headers


async def test_the_cookie_reads_and_streams(sqlite_server: Server, http: httpx.AsyncClient) -> None:
    queue = unique()
    async with sqlite_server.client() as admin:
        await admin.post("/api/v1/queues", json={"name": queue})
    await sign_in(http, sqlite_server, mint("erin", f"subscribe:{queue}"))
    assert (await http.get(f"/api/v1/queues/{queue}/messages")).status_code == 200
    async with http.stream("GET", f"/api/v1/queues/{queue}/stream") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
    assert_error(await http.get("/api/v1/queues/other/messages"), 403, "forbidden")  # its scopes hold


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "same-site"},  # a sibling subdomain is the same site, not our origin
        {},  # neither: a browser always sends one of them on a POST
    ],
)
async def test_a_change_signed_in_by_cookie_must_come_from_our_own_pages(
    sqlite_server: Server, http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    queue = unique()
    await sign_in(http, sqlite_server, mint("frank", f"manage:{queue} publish:{queue}"))
    before = await snapshot(sqlite_server)
    refused = await http.post("/api/v1/queues", json={"name": queue}, headers=headers)
    assert_error(refused, 403, "cross_origin")
    published = await http.post(f"/api/v1/queues/{queue}/messages", content="x", headers=headers)
    assert_error(published, 403, "cross_origin")
    assert await snapshot(sqlite_server) == before


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "same-origin"}, {"Origin": "own"}])
async def test_a_change_from_our_own_pages_goes_through(
    sqlite_server: Server, http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    queue = unique()
    await sign_in(http, sqlite_server, mint("grace", f"manage:{queue}"))
    headers = {k: sqlite_server.url if v == "own" else v for k, v in headers.items()}
    assert (await http.post("/api/v1/queues", json={"name": queue}, headers=headers)).status_code == 201


async def test_a_bearer_token_needs_no_origin(sqlite_server: Server, http: httpx.AsyncClient) -> None:
    """Scripts and other sites' pages that hold a token send it themselves: nothing ambient to abuse."""
    queue = unique()
    headers = {**auth(mint("hal", f"manage:{queue}")), "Origin": "https://elsewhere.example"}
    assert (await http.post("/api/v1/queues", json={"name": queue}, headers=headers)).status_code == 201


async def test_signing_in_from_another_site_is_refused(
    sqlite_server: Server, http: httpx.AsyncClient
) -> None:
    headers = {"Origin": "https://evil.example"}
    refused = await http.post("/api/v1/session", json={"token": mint()}, headers=headers)
    assert_error(refused, 403, "cross_origin")
    assert "set-cookie" not in refused.headers


async def test_a_revoked_tokens_session_says_so(sqlite_server: Server, http: httpx.AsyncClient) -> None:
    async with sqlite_server.client() as admin:
        minted = (await admin.post("/api/v1/tokens", json={"sub": "ivy", "scope": ""})).json()
        await sign_in(http, sqlite_server, minted["token"])
        await admin.delete(f"/api/v1/tokens/{minted['id']}")
    assert (await http.get("/api/v1/session")).json() == {"me": None, "ended": "the token was revoked"}
    assert_error(await http.get("/api/v1/me"), 401, "unauthorized")


async def test_the_page_and_its_files_need_no_token(sqlite_server: Server, http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    assert "require-trusted-types-for 'script'; trusted-types pombo" in policy
    script = await http.get("/dashboard/js/main.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert (await http.head("/")).status_code == 200
