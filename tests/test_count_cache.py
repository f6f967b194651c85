"""Queue counts read through a cache keyed by the log's head: fresh after every change, on every
replica, through a Redis outage, and in memory without Redis."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

import httpx
import redis
from conftest import RedisProcess, Server, assert_error, snapshot, unique

from count_cache import PAUSE_SECONDS

STATUSES = ("pending", "processing", "done", "dead")


def replicas(make_server: Any, pg_url: str, redis_url: str, **settings: str) -> tuple[str, Server, Server]:
    prefix = f"test-{secrets.token_hex(4)}"
    pair = [
        make_server(database_url=pg_url, redis_url=redis_url, redis_prefix=prefix, **settings).start()
        for _ in range(2)
    ]
    return prefix, pair[0], pair[1]


def stored_counts(redis_url: str, prefix: str) -> int:
    return len(redis.Redis.from_url(redis_url).keys(f"{prefix}:counts:*"))


async def counts_everywhere(servers: tuple[Server, ...], queue: str) -> list[dict[str, int]]:
    """The queue's counts as each server's queue read and queue list show them, twice each
    (the second read is the one a filled key answers)."""
    seen = []
    for server in servers:
        async with server.client() as http:
            for _ in range(2):
                one = await http.get(f"/api/v1/queues/{queue}")
                assert one.status_code == 200, one.text
                listed = await http.get("/api/v1/queues", params={"limit": 200})
                assert listed.status_code == 200, listed.text
                seen += [
                    one.json()["messages"],
                    *(q["messages"] for q in listed.json()["items"] if q["name"] == queue),
                ]
    return seen


def expect(**counts: int) -> dict[str, int]:
    return {status: counts.get(status, 0) for status in STATUSES}


async def assert_counts(servers: tuple[Server, ...], queue: str, **counts: int) -> None:
    seen = await counts_everywhere(servers, queue)
    assert seen == [expect(**counts)] * len(seen)


async def post(http: httpx.AsyncClient, path: str, body: Any = None, status: int = 200) -> Any:
    response = await http.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


async def walk_through_changes(
    a: httpx.AsyncClient, b: httpx.AsyncClient, servers: tuple[Server, ...], queue: str
) -> None:
    """Create, publish, claim, ack, nack, delete and a refused ack; the counts after each step."""
    path = f"/api/v1/queues/{queue}"
    await post(a, "/api/v1/queues", {"name": queue}, 201)
    await assert_counts(servers, queue)
    await post(a, f"{path}/messages/batch", {"items": [{"body": n} for n in range(3)]}, 201)
    await assert_counts(servers, queue, pending=3)
    acked, nacked = (await post(b, f"{path}/claim", {"max": 2}))["items"]
    await assert_counts(servers, queue, pending=1, processing=2)
    await post(a, f"{path}/messages/{acked['id']}/ack", {"lease_id": acked["lease_id"]})
    await assert_counts(servers, queue, pending=1, processing=1, done=1)
    await post(b, f"{path}/messages/{nacked['id']}/nack", {"lease_id": nacked["lease_id"], "delay": 0})
    await assert_counts(servers, queue, pending=2, done=1)
    assert (await b.delete(f"{path}/messages/{acked['id']}")).status_code == 200
    await assert_counts(servers, queue, pending=2)

    before = await snapshot(servers[0])
    wrong_lease = await a.post(f"{path}/messages/{nacked['id']}/ack", json={"lease_id": nacked["lease_id"]})
    assert_error(wrong_lease, 409, "lease_expired")
    assert await snapshot(servers[0]) == before
    await assert_counts(servers, queue, pending=2)


async def test_counts_are_fresh_on_both_replicas_after_every_change_and_through_a_redis_outage(
    make_server: Any, pg_url: str, own_redis: RedisProcess
) -> None:
    prefix, first, second = replicas(make_server, pg_url, own_redis.url)
    both, queue = (first, second), unique()
    path = f"/api/v1/queues/{queue}"
    async with first.client() as a, second.client() as b:
        await walk_through_changes(a, b, both, queue)
        assert stored_counts(own_redis.url, prefix) > 0  # the reads above went through Redis

        own_redis.stop()
        await post(a, f"{path}/messages", {"body": "while Redis is down"}, 201)
        await assert_counts(both, queue, pending=3)
        own_redis.start()
        await post(b, f"{path}/messages", {"body": "while the cache pauses"}, 201)
        await assert_counts(both, queue, pending=4)
        await asyncio.sleep(PAUSE_SECONDS + 0.5)
        await assert_counts(both, queue, pending=4)
        assert stored_counts(own_redis.url, prefix) > 0  # back in use
        await post(a, f"{path}/messages", {"body": "after"}, 201)
        await assert_counts(both, queue, pending=5)
    assert "count cache unavailable" in first.log() + second.log()


async def test_without_redis_counts_are_kept_in_memory_and_fresh_after_every_change(
    make_server: Any,
) -> None:
    server = make_server().start()  # SQLite: one process, so the keys live in its memory
    async with server.client() as a, server.client() as b:
        await walk_through_changes(a, b, (server,), unique())


async def test_a_read_after_an_acknowledged_publish_never_shows_older_counts(
    make_server: Any, pg_url: str, redis_url: str
) -> None:
    """Other readers keep filling keys while a client publishes on one replica and reads on the other."""
    _, first, second = replicas(make_server, pg_url, redis_url)
    await publish_and_read_among_readers(first, second)


async def test_in_memory_a_read_after_an_acknowledged_publish_never_shows_older_counts(
    make_server: Any,
) -> None:
    server = make_server().start()
    await publish_and_read_among_readers(server, server)


async def publish_and_read_among_readers(first: Server, second: Server) -> None:
    queue = unique()
    async with first.client() as a, second.client() as b:
        await post(a, "/api/v1/queues", {"name": queue}, 201)
        readers = [asyncio.create_task(_keep_reading(server, queue)) for server in (first, second) * 2]
        try:
            for n in range(1, 41):
                writer, reader = (a, b) if n % 2 else (b, a)
                await post(writer, f"/api/v1/queues/{queue}/messages", {"body": n}, 201)
                shown = (await reader.get(f"/api/v1/queues/{queue}")).json()["messages"]
                assert shown["pending"] == n
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


async def _keep_reading(server: Server, queue: str) -> None:
    async with server.client() as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                await http.get("/api/v1/queues", params={"limit": 200})
                await http.get(f"/api/v1/queues/{queue}")


async def test_with_the_cache_off_counts_never_reach_redis(
    make_server: Any, pg_url: str, redis_url: str
) -> None:
    prefix, first, second = replicas(make_server, pg_url, redis_url, count_cache="false")
    queue = unique()
    async with first.client() as a:
        await post(a, "/api/v1/queues", {"name": queue}, 201)
        await post(a, f"/api/v1/queues/{queue}/messages", {"body": 1}, 201)
    await assert_counts((first, second), queue, pending=1)
    assert stored_counts(redis_url, prefix) == 0
