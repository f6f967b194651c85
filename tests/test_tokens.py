"""Admins mint, list and revoke tokens; a revoked token is refused, on every replica."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from conftest import Listener, Server, auth, mint, unique


async def mint_over_http(http: httpx.AsyncClient, scope: str = "subscribe:*") -> dict[str, Any]:
    response = await http.post("/api/v1/tokens", json={"sub": unique("svc"), "scope": scope, "ttl": "1h"})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_an_admin_mints_a_token_that_works_and_is_listed_without_its_secret(
    server: Server, client: httpx.AsyncClient
) -> None:
    minted = await mint_over_http(client, "publish:builds.* subscribe:*")
    me = await client.get("/api/v1/me", headers=auth(minted["token"]))
    assert me.json()["subject"] == minted["subject"]
    assert me.json()["scopes"] == ["publish:builds.*", "subscribe:*"]
    listed = (await client.get("/api/v1/tokens", params={"limit": 200})).json()["items"]
    [row] = [t for t in listed if t["id"] == minted["id"]]
    assert "token" not in row
    assert row["revoked_at"] is None


async def test_a_revoked_token_is_refused_at_once(server: Server, client: httpx.AsyncClient) -> None:
    minted = await mint_over_http(client)
    assert (await client.get("/api/v1/me", headers=auth(minted["token"]))).status_code == 200
    revoked = await client.delete(f"/api/v1/tokens/{minted['id']}")
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    refused = await client.get("/api/v1/me", headers=auth(minted["token"]))
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "the token was revoked"
    assert (await client.delete("/api/v1/tokens/nope")).status_code == 404


async def test_a_revoked_tokens_open_streams_end_within_a_heartbeat(make_server: Any) -> None:
    server = make_server(heartbeat_seconds="0.3").start()
    async with server.client() as http:
        minted = await mint_over_http(http, "subscribe:*")
        queue = unique()
        assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
        viewer = auth(minted["token"])
        urls = [f"{server.url}/api/v1/queues/{queue}/stream", f"{server.url}/api/v1/notifications/stream"]
        async with Listener(urls[0], viewer) as on_queue, Listener(urls[1], viewer) as on_inbox:
            assert (await http.delete(f"/api/v1/tokens/{minted['id']}")).status_code == 200
            revoked = time.monotonic()
            for listener in (on_queue, on_inbox):
                [ended] = await listener.wait_for(1, timeout=5, event="stream.expired")
                assert json.loads(ended.data) == {"reason": "token_revoked"}
                assert ended is listener.events[-1][1] and listener.events[-1][0] - revoked < 1.5
                await listener.wait_for(len(listener.events) + 1, timeout=2)  # until the server closes it
                assert listener.finished


async def test_only_admins_manage_tokens(server: Server, client: httpx.AsyncClient) -> None:
    someone = auth(mint("someone", "manage:* publish:* subscribe:* notify"))
    body = {"sub": "x", "scope": "admin"}
    assert (await client.post("/api/v1/tokens", json=body, headers=someone)).status_code == 403
    assert (await client.get("/api/v1/tokens", headers=someone)).status_code == 403
    assert (await client.delete("/api/v1/tokens/anything", headers=someone)).status_code == 403


async def test_bad_scopes_or_ttl_are_refused(server: Server, client: httpx.AsyncClient) -> None:
    for body in (
        {"sub": "x", "scope": "read:*"},
        {"sub": "x", "ttl": "0"},
        {"sub": "x", "ttl": "soon"},
        {"sub": "x", "ttl": "3000000d"},  # an expiry past the year 9999
        {"sub": "x", "ttl": "3651d"},
        {"sub": ""},
    ):
        response = await client.post("/api/v1/tokens", json=body)
        assert response.status_code == 422, body


async def test_a_revocation_reaches_the_other_replica_within_seconds(replicas: tuple[Server, Server]) -> None:
    first, second = replicas
    async with first.client() as one, second.client() as two:
        minted = await mint_over_http(one)
        assert (await two.get("/api/v1/me", headers=auth(minted["token"]))).status_code == 200
        await one.delete(f"/api/v1/tokens/{minted['id']}")
        started = time.monotonic()
        while (await two.get("/api/v1/me", headers=auth(minted["token"]))).status_code != 401:
            assert time.monotonic() - started < 5, "the other replica still accepts a revoked token"
            await asyncio.sleep(0.1)
