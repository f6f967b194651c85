"""Rate limits on real servers: shared by replicas through Redis, in memory without it, open
while Redis is away; auth failures per address, proxies believed only when trusted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

import httpx
import pytest
import redis
from conftest import ADMIN, RedisProcess, Server, assert_error, auth, mint, sql, unique

from rate_limits import group_of

WORKER = auth(mint("worker", "publish:* consume:* subscribe:* manage:*"))
OTHER = auth(mint("other", "publish:* consume:* subscribe:* manage:*"))
FORGED = auth(mint("worker", "admin", secret="not-the-servers-secret-" + "y" * 20))
RATE_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "x-ratelimit-limit")
# Blank switches a group off (an empty value would leave the variable unset: conftest's Server).
UNLIMITED = {f"rate_limit_{group}": " " for group in ("publish", "claim", "read", "tokens", "auth_failures")}


async def make_queue(server: Server) -> str:
    name = unique()
    async with server.client() as http:
        assert (await http.post("/api/v1/queues", json={"name": name})).status_code == 201
    return name


def assert_limited(response: httpx.Response, limit: int) -> None:
    """A 429 `rate_limited` in the envelope, saying when to come back and where the caller stands."""
    assert_error(response, 429, "rate_limited")
    headers = response.headers
    assert 1 <= int(headers["retry-after"]) <= 3600
    assert headers["ratelimit-limit"] == headers["x-ratelimit-limit"] == str(limit)
    assert headers["ratelimit-remaining"] == headers["x-ratelimit-remaining"] == "0"
    assert int(headers["ratelimit-reset"]) == int(headers["retry-after"])
    assert abs(int(headers["x-ratelimit-reset"]) - (time.time() + int(headers["retry-after"]))) <= 2


def statuses(responses: Iterable[httpx.Response]) -> list[int]:
    return sorted(response.status_code for response in responses)


async def stored(server: Server, queue: str) -> int:
    [(count,)] = await sql(
        server, "SELECT COUNT(*) FROM messages m JOIN queues q ON q.id = m.queue_id WHERE q.name = ?", queue
    )
    return int(count)


async def test_two_replicas_share_one_budget_in_redis(
    make_server: Any, pg_url: str, own_redis: RedisProcess
) -> None:
    budget = 20
    shared = {"database_url": pg_url, "redis_url": own_redis.url, "rate_limit_publish": f"{budget}/hour"}
    replicas = [make_server(**shared).start(), make_server(**shared).start()]
    queue = await make_queue(replicas[0])
    clients = [replica.client(WORKER) for replica in replicas]
    try:
        path = f"/api/v1/queues/{queue}/messages"
        sent = [clients[i % 2].post(path, content=f"m{i}") for i in range(2 * budget)]
        answers = await asyncio.gather(*sent)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    accepted = [a for a in answers if a.status_code == 201]
    # Each replica alone would have taken its 20: one budget, not one each.
    assert abs(len(accepted) - budget) <= 1, statuses(answers)
    assert {a.status_code for a in answers} == {201, 429}
    for answer in answers:
        if answer.status_code == 429:
            assert_limited(answer, budget)
    assert await stored(replicas[0], queue) == len(accepted)  # a refused publish stored nothing
    keys = own_redis_keys(own_redis)
    assert keys and all(key.startswith(b"pombo:ratelimits:") for key in keys)


def own_redis_keys(redis_process: RedisProcess) -> list[bytes]:
    client = redis.Redis(port=redis_process.port)
    try:
        return [key for key in client.keys("*") if b"ratelimit" in key]
    finally:
        client.close()


async def test_in_memory_counts_each_subject_and_tells_where_it_stands(make_server: Any) -> None:
    server = make_server(rate_limit_read="3/hour").start()
    async with server.client(WORKER) as worker, server.client(OTHER) as other:
        seen = [await worker.get("/api/v1/queues") for _ in range(3)]
        assert [r.status_code for r in seen] == [200, 200, 200]
        assert [r.headers["ratelimit-remaining"] for r in seen] == ["2", "1", "0"]
        assert all(
            r.headers["ratelimit-limit"] == "3" and int(r.headers["ratelimit-reset"]) > 0 for r in seen
        )
        assert_limited(await worker.get("/api/v1/queues"), 3)
        assert_limited(await worker.get("/api/v1/me"), 3)  # every read, not one route
        assert (await other.get("/api/v1/queues")).status_code == 200  # a budget per subject
        # Health checks and the docs are not API requests: never counted.
        assert [(await worker.get(path)).status_code for path in ("/healthz", "/healthz", "/docs")] == [
            200
        ] * 3


async def test_a_limited_eventsource_is_told_to_come_back(make_server: Any) -> None:
    server = make_server(rate_limit_read="1/hour").start()
    queue = await make_queue(server)
    async with server.client(WORKER) as worker:
        assert (await worker.get(f"/api/v1/queues/{queue}")).status_code == 200
        answer = await worker.get(f"/api/v1/queues/{queue}/stream", headers={"Accept": "text/event-stream"})
        refused = await worker.get(f"/api/v1/queues/{queue}/stream")
    # A 429 makes an EventSource give up for good; a stream that says so makes it retry later.
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/event-stream")
    retry, frame = answer.text.split("\n\n", 1)
    event, data = frame.strip().split("\n")
    assert event == "event: stream.busy"
    assert json.loads(data.removeprefix("data: "))["reason"] == "rate_limited"
    assert retry == f"retry: {int(answer.headers['retry-after']) * 1000}"
    assert answer.headers["ratelimit-remaining"] == "0"
    assert_limited(refused, 1)


async def test_with_redis_stopped_requests_succeed_and_the_log_says_so_once(
    make_server: Any, own_redis: RedisProcess
) -> None:
    server = make_server(redis_url=own_redis.url, rate_limit_publish="1000/hour").start()
    queue = await make_queue(server)
    path = f"/api/v1/queues/{queue}/messages"
    async with server.client(WORKER) as worker:
        before = await worker.post(path, content="before")
        assert before.status_code == 201 and before.headers["ratelimit-remaining"] == "999"
        own_redis.stop()
        during = [await worker.post(path, content=f"during {i}") for i in range(30)]
        await asyncio.sleep(1.2)  # past a pause, so Redis is tried again (and fails again)
        during += [await worker.post(path, content=f"later {i}") for i in range(5)]
        assert [r.status_code for r in during] == [201] * len(during)
        assert not any("ratelimit-limit" in r.headers for r in during)  # uncounted, so unsaid
        own_redis.start()
        after = await until_counted(worker, path)
    assert after.status_code == 201
    log = server.log()
    assert log.count("rate limit store unavailable") == 1, log
    assert "requests go without rate limits" in log
    assert log.count("rate limit store available again") == 1, log


async def until_counted(worker: httpx.AsyncClient, path: str) -> httpx.Response:
    deadline = time.monotonic() + 10
    while True:
        answer = await worker.post(path, content="after")
        if "ratelimit-limit" in answer.headers or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.2)


async def test_auth_failures_count_per_address_behind_trusted_proxies(make_server: Any) -> None:
    server = make_server(rate_limit_auth_failures="3/hour", trusted_proxies="127.0.0.1, 10.0.0.0/8").start()
    async with httpx.AsyncClient(base_url=server.url) as http:

        async def from_(address: str, headers: dict[str, str] | None = None) -> httpx.Response:
            return await http.get("/api/v1/me", headers={"X-Forwarded-For": address, **(headers or {})})

        assert [(await from_("203.0.113.5", FORGED)).status_code for _ in range(2)] == [401, 401]
        assert (await from_("203.0.113.5")).status_code == 401  # a missing token counts too
        # A preflight carries no token by design: no failure (a 405 here, without CORS).
        assert (
            await http.options("/api/v1/me", headers={"X-Forwarded-For": "203.0.113.5"})
        ).status_code == 405
        assert_limited(await from_("203.0.113.5"), 3)
        # What the client wrote left of the hop our proxy appended is not believed...
        assert_limited(await from_("198.51.100.7, 203.0.113.5"), 3)
        # ...nor are our own proxies' hops: the right-most untrusted one is the client.
        assert_limited(await from_("203.0.113.5, 10.1.2.3"), 3)
        assert (await from_("203.0.113.6")).status_code == 401  # another address, its own budget
        # A good token from the same address is not a failure, whatever came before.
        assert (await from_("203.0.113.5", WORKER)).status_code == 200


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_server: Any) -> None:
    server = make_server(rate_limit_auth_failures="2/hour", trusted_proxies="10.0.0.0/8").start()
    async with httpx.AsyncClient(base_url=server.url) as http:
        for spoofed in ("203.0.113.1", "203.0.113.2"):
            answer = await http.get("/api/v1/me", headers={"X-Forwarded-For": spoofed})
            assert answer.status_code == 401
        # Each claimed to be someone else; all were 127.0.0.1, whose budget is spent.
        assert_limited(await http.get("/api/v1/me", headers={"X-Forwarded-For": "203.0.113.3"}), 2)


async def every_group(server: Server, headers: dict[str, str], queue: str) -> dict[str, httpx.Response]:
    """Two requests of each group by the same caller; the second of each, by group."""
    token = {"sub": unique("minted"), "scope": "subscribe:*"}
    requests = {
        "publish": ("POST", f"/api/v1/queues/{queue}/messages", {"content": "hello"}),
        "claim": ("POST", f"/api/v1/queues/{queue}/claim", {"json": {"max": 1}}),
        "read": ("GET", f"/api/v1/queues/{queue}", {}),
        "tokens": ("POST", "/api/v1/tokens", {"json": token}),
    }
    second = {}
    async with server.client(headers) as http:
        for group, (method, path, options) in requests.items():
            for _ in range(2):
                second[group] = await http.request(method, path, **options)
    async with server.client(FORGED) as forged:
        for _ in range(2):
            second["auth_failures"] = await forged.get("/api/v1/me")
    return second


async def test_each_group_is_limited_and_an_empty_setting_switches_it_off(make_server: Any) -> None:
    groups = ("publish", "claim", "read", "tokens", "auth_failures")
    tight = make_server(rate_limit_exempt_admins="false", **{f"rate_limit_{g}": "1/hour" for g in groups})
    tight.start()
    queue = await make_queue(tight)  # creating a queue is in no group
    second = await every_group(tight, ADMIN, queue)
    for group in groups:
        assert_limited(second[group], 1)
    assert await stored(tight, queue) == 1  # the refused publish stored nothing
    off = make_server(rate_limit_exempt_admins="false", **UNLIMITED).start()
    queue = await make_queue(off)
    for group, answer in (await every_group(off, ADMIN, queue)).items():
        assert answer.status_code == 401 if group == "auth_failures" else answer.status_code < 300, group
        assert "ratelimit-limit" not in answer.headers


async def test_admins_are_exempt_unless_told_otherwise(make_server: Any) -> None:
    server = make_server(rate_limit_read="1/hour").start()  # POMBO_RATE_LIMIT_EXEMPT_ADMINS: true
    async with server.client(ADMIN) as admin, server.client(WORKER) as worker:
        answers = [await admin.get("/api/v1/queues") for _ in range(3)]
        assert [a.status_code for a in answers] == [200] * 3
        assert "ratelimit-limit" not in answers[0].headers
        assert (await worker.get("/api/v1/queues")).status_code == 200
        assert_limited(await worker.get("/api/v1/queues"), 1)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("POMBO_RATE_LIMIT_PUBLISH", "lots"),
        ("POMBO_RATE_LIMIT_READ", "0/minute"),
        ("POMBO_TRUSTED_PROXIES", "proxy"),
    ],
)
def test_a_bad_setting_stops_the_start(make_server: Any, name: str, value: str) -> None:
    server = make_server(**{name: value})
    with pytest.raises(RuntimeError, match=f"invalid setting {name}"):
        server.start()


@pytest.mark.parametrize(
    ("method", "path", "group"),
    [
        ("POST", "/api/v1/queues/q/messages", "publish"),
        ("POST", "/api/v1/queues/q/messages/batch", "publish"),
        ("POST", "/api/v1/notifications", "publish"),
        ("POST", "/api/v1/queues/q/claim", "claim"),
        ("POST", "/api/v1/queues/q/messages/m1/ack", "claim"),
        ("POST", "/api/v1/queues/q/messages/m1/nack", "claim"),
        ("POST", "/api/v1/queues/q/messages/m1/extend", "claim"),
        ("POST", "/api/v1/queues/q/ack", "claim"),
        ("GET", "/api/v1/queues/q/stream", "read"),
        ("GET", "/api/v1/stream", "read"),
        ("GET", "/api/v1/notifications/stream", "read"),
        ("GET", "/api/v1/tokens", "read"),
        ("POST", "/api/v1/tokens", "tokens"),
        ("DELETE", "/api/v1/tokens/t1", "tokens"),
        ("POST", "/api/v1/queues", None),
        ("PATCH", "/api/v1/queues/q", None),
        ("POST", "/api/v1/queues/q/redrive", None),
        ("DELETE", "/api/v1/queues/q/messages/m1", None),
        ("POST", "/api/v1/notifications/mark-all-read", None),
    ],
)
def test_each_request_counts_against_its_group(method: str, path: str, group: str | None) -> None:
    assert group_of(method, path) == group
