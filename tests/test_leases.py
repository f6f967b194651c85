"""Workers against a real server: claims under leases, ack/nack/extend, backoff, dead letters, delays,
expiring leases, long polls and retention, as a worker (or a person watching the queue) sees them."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Listener, Server, assert_error, auth, mint, snapshot, unique

LONG = 600  # a visibility timeout no test outlives: the shared server's sweeper never touches it


def queue_url(queue: str) -> str:
    return f"/api/v1/queues/{queue}"


def message_url(queue: str, message_id: str) -> str:
    return f"/api/v1/queues/{queue}/messages/{message_id}"


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def gap(later: str, earlier: str) -> float:
    """Seconds between two server timestamps."""
    return (when(later) - when(earlier)).total_seconds()


async def create_queue(http: httpx.AsyncClient, **settings: Any) -> str:
    name = unique("lease")
    response = await http.post("/api/v1/queues", json={"name": name, **settings})
    assert response.status_code == 201, response.text
    return name


async def publish(http: httpx.AsyncClient, queue: str, body: Any = "job", **envelope: Any) -> dict[str, Any]:
    response = await http.post(f"{queue_url(queue)}/messages", json={"body": body, **envelope})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def publish_many(http: httpx.AsyncClient, queue: str, count: int) -> list[str]:
    items = [{"body": i} for i in range(count)]
    response = await http.post(f"{queue_url(queue)}/messages/batch", json={"items": items})
    assert response.status_code == 201, response.text
    return [item["id"] for item in response.json()["items"]]


async def claim(http: httpx.AsyncClient, queue: str, **request: Any) -> list[dict[str, Any]]:
    response = await http.post(f"{queue_url(queue)}/claim", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"items"}, body
    return list(body["items"])


async def timed_claim(
    http: httpx.AsyncClient, queue: str, **request: Any
) -> tuple[list[dict[str, Any]], float]:
    """A claim and the monotonic time its answer arrived."""
    items = await claim(http, queue, **request)
    return items, time.monotonic()


async def claim_one(http: httpx.AsyncClient, queue: str, **request: Any) -> dict[str, Any]:
    [message] = await claim(http, queue, max=1, **request)
    return message


async def settle(
    http: httpx.AsyncClient, queue: str, message: dict[str, Any], action: str, **body: Any
) -> httpx.Response:
    """POST …/messages/{id}/{ack|nack|extend} with the message's lease (or `lease_id=` given)."""
    payload = {"lease_id": message["lease_id"], **body}
    return await http.post(f"{message_url(queue, message['id'])}/{action}", json=payload)


async def ok(response: Awaitable[httpx.Response]) -> dict[str, Any]:
    answer = await response
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


async def fetch(http: httpx.AsyncClient, queue: str, message_id: str) -> dict[str, Any]:
    return await ok(http.get(message_url(queue, message_id)))


async def events(http: httpx.AsyncClient, queue: str, type: str | None = None) -> list[dict[str, Any]]:
    response = await http.get(f"{queue_url(queue)}/events", params={"limit": 200})
    assert response.status_code == 200, response.text
    return [e for e in response.json()["items"] if type is None or e["type"] == type]


async def listed_ids(http: httpx.AsyncClient, queue: str, status: str) -> list[str]:
    page = await ok(http.get(f"{queue_url(queue)}/messages", params={"status": status, "limit": 200}))
    return [m["id"] for m in page["items"]]


async def ack_all(http: httpx.AsyncClient, queue: str, claimed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = [{"id": m["id"], "lease_id": m["lease_id"]} for m in claimed]
    return list((await ok(http.post(f"{queue_url(queue)}/ack", json={"items": items})))["items"])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5) -> float:
    """Poll until `check()` holds; the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return time.monotonic()
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def assert_lease(message: dict[str, Any], seconds: float) -> None:
    """Leased for `seconds` counted from the server's now, which is close to ours."""
    assert message["status"] == "processing", message
    assert isinstance(message["lease_id"], str) and message["lease_id"], message
    assert gap(message["lease_expires_at"], message["updated_at"]) == pytest.approx(seconds, abs=1e-3)
    expected = datetime.now(UTC) + timedelta(seconds=seconds)
    assert abs((when(message["lease_expires_at"]) - expected).total_seconds()) < 2


# Claim -------------------------------------------------------------------------------------------


async def test_claim_takes_urgent_first_then_oldest_each_under_a_lease(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=45)
    priorities = ["normal", "urgent", "low", "high", "normal", "urgent"]
    published = [await publish(client, queue, i, priority=p) for i, p in enumerate(priorities)]
    ids = [m["id"] for m in published]

    first = await claim(client, queue, max=4)
    assert [m["id"] for m in first] == [ids[1], ids[5], ids[3], ids[0]]
    for message in first:
        assert message["attempts"] == 1
        assert_lease(message, 45)  # the queue's visibility timeout
        stored = await fetch(client, queue, message["id"])
        assert (stored["status"], stored["attempts"]) == ("processing", 1)
        assert stored["lease_expires_at"] == message["lease_expires_at"]

    rest = await claim(client, queue, max=10)
    assert [m["id"] for m in rest] == [ids[4], ids[2]]  # up to max: only two were left
    assert await claim(client, queue, max=10) == []

    claimed_events = await events(client, queue, "message.claimed")
    assert [e["data"]["id"] for e in claimed_events] == [m["id"] for m in first + rest]
    assert {e["data"]["status"] for e in claimed_events} == {"processing"}
    assert {e["data"]["attempts"] for e in claimed_events} == {1}
    await ack_all(client, queue, first + rest)


async def test_claim_visibility_timeout_overrides_the_queues(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=45)
    await publish(client, queue)
    message = await claim_one(client, queue, visibility_timeout=7.5)
    assert_lease(message, 7.5)
    await ok(settle(client, queue, message, "ack"))


async def test_claim_on_an_empty_queue_answers_empty_at_once(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    started = time.monotonic()
    response = await client.post(f"{queue_url(queue)}/claim", json={"max": 5, "wait": 0})
    assert time.monotonic() - started < 0.5
    assert response.status_code == 200, response.text
    assert response.json() == {"items": []}
    missing = await client.post(f"{queue_url(unique('missing'))}/claim", json={})
    assert_error(missing, 404, "queue_not_found")


async def test_bad_claim_bodies_are_422_and_change_nothing(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    message = await publish(client, queue)
    before = await snapshot(server)
    for body in (
        {"max": 0},
        {"max": 101},
        {"wait": 21},
        {"wait": -1},
        {"visibility_timeout": 0},
        {"max": "lots"},
        {"max": 1, "surprise": True},
    ):
        response = await client.post(f"{queue_url(queue)}/claim", json=body)
        assert_error(response, 422, "validation_error")
    assert await snapshot(server) == before
    stored = await fetch(client, queue, message["id"])
    assert (stored["status"], stored["attempts"]) == ("pending", 0)


async def test_delayed_messages_are_claimable_only_from_their_time(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    soon = datetime.now(UTC) + timedelta(seconds=1.2)
    delayed = [
        await publish(client, queue, "delay", delay=1),
        await publish(client, queue, "not_before", not_before=soon.isoformat()),
        # The same instant in New York: stored in UTC, or SQLite would compare its text as earlier
        await publish(
            client, queue, "offset", not_before=soon.astimezone(timezone(-timedelta(hours=5))).isoformat()
        ),
    ]
    assert all(m["available_at"].endswith("Z") for m in delayed)
    text = await client.post(
        f"{queue_url(queue)}/messages",
        content="x-delay",
        headers={"Content-Type": "text/plain", "X-Delay": "1s"},
    )
    assert text.status_code == 201, text.text
    delayed.append(text.json())
    now = await publish(client, queue, "now")

    assert [m["id"] for m in await claim(client, queue, max=10)] == [now["id"]]
    await asyncio.sleep(0.4)
    assert await claim(client, queue, max=10) == []

    due = max(when(m["available_at"]) for m in delayed)
    await asyncio.sleep((due - datetime.now(UTC)).total_seconds() + 0.1)
    claimed = await claim(client, queue, max=10)
    assert sorted(m["id"] for m in claimed) == sorted(m["id"] for m in delayed)
    available = {m["id"]: m["available_at"] for m in delayed}
    for message in claimed:
        assert gap(message["updated_at"], available[message["id"]]) >= 0  # claimed at or after its time


# Ack ---------------------------------------------------------------------------------------------


async def test_ack_finishes_and_a_second_ack_is_409(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    await publish(client, queue)
    message = await claim_one(client, queue)
    acked = await ok(settle(client, queue, message, "ack"))
    assert acked["status"] == "done"
    assert acked["finished_at"] is not None
    assert gap(acked["finished_at"], message["updated_at"]) >= 0
    stored = await fetch(client, queue, message["id"])
    assert (stored["status"], stored["finished_at"]) == ("done", acked["finished_at"])
    assert [e["data"]["status"] for e in await events(client, queue, "message.acked")] == ["done"]

    before = await snapshot(server)
    for action in ("ack", "nack", "extend"):
        assert_error(await settle(client, queue, message, action), 409, "lease_mismatch")
    assert await snapshot(server) == before


async def test_a_wrong_or_foreign_lease_is_409_and_changes_nothing(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    await publish(client, queue, "a")
    await publish(client, queue, "b")
    a = await claim_one(client, queue)
    b = await claim_one(client, queue)
    assert a["lease_id"] != b["lease_id"]

    before = await snapshot(server)
    for lease in ("not-a-lease", b["lease_id"]):
        for action in ("ack", "nack", "extend"):
            assert_error(await settle(client, queue, a, action, lease_id=lease), 409, "lease_mismatch")
    assert await snapshot(server) == before
    assert (await fetch(client, queue, a["id"]))["status"] == "processing"

    assert (await ok(settle(client, queue, a, "ack")))["status"] == "done"
    assert (await ok(settle(client, queue, b, "ack")))["status"] == "done"


async def test_ack_after_the_lease_expired_is_409_even_if_nobody_reclaimed(make_server: Any) -> None:
    server = make_server(sweep_seconds="60").start()  # no sweeper tick during the test
    async with server.client() as http:
        queue = await create_queue(http)
        await publish(http, queue)
        stale = await claim_one(http, queue, visibility_timeout=0.3)
        await asyncio.sleep(0.5)

        before = await snapshot(server)
        for action in ("ack", "nack", "extend"):
            assert_error(await settle(http, queue, stale, action), 409, "lease_expired")
        assert await snapshot(server) == before

        stored = await fetch(http, queue, stale["id"])
        assert (stored["attempts"], stored["finished_at"]) == (1, None)


async def test_batch_ack_is_all_or_nothing(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    await publish_many(client, queue, 5)
    claimed = await claim(client, queue, max=3) + await claim(client, queue, max=2)
    assert len(claimed) == 5

    items = [{"id": m["id"], "lease_id": m["lease_id"]} for m in claimed]
    items[3]["lease_id"] = "wrong"
    before = await snapshot(server)
    response = await client.post(f"{queue_url(queue)}/ack", json={"items": items})
    assert_error(response, 409, "lease_mismatch")
    assert await snapshot(server) == before
    assert sorted(await listed_ids(client, queue, "processing")) == sorted(m["id"] for m in claimed)

    acked = await ack_all(client, queue, claimed)
    assert [m["id"] for m in acked] == [m["id"] for m in claimed]
    assert {m["status"] for m in acked} == {"done"}
    assert sorted(await listed_ids(client, queue, "done")) == sorted(m["id"] for m in claimed)
    assert len(await events(client, queue, "message.acked")) == 5


async def test_batch_ack_refuses_a_lease_of_another_claim_and_an_unknown_id(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    await publish_many(client, queue, 3)
    first, second = await claim(client, queue, max=2), await claim(client, queue, max=1)
    pairs = [{"id": m["id"], "lease_id": m["lease_id"]} for m in first + second]

    before = await snapshot(server)
    swapped = [*pairs[:2], {"id": pairs[2]["id"], "lease_id": pairs[0]["lease_id"]}]  # both leases ours
    response = await client.post(f"{queue_url(queue)}/ack", json={"items": swapped})
    assert assert_error(response, 409, "lease_mismatch")["details"] == {"message_id": pairs[2]["id"]}
    unknown = [*pairs, {"id": "no-such-message", "lease_id": pairs[0]["lease_id"]}]
    assert_error(
        await client.post(f"{queue_url(queue)}/ack", json={"items": unknown}), 404, "message_not_found"
    )
    assert await snapshot(server) == before

    assert [m["id"] for m in await ack_all(client, queue, first + second)] == [p["id"] for p in pairs]


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_batch_ack_holding_an_expired_lease_is_409_and_changes_nothing(
    make_server: Any, request: pytest.FixtureRequest, database: str
) -> None:
    settings = {"sweep_seconds": "60"}  # no sweeper tick during the test: the lease expires unswept
    if database == "postgres":
        settings["database_url"] = request.getfixturevalue("pg_url")
    server = make_server(**settings).start()
    async with server.client() as http:
        queue = await create_queue(http, visibility_timeout=LONG)
        await publish_many(http, queue, 3)
        held = await claim(http, queue, max=2)
        stale = await claim(http, queue, max=1, visibility_timeout=0.3)
        await asyncio.sleep(0.5)

        before = await snapshot(server)
        response = await http.post(
            f"{queue_url(queue)}/ack",
            json={"items": [{"id": m["id"], "lease_id": m["lease_id"]} for m in held + stale]},
        )
        assert assert_error(response, 409, "lease_expired")["details"] == {"message_id": stale[0]["id"]}
        assert await snapshot(server) == before
        assert len(await ack_all(http, queue, held)) == 2


# Nack, backoff, dead letters, redrive -------------------------------------------------------------


async def test_nack_with_a_delay_and_an_error(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    await publish(client, queue)
    message = await claim_one(client, queue)
    nacked = await ok(settle(client, queue, message, "nack", error="disk full", delay=7))
    assert (nacked["status"], nacked["attempts"], nacked["last_error"]) == ("pending", 1, "disk full")
    assert gap(nacked["available_at"], nacked["updated_at"]) == pytest.approx(7, abs=1e-3)
    assert await claim(client, queue) == []  # not before its delay
    stored = await fetch(client, queue, message["id"])
    assert (stored["status"], stored["last_error"]) == ("pending", "disk full")
    [retrying] = await events(client, queue, "message.retrying")
    assert retrying["data"]["id"] == message["id"]
    assert retrying["data"]["last_error"] == "disk full"


async def test_nack_backs_off_exponentially_with_jitter_up_to_the_cap(client: httpx.AsyncClient) -> None:
    queue = await create_queue(
        client, visibility_timeout=LONG, backoff_base=2, backoff_max=5, max_attempts=10
    )
    ids = await publish_many(client, queue, 23)
    claimed = {m["id"]: m for m in await claim(client, queue, max=23)}

    def backoff(nacked: dict[str, Any]) -> float:
        return gap(nacked["available_at"], nacked["updated_at"])

    # First attempt: between half and all of min(5, 2 * 2^0) = 2 seconds, with jitter.
    firsts = [backoff(await ok(settle(client, queue, claimed[i], "nack"))) for i in ids[:20]]
    assert all(1 - 1e-3 <= b <= 2 + 1e-3 for b in firsts), firsts
    assert max(firsts) - min(firsts) > 0.1, firsts

    # Second attempt: min(5, 4) = 4 → [2, 4]; third: min(5, 8) = 5, the cap → [2.5, 5].
    second, third = ids[20], ids[21]
    for i in (second, third):
        await ok(settle(client, queue, claimed[i], "nack", delay=0))
    again = {m["id"]: m for m in await claim(client, queue, max=10)}
    assert set(again) == {second, third}
    assert {m["attempts"] for m in again.values()} == {2}
    assert 2 - 1e-3 <= backoff(await ok(settle(client, queue, again[second], "nack"))) <= 4 + 1e-3
    await ok(settle(client, queue, again[third], "nack", delay=0))
    [last] = await claim(client, queue, max=10)
    assert (last["id"], last["attempts"]) == (third, 3)
    assert 2.5 - 1e-3 <= backoff(await ok(settle(client, queue, last, "nack"))) <= 5 + 1e-3
    await ok(settle(client, queue, claimed[ids[22]], "ack"))


async def test_nack_on_the_last_attempt_is_dead_and_redrive_brings_it_back(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client, visibility_timeout=LONG, max_attempts=2)
    doomed = await publish(client, queue, "doomed")
    bystander = await publish(client, queue, "bystander", delay=3600)

    first = await claim_one(client, queue)
    await ok(settle(client, queue, first, "nack", error="first", delay=0))
    second = await claim_one(client, queue)
    assert (second["id"], second["attempts"]) == (doomed["id"], 2)
    dead = await ok(settle(client, queue, second, "nack", error="still broken"))
    assert (dead["status"], dead["attempts"], dead["last_error"]) == ("dead", 2, "still broken")
    assert dead["finished_at"] is not None
    [event] = await events(client, queue, "message.dead")
    assert (event["data"]["id"], event["data"]["status"]) == (doomed["id"], "dead")
    assert await listed_ids(client, queue, "dead") == [doomed["id"]]
    assert await claim(client, queue) == []  # dead is not claimable

    before = await snapshot(server)
    for ids in (["no-such-message"], [bystander["id"]], [doomed["id"], "no-such-message"]):
        response = await client.post(f"{queue_url(queue)}/redrive", json={"ids": ids})
        assert_error(response, 422, "validation_error")
    assert await snapshot(server) == before

    redriven = await ok(client.post(f"{queue_url(queue)}/redrive", json={"ids": [doomed["id"]]}))
    [back] = redriven["items"]
    assert (back["id"], back["status"], back["attempts"]) == (doomed["id"], "pending", 0)
    assert [e["data"]["id"] for e in await events(client, queue, "message.redriven")] == [doomed["id"]]
    assert await listed_ids(client, queue, "dead") == []
    again = await claim_one(client, queue)
    assert (again["id"], again["attempts"]) == (doomed["id"], 1)
    await ok(settle(client, queue, again, "ack"))


async def test_redrive_without_ids_returns_every_dead_message(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=LONG, max_attempts=1)
    ids = await publish_many(client, queue, 3)
    for message in await claim(client, queue, max=3):
        assert (await ok(settle(client, queue, message, "nack")))["status"] == "dead"
    assert sorted(await listed_ids(client, queue, "dead")) == sorted(ids)

    redriven = await ok(client.post(f"{queue_url(queue)}/redrive", json={}))
    assert sorted(m["id"] for m in redriven["items"]) == sorted(ids)
    assert {(m["status"], m["attempts"]) for m in redriven["items"]} == {("pending", 0)}
    assert len(await events(client, queue, "message.redriven")) == 3
    claimed = await claim(client, queue, max=10)
    assert sorted(m["id"] for m in claimed) == sorted(ids)
    await ack_all(client, queue, claimed)
    assert (await ok(client.post(f"{queue_url(queue)}/redrive", json={})))["items"] == []


async def test_a_message_that_keeps_failing_follows_the_backoff_schedule_then_dies(
    client: httpx.AsyncClient,
) -> None:
    base = 0.3
    queue = await create_queue(
        client, visibility_timeout=LONG, backoff_base=base, backoff_max=60, max_attempts=4
    )
    message_id = (await publish(client, queue))["id"]

    message = await claim_one(client, queue, wait=5)
    for attempt in (1, 2, 3):
        assert (message["id"], message["attempts"]) == (message_id, attempt)
        sent = time.monotonic()
        nacked = await ok(settle(client, queue, message, "nack", error=f"failure {attempt}"))
        assert nacked["status"] == "pending"
        message = await claim_one(client, queue, wait=5)
        retried_after = time.monotonic() - sent
        ceiling = base * 2 ** (attempt - 1)
        assert ceiling / 2 <= retried_after <= ceiling + 0.3, (attempt, retried_after)
        assert ceiling / 2 <= gap(message["updated_at"], nacked["updated_at"]) <= ceiling + 0.3

    assert message["attempts"] == 4
    dead = await ok(settle(client, queue, message, "nack", error="failure 4"))
    assert (dead["status"], dead["last_error"]) == ("dead", "failure 4")
    assert await claim(client, queue, wait=0.5) == []
    retrying = await events(client, queue, "message.retrying")
    assert [e["data"]["last_error"] for e in retrying] == ["failure 1", "failure 2", "failure 3"]

    await ok(client.post(f"{queue_url(queue)}/redrive", json={}))
    again = await claim_one(client, queue)
    assert (again["id"], again["attempts"]) == (message_id, 1)
    await ok(settle(client, queue, again, "ack"))


# Extend ------------------------------------------------------------------------------------------


async def test_extend_renews_the_lease_from_now(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=30)
    await publish(client, queue)
    message = await claim_one(client, queue, visibility_timeout=1)
    await asyncio.sleep(0.5)

    before = await snapshot(server)
    assert_error(await settle(client, queue, message, "extend", lease_id="wrong"), 409, "lease_mismatch")
    assert await snapshot(server) == before

    extended = await ok(settle(client, queue, message, "extend", visibility_timeout=2))
    assert gap(extended["updated_at"], message["updated_at"]) >= 0.4
    assert_lease({**extended, "lease_id": message["lease_id"]}, 2)
    await asyncio.sleep(0.8)  # past the first lease's end: the extended lease still holds
    default = await ok(settle(client, queue, message, "extend"))
    assert_lease({**default, "lease_id": message["lease_id"]}, 30)  # the queue's timeout, from now
    assert [e["data"]["lease_expires_at"] for e in await events(client, queue, "message.extended")] == [
        extended["lease_expires_at"],
        default["lease_expires_at"],
    ]
    assert (await ok(settle(client, queue, message, "ack")))["status"] == "done"


# Expired leases ----------------------------------------------------------------------------------


async def test_an_expired_lease_comes_back_and_dies_after_max_attempts(make_server: Any) -> None:
    server = make_server(sweep_seconds="0.2").start()
    async with server.client() as http:
        queue = await create_queue(http, visibility_timeout=0.5, max_attempts=2)
        message_id = (await publish(http, queue))["id"]
        async with Listener(f"{server.url}{queue_url(queue)}/stream") as listener:
            claimed_at = time.monotonic()
            first = await claim_one(http, queue)

            async def status_is(status: str) -> bool:
                return bool((await fetch(http, queue, message_id))["status"] == status)

            released_at = await eventually(lambda: status_is("pending"))
            assert 0.45 <= released_at - claimed_at <= 0.5 + 0.2 + 0.5
            stored = await fetch(http, queue, message_id)
            assert stored["attempts"] == 1
            [released] = await listener.wait_for(1, event="message.released")
            assert (released.json()["id"], released.json()["status"]) == (message_id, "pending")
            assert_error(await settle(http, queue, first, "ack"), 409, "lease_expired")

            second = await claim_one(http, queue)  # available again
            assert second["attempts"] == 2
            await eventually(lambda: status_is("dead"))
            [dead] = await listener.wait_for(1, event="message.dead")
            assert (dead.json()["id"], dead.json()["status"], dead.json()["attempts"]) == (
                message_id,
                "dead",
                2,
            )
        assert await listed_ids(http, queue, "dead") == [message_id]
        assert await claim(http, queue) == []


# Long poll ---------------------------------------------------------------------------------------


async def test_a_waiting_claim_returns_within_100ms_of_a_publish(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    async with server.client() as worker:
        for _ in range(3):
            waiting = asyncio.create_task(timed_claim(worker, queue, wait=10))
            await asyncio.sleep(0.3)
            assert not waiting.done(), "the claim did not wait"
            sent = time.monotonic()
            published = await publish(client, queue)
            [message], answered = await asyncio.wait_for(waiting, 5)
            assert message["id"] == published["id"]
            assert answered - sent < 0.1, answered - sent
            await ok(settle(client, queue, message, "ack"))


async def test_a_waiting_claim_returns_empty_when_the_wait_runs_out(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    started = time.monotonic()
    assert await claim(client, queue, wait=1) == []
    assert 0.9 <= time.monotonic() - started <= 1.6


async def test_a_waiting_claim_wakes_when_a_delayed_message_is_due(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    sent = time.monotonic()
    published = await publish(client, queue, delay=1)
    message = await claim_one(client, queue, wait=5)
    assert message["id"] == published["id"]
    assert 0.9 <= time.monotonic() - sent <= 1.6
    await ok(settle(client, queue, message, "ack"))


async def test_a_waiting_claim_gets_a_message_whose_lease_expired(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    await publish(client, queue)
    sent = time.monotonic()
    first = await claim_one(client, queue, visibility_timeout=1)
    again = await claim_one(client, queue, wait=5)
    # Back after the lease (1 s), within one sweep of the server's sweeper (1 s by default).
    assert 0.9 <= time.monotonic() - sent <= 1 + 1 + 0.6
    assert (again["id"], again["attempts"]) == (first["id"], 2)
    assert_error(await settle(client, queue, first, "ack"), 409, "lease_mismatch")
    await ok(settle(client, queue, again, "ack"))


def cpu_seconds(server: Server) -> float:
    """CPU time the server process has used so far (user + system)."""
    assert server.process is not None
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
async def test_a_waiting_claim_does_not_spin_while_an_expired_lease_awaits_the_sweeper(
    make_server: Any,
) -> None:
    server = make_server(sweep_seconds="60").start()  # the expired lease stays unreleased
    async with server.client() as http:
        queue = await create_queue(http)
        await publish(http, queue)
        stale = await claim_one(http, queue, visibility_timeout=0.2)
        await asyncio.sleep(0.3)
        before = cpu_seconds(server)
        started = time.monotonic()
        claimed = await claim(http, queue, wait=1.5)
        busy = cpu_seconds(server) - before
        if claimed:  # a server may also hand the expired message straight back
            assert (claimed[0]["id"], claimed[0]["attempts"]) == (stale["id"], 2)
        else:
            assert time.monotonic() - started >= 1.4
        # An idle long poll costs the server a few CPU milliseconds; polling the database costs a core.
        assert busy < 0.4, f"the server used {busy:.2f} s of CPU during a 1.5 s wait"


# Scopes ------------------------------------------------------------------------------------------


async def test_consuming_needs_consume_and_redrive_needs_manage(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client, visibility_timeout=LONG, max_attempts=1)
    await publish_many(client, queue, 2)
    others = auth(mint("outsider", f"subscribe:{queue} publish:{queue} manage:{queue} consume:other-*"))
    worker = auth(mint("worker", f"consume:{queue}"))
    manager = auth(mint("manager", f"manage:{queue}"))
    async with (
        server.client(others) as outsider,
        server.client(worker) as consumer,
        server.client(manager) as boss,
    ):
        before = await snapshot(server)
        assert_error(await outsider.post(f"{queue_url(queue)}/claim", json={}), 403, "forbidden")
        assert await snapshot(server) == before

        held, doomed = await claim(consumer, queue, max=2)
        before = await snapshot(server)
        for action in ("ack", "nack", "extend"):
            assert_error(await settle(outsider, queue, held, action), 403, "forbidden")
        items = [{"id": held["id"], "lease_id": held["lease_id"]}]
        assert_error(await outsider.post(f"{queue_url(queue)}/ack", json={"items": items}), 403, "forbidden")
        assert await snapshot(server) == before

        assert (await ok(settle(consumer, queue, held, "extend")))["status"] == "processing"
        assert (await ok(settle(consumer, queue, doomed, "nack")))["status"] == "dead"
        assert (await ok(settle(consumer, queue, held, "ack")))["status"] == "done"

        before = await snapshot(server)
        assert_error(await consumer.post(f"{queue_url(queue)}/redrive", json={}), 403, "forbidden")
        assert await snapshot(server) == before
        redriven = await ok(boss.post(f"{queue_url(queue)}/redrive", json={}))
        assert [m["id"] for m in redriven["items"]] == [doomed["id"]]


# Deleting a leased message ------------------------------------------------------------------------


async def test_deleting_a_processing_message_voids_its_lease(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    await publish(client, queue)
    message = await claim_one(client, queue)
    deleted = await ok(client.delete(message_url(queue, message["id"])))
    assert deleted["deleted_at"] is not None
    for action in ("ack", "nack", "extend"):
        assert_error(await settle(client, queue, message, action), 404, "message_not_found")
    assert_error(await client.get(message_url(queue, message["id"])), 404, "message_not_found")
    assert await claim(client, queue) == []
    assert [e["data"]["id"] for e in await events(client, queue, "message.deleted")] == [message["id"]]


# Retention ---------------------------------------------------------------------------------------


async def test_retention_removes_old_messages_and_old_events(make_server: Any) -> None:
    settings = {"sweep_seconds": "0.2", "retention_sweep_seconds": "0.5", "event_retention_seconds": "2"}
    server = make_server(**settings).start()
    async with server.client() as http:
        short = await create_queue(http, retention_seconds=1)
        forever = await create_queue(http, retention_seconds=0)
        old = await publish(http, short, "old")
        kept = await publish(http, forever, "kept")
        assert (await fetch(http, short, old["id"]))["status"] == "pending"

        async def gone() -> bool:
            return (await http.get(message_url(short, old["id"]))).status_code == 404

        await eventually(gone, timeout=5)
        [expired] = await events(http, short, "message.expired")
        assert expired["data"]["id"] == old["id"]
        assert expired["data"]["deleted_at"] is not None
        assert gap(expired["at"], old["created_at"]) >= 1  # not before its retention ran out
        assert await listed_ids(http, short, "pending") == []

        # Events older than the log retention (2 s) go; a retention of zero keeps the message.
        async def trimmed() -> bool:
            return await events(http, forever) == []

        await eventually(trimmed, timeout=5)
        assert gap(datetime.now(UTC).isoformat(), kept["created_at"]) > 2
        assert (await fetch(http, forever, kept["id"]))["body"] == "kept"
        assert await events(http, forever, "message.expired") == []
        await publish(http, forever)
        [created] = await events(http, forever)
        assert (created["type"], created["seq"]) == ("message.created", 3)  # positions go on


# Atomic claims -----------------------------------------------------------------------------------


async def test_concurrent_claimers_never_share_a_message(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, visibility_timeout=LONG)
    ids = await publish_many(client, queue, 300)

    async def claimer() -> list[dict[str, Any]]:
        taken: list[dict[str, Any]] = []
        async with server.client() as worker:
            while batch := await claim(worker, queue, max=10):
                assert len(batch) <= 10
                taken.extend(batch)
        return taken

    results = await asyncio.gather(*(claimer() for _ in range(8)))
    claimed = [m for taken in results for m in taken]
    assert len(claimed) == 300
    assert sorted(m["id"] for m in claimed) == sorted(ids)  # each exactly once
    assert {m["attempts"] for m in claimed} == {1}
    assert sum(1 for taken in results if taken) > 1  # the claimers really competed

    acked = await ack_all(client, queue, claimed)
    assert len(acked) == 300
    counts = (await ok(client.get(queue_url(queue))))["messages"]
    assert (counts["done"], counts["processing"], counts["pending"]) == (300, 0, 0)


async def test_claimers_on_two_postgres_replicas_never_share_a_message(
    make_server: Any, pg_url: str, redis_url: str
) -> None:
    """Two processes on one PostgreSQL database: row locks, not one writer, keep claims apart."""
    prefix = unique("test")
    replicas = [
        make_server(database_url=pg_url, redis_url=redis_url, redis_prefix=prefix).start(wait=False)
        for _ in range(2)
    ]
    for replica in replicas:
        replica.wait_ready()
    async with replicas[0].client() as first, replicas[1].client() as second:
        queue = await create_queue(first, visibility_timeout=LONG)
        ids = await publish_many(first, queue, 300)

        async def claimer(server: Server) -> list[dict[str, Any]]:
            taken: list[dict[str, Any]] = []
            async with server.client() as worker:
                while batch := await claim(worker, queue, max=10):
                    taken.extend(batch)
            return taken

        results = await asyncio.gather(*(claimer(replicas[n % 2]) for n in range(8)))
        claimed = [m for taken in results for m in taken]
        assert sorted(m["id"] for m in claimed) == sorted(ids)  # each exactly once, across both
        assert all(results[n] for n in (0, 1)), "both replicas handed out work"
        assert len(await ack_all(second, queue, claimed)) == 300  # a lease holds on any replica

        # A claim waiting on one replica wakes for a publish on the other.
        waiting = asyncio.create_task(timed_claim(first, queue, wait=10))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "the claim did not wait"
        sent = time.monotonic()
        published = await publish(second, queue)
        [message], answered = await asyncio.wait_for(waiting, 5)
        assert answered - sent < 0.1, answered - sent
        assert message["id"] == published["id"]
