"""Publishing, reading and deleting messages against a real server: what a user sees over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from conftest import Server, assert_error, auth, mint, snapshot, unique

MAX_BODY = 256 * 1024
FORM = "application/x-www-form-urlencoded"  # what `curl -d` sends
JSON_TYPE = {"Content-Type": "application/json"}


def messages_url(queue: str) -> str:
    return f"/api/v1/queues/{queue}/messages"


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def create_queue(http: httpx.AsyncClient, name: str | None = None) -> str:
    name = name or unique()
    response = await http.post("/api/v1/queues", json={"name": name})
    assert response.status_code == 201, response.text
    return name


async def publish(http: httpx.AsyncClient, queue: str, **envelope: Any) -> dict[str, Any]:
    response = await http.post(messages_url(queue), json=envelope)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def listed(http: httpx.AsyncClient, queue: str, **params: Any) -> dict[str, Any]:
    response = await http.get(messages_url(queue), params=params)
    assert response.status_code == 200, response.text
    page = dict(response.json())
    assert set(page) == {"items", "total", "limit", "offset", "has_more"}
    return page


async def event_types(http: httpx.AsyncClient, queue: str) -> list[str]:
    response = await http.get(f"/api/v1/queues/{queue}/events", params={"limit": 200})
    assert response.status_code == 200, response.text
    return [item["type"] for item in response.json()["items"]]


# Publish ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [{"a": 1, "nested": {"list": [1, 2.5, None, True]}}, [1, "two", {"three": 3}], 42, 3.25, "hello", None],
    ids=["object", "list", "int", "float", "string", "null"],
)
async def test_json_envelope_keeps_body_as_json(client: httpx.AsyncClient, body: Any) -> None:
    queue = await create_queue(client)
    message = await publish(client, queue, body=body)
    assert message["body"] == body
    assert type(message["body"]) is type(body)
    assert message["content_type"] == "application/json"
    fetched = (await client.get(messages_url(queue) + f"/{message['id']}")).json()
    assert fetched["body"] == body
    assert type(fetched["body"]) is type(body)


async def test_json_envelope_fields_apply(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    response = await client.post(
        messages_url(queue),
        json={
            "body": {"build": 17},
            "type": "build.finished",
            "priority": "urgent",
            "delay": 90,
            "headers": {"x-trace": "abc", "origin": "ci"},
            "idempotency_key": "build-17",
        },
    )
    assert response.status_code == 201, response.text
    message = response.json()
    assert message["queue"] == queue
    assert message["type"] == "build.finished"
    assert message["priority"] == "urgent"
    assert message["headers"] == {"x-trace": "abc", "origin": "ci"}
    assert message["idempotency_key"] == "build-17"
    assert message["status"] == "pending"
    assert message["attempts"] == 0
    assert message["deleted_at"] is None
    assert when(message["available_at"]) - when(message["created_at"]) == timedelta(seconds=90)
    # Ids are server-assigned opaque strings; times are RFC 3339 in UTC.
    assert isinstance(message["id"], str) and not message["id"].isdigit()
    assert when(message["created_at"]).utcoffset() == timedelta(0)
    assert abs(when(message["created_at"]) - datetime.now(UTC)) < timedelta(seconds=30)


async def test_defaults_of_a_plain_envelope(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    message = await publish(client, queue, body="x")
    assert message["type"] == ""
    assert message["priority"] == "normal"
    assert message["headers"] == {}
    assert message["idempotency_key"] is None
    assert message["available_at"] == message["created_at"]


async def test_not_before_sets_availability(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    later = (datetime.now(UTC) + timedelta(hours=3)).replace(microsecond=0)
    message = await publish(client, queue, body=1, not_before=later.isoformat())
    assert when(message["available_at"]) == later


async def test_publish_answers_201_with_location(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    response = await client.post(messages_url(queue), json={"body": "hi"})
    assert response.status_code == 201
    message = response.json()
    assert response.headers["location"] == f"/api/v1/queues/{queue}/messages/{message['id']}"
    fetched = await client.get(response.headers["location"])
    assert fetched.status_code == 200
    assert fetched.json() == message


async def test_curl_form_body_is_kept_as_text(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    text = "backup done: a=1&b=2 100% ok"
    response = await client.post(messages_url(queue), content=text, headers={"Content-Type": FORM})
    assert response.status_code == 201, response.text
    message = response.json()
    assert message["body"] == text
    assert message["content_type"] == "text/plain; charset=utf-8"
    fetched = (await client.get(response.headers["location"])).json()
    assert fetched["body"] == text


async def test_text_plain_body_is_kept_verbatim(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    text = 'olá, pombo ✓\n  {"not": "json"}\n\ttrailing  '
    response = await client.post(
        messages_url(queue), content=text.encode(), headers={"Content-Type": "text/plain; charset=utf-8"}
    )
    assert response.status_code == 201, response.text
    message = response.json()
    assert message["body"] == text
    assert message["content_type"].startswith("text/plain")
    assert (await client.get(response.headers["location"])).json()["body"] == text


async def test_text_that_looks_like_json_stays_a_string(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    response = await client.post(
        messages_url(queue), content="[1, 2]", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["body"] == "[1, 2]"


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
async def test_json_content_type_variants_mean_the_envelope(
    client: httpx.AsyncClient, content_type: str
) -> None:
    queue = await create_queue(client)
    content = b'{"body": {"ok": true}, "type": "t"}'
    response = await client.post(messages_url(queue), content=content, headers={"Content-Type": content_type})
    assert response.status_code == 201, response.text
    assert (response.json()["body"], response.json()["type"]) == ({"ok": True}, "t")


async def test_octet_stream_body_is_text(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    headers = {"Content-Type": "application/octet-stream"}
    response = await client.post(messages_url(queue), content=b"raw bytes \x01 but utf-8", headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["body"] == "raw bytes \x01 but utf-8"
    assert response.json()["content_type"] == "application/octet-stream"


@pytest.mark.parametrize(("delay", "seconds"), [("30s", 30), ("5m", 300), ("90", 90), ("2h", 7200)])
async def test_text_headers_apply(client: httpx.AsyncClient, delay: str, seconds: int) -> None:
    queue = await create_queue(client)
    headers = {"Content-Type": "text/plain", "X-Type": "backup.done", "X-Priority": "high", "X-Delay": delay}
    response = await client.post(messages_url(queue), content="nightly", headers=headers)
    assert response.status_code == 201, response.text
    message = response.json()
    assert message["type"] == "backup.done"
    assert message["priority"] == "high"
    assert when(message["available_at"]) - when(message["created_at"]) == timedelta(seconds=seconds)


async def test_publish_auto_creates_queue_for_a_manager(server: Server, client: httpx.AsyncClient) -> None:
    queue = unique("auto")
    token = auth(mint("alice", "publish:auto-* manage:auto-*"))
    async with server.client(token) as alice:
        response = await alice.post(messages_url(queue), json={"body": {"first": True}})
        assert response.status_code == 201, response.text
        assert response.json()["queue"] == queue
    got = await client.get(f"/api/v1/queues/{queue}")
    assert got.status_code == 200, got.text
    assert got.json()["owner"] == "alice"
    assert got.json()["messages"]["pending"] == 1
    assert await event_types(client, queue) == ["queue.created", "message.created"]


async def test_publish_to_missing_queue_without_manage_is_404(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = unique("auto")
    before = await snapshot(server)
    async with server.client(auth(mint("bob", "publish:*"))) as bob:
        response = await bob.post(messages_url(queue), json={"body": 1})
        text = await bob.post(messages_url(queue), content="hi", headers={"Content-Type": "text/plain"})
        batch = await bob.post(messages_url(queue) + "/batch", json={"items": [{"body": 1}]})
    for answer in (response, text, batch):
        assert_error(answer, 404, "queue_not_found")
    assert await snapshot(server) == before
    assert_error(await client.get(f"/api/v1/queues/{queue}"), 404, "queue_not_found")


# Idempotency ------------------------------------------------------------------------------------


async def test_idempotency_key_header_returns_first_message(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client)
    headers = {"Idempotency-Key": "deploy-42"}
    first = await client.post(messages_url(queue), json={"body": {"v": 1}}, headers=headers)
    assert first.status_code == 201, first.text
    before = await snapshot(server)
    again = await client.post(messages_url(queue), json={"body": {"v": 1}}, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["idempotency_key"] == "deploy-42"
    assert again.headers["location"] == first.headers["location"]
    assert await snapshot(server) == before
    assert (await listed(client, queue))["total"] == 1
    assert await event_types(client, queue) == ["queue.created", "message.created"]


async def test_idempotency_key_in_body_returns_first_message(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    first = await publish(client, queue, body=[1, 2], idempotency_key="k-1")
    again = await client.post(messages_url(queue), json={"body": [1, 2], "idempotency_key": "k-1"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first["id"]
    assert (await listed(client, queue))["total"] == 1


async def test_idempotency_key_on_a_text_body(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    headers = {"Content-Type": FORM, "Idempotency-Key": "cron-0300"}
    first = await client.post(messages_url(queue), content="backup done", headers=headers)
    again = await client.post(messages_url(queue), content="backup done", headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert (await listed(client, queue))["total"] == 1


async def test_idempotency_key_with_different_body_conflicts(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client)
    first = await publish(client, queue, body={"v": 1}, idempotency_key="same")
    before = await snapshot(server)
    header = await client.post(
        messages_url(queue), json={"body": {"v": 2}}, headers={"Idempotency-Key": "same"}
    )
    error = assert_error(header, 409, "idempotency_conflict")
    assert error["details"].get("message_id") == first["id"]
    body = await client.post(messages_url(queue), json={"body": {"v": 2}, "idempotency_key": "same"})
    assert_error(body, 409, "idempotency_conflict")
    assert await snapshot(server) == before
    page = await listed(client, queue)
    assert [m["body"] for m in page["items"]] == [{"v": 1}]


async def test_idempotency_key_expires_after_its_window(make_server: Any) -> None:
    server = make_server(idempotency_seconds="1").start()
    async with server.client() as http:
        queue = await create_queue(http)
        first = await publish(http, queue, body="a", idempotency_key="nightly")
        await asyncio.sleep(1.2)
        # Past the window the key is free again, even for a different body.
        later = await http.post(messages_url(queue), json={"body": "b", "idempotency_key": "nightly"})
        assert later.status_code == 201, later.text
        assert later.json()["id"] != first["id"]
        again = await http.post(messages_url(queue), json={"body": "b", "idempotency_key": "nightly"})
        assert again.status_code == 200, again.text
        assert again.json()["id"] == later.json()["id"]
        assert [m["body"] for m in (await listed(http, queue))["items"]] == ["a", "b"]


async def test_idempotency_keys_are_per_queue(client: httpx.AsyncClient) -> None:
    one, two = await create_queue(client), await create_queue(client)
    first = await publish(client, one, body="x", idempotency_key="shared")
    second = await publish(client, two, body="x", idempotency_key="shared")
    assert first["id"] != second["id"]


# Batch ------------------------------------------------------------------------------------------


async def test_batch_of_1000_is_stored_in_order(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    items = [{"body": {"n": n}, "type": "tick", "priority": "low" if n % 2 else "high"} for n in range(1000)]
    response = await client.post(messages_url(queue) + "/batch", json={"items": items})
    assert response.status_code == 201, response.text
    published = response.json()["items"]
    assert [m["body"]["n"] for m in published] == list(range(1000))
    assert len({m["id"] for m in published}) == 1000
    assert published[1]["priority"] == "low" and published[2]["priority"] == "high"
    stored: list[dict[str, Any]] = []
    for offset in range(0, 1000, 200):
        page = await listed(client, queue, limit=200, offset=offset)
        assert page["total"] == 1000
        stored += page["items"]
    assert [m["id"] for m in stored] == [m["id"] for m in published]
    events = await client.get(f"/api/v1/queues/{queue}/events", params={"after": 1, "limit": 1})
    assert events.json()["total"] == 1000


async def test_batch_with_one_invalid_item_stores_nothing(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    items: list[dict[str, Any]] = [{"body": n} for n in range(20)]
    items[7] = {"body": 7, "priority": "extreme"}
    before = await snapshot(server)
    response = await client.post(messages_url(queue) + "/batch", json={"items": items})
    error = assert_error(response, 422, "validation_error")
    assert set(error["details"]["items"]) == {"7"}
    assert error["details"]["items"]["7"]
    assert await snapshot(server) == before
    assert (await listed(client, queue))["total"] == 0


async def test_batch_to_missing_queue_with_invalid_item_creates_nothing(
    server: Server, client: httpx.AsyncClient
) -> None:
    before = await snapshot(server)
    items = [{"body": 1}, {"body": 2, "surprise": True}]
    response = await client.post(messages_url(unique()) + "/batch", json={"items": items})
    assert set(assert_error(response, 422, "validation_error")["details"]["items"]) == {"1"}
    assert await snapshot(server) == before


@pytest.mark.parametrize(
    "payload",
    [{"items": [{"body": n} for n in range(1001)]}, {"items": []}, [{"body": 1}], {"items": [], "extra": 1}],
    ids=["1001-items", "empty", "bare-list", "extra-key"],
)
async def test_batch_shape_is_checked(server: Server, client: httpx.AsyncClient, payload: Any) -> None:
    queue = await create_queue(client)
    before = await snapshot(server)
    response = await client.post(messages_url(queue) + "/batch", json=payload)
    assert_error(response, 422, "validation_error")
    assert await snapshot(server) == before


async def test_batch_items_carry_their_own_idempotency_keys(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client)
    items = [{"body": "a", "idempotency_key": "a"}, {"body": "b", "idempotency_key": "b"}]
    first = await client.post(messages_url(queue) + "/batch", json={"items": items})
    assert first.status_code == 201, first.text
    before = await snapshot(server)
    again = await client.post(messages_url(queue) + "/batch", json={"items": items})
    assert again.status_code == 200, again.text
    assert [m["id"] for m in again.json()["items"]] == [m["id"] for m in first.json()["items"]]
    assert await snapshot(server) == before
    mixed = await client.post(messages_url(queue) + "/batch", json={"items": [items[0], {"body": "c"}]})
    assert mixed.status_code == 201, mixed.text
    assert mixed.json()["items"][0]["id"] == first.json()["items"][0]["id"]
    assert (await listed(client, queue))["total"] == 3


async def test_batch_with_repeated_key_stores_nothing(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    items = [{"body": 1, "idempotency_key": "k"}, {"body": 2}, {"body": 3, "idempotency_key": "k"}]
    before = await snapshot(server)
    response = await client.post(messages_url(queue) + "/batch", json={"items": items})
    assert set(assert_error(response, 422, "validation_error")["details"]["items"]) == {"2"}
    assert await snapshot(server) == before


# Bad input changes nothing ----------------------------------------------------------------------


async def _oversized_stream() -> AsyncIterator[bytes]:
    chunk = b"y" * 16 * 1024
    for _ in range(MAX_BODY // len(chunk) + 1):
        yield chunk


Request = tuple[str, str, dict[str, Any]]

BAD_INPUT: dict[str, tuple[Callable[[str], Request], int, str]] = {
    "bad-queue-name": (
        lambda q: ("POST", "/api/v1/queues/Bad_Name!/messages", {"json": {"body": 1}}),
        422,
        "validation_error",
    ),
    "uppercase-queue-name": (
        lambda q: ("POST", f"/api/v1/queues/{q.upper()}/messages", {"json": {"body": 1}}),
        422,
        "validation_error",
    ),
    "uppercase-queue-name-text": (
        lambda q: ("POST", f"/api/v1/queues/{q.upper()}/messages", {"content": "hi"}),
        422,
        "validation_error",
    ),
    "bad-queue-name-batch": (
        lambda q: ("POST", "/api/v1/queues/Bad_Name!/messages/batch", {"json": {"items": [{"body": 1}]}}),
        422,
        "validation_error",
    ),
    "batch-item-larger-than-one-message": (
        lambda q: (
            "POST",
            messages_url(q) + "/batch",
            {"json": {"items": [{"body": 1}, {"body": "x" * MAX_BODY}]}},
        ),
        422,
        "validation_error",
    ),
    "malformed-json": (
        lambda q: (
            "POST",
            messages_url(q),
            {"content": b'{"body": ', "headers": {"Content-Type": "application/json"}},
        ),
        400,
        "malformed_json",
    ),
    "malformed-json-batch": (
        lambda q: (
            "POST",
            messages_url(q) + "/batch",
            {"content": b'{"items": [', "headers": {"Content-Type": "application/json"}},
        ),
        400,
        "malformed_json",
    ),
    "deeply-nested-json": (
        lambda q: (
            "POST",
            messages_url(q),
            {
                "content": b'{"body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                "headers": {"Content-Type": "application/json"},
            },
        ),
        400,
        "malformed_json",
    ),
    # Python's json reads NaN and Infinity; storing them would hand subscribers invalid JSON.
    "nan-in-json": (
        lambda q: (
            "POST",
            messages_url(q),
            {"content": b'{"body": {"x": NaN}}', "headers": {"Content-Type": "application/json"}},
        ),
        400,
        "malformed_json",
    ),
    "infinity-in-batch": (
        lambda q: (
            "POST",
            messages_url(q) + "/batch",
            {"content": b'{"items": [{"body": -Infinity}]}', "headers": {"Content-Type": "application/json"}},
        ),
        400,
        "malformed_json",
    ),
    "unknown-envelope-field": (
        lambda q: ("POST", messages_url(q), {"json": {"body": 1, "colour": "red"}}),
        422,
        "validation_error",
    ),
    "missing-body": (lambda q: ("POST", messages_url(q), {"json": {"type": "x"}}), 422, "validation_error"),
    "envelope-not-an-object": (
        lambda q: ("POST", messages_url(q), {"json": [1, 2]}),
        422,
        "validation_error",
    ),
    "bad-priority": (
        lambda q: ("POST", messages_url(q), {"json": {"body": 1, "priority": "extreme"}}),
        422,
        "validation_error",
    ),
    "bad-type": (
        lambda q: ("POST", messages_url(q), {"json": {"body": 1, "type": "has spaces!"}}),
        422,
        "validation_error",
    ),
    "header-name-not-a-variable-name": (
        lambda q: ("POST", messages_url(q), {"json": {"body": 1, "headers": {"a=b": "x"}}}),
        422,
        "validation_error",
    ),
    "nul-in-header-value": (
        lambda q: (
            "POST",
            messages_url(q) + "/batch",
            {"json": {"items": [{"body": 1, "headers": {"x": "a\u0000"}}]}},
        ),
        422,
        "validation_error",
    ),
    "negative-delay": (
        lambda q: ("POST", messages_url(q), {"json": {"body": 1, "delay": -5}}),
        422,
        "validation_error",
    ),
    "bad-x-delay": (
        lambda q: ("POST", messages_url(q), {"content": "hi", "headers": {"X-Delay": "soon"}}),
        422,
        "validation_error",
    ),
    "bad-x-priority": (
        lambda q: ("POST", messages_url(q), {"content": "hi", "headers": {"X-Priority": "whenever"}}),
        422,
        "validation_error",
    ),
    "long-idempotency-key": (
        lambda q: ("POST", messages_url(q), {"json": {"body": 1}, "headers": {"Idempotency-Key": "k" * 256}}),
        422,
        "validation_error",
    ),
    "too-large-content-length": (
        lambda q: ("POST", messages_url(q), {"content": b"x" * (MAX_BODY + 1)}),
        413,
        "too_large",
    ),
    "too-large-json-envelope": (
        lambda q: ("POST", messages_url(q), {"json": {"body": "x" * MAX_BODY}}),
        413,
        "too_large",
    ),
    "too-large-chunked": (
        lambda q: (
            "POST",
            messages_url(q),
            {"content": _oversized_stream(), "headers": {"Content-Type": "text/plain"}},
        ),
        413,
        "too_large",
    ),
    "invalid-utf8": (
        lambda q: (
            "POST",
            messages_url(q),
            {"content": b"caf\xe9 \xff", "headers": {"Content-Type": "text/plain"}},
        ),
        400,
        "invalid_utf8",
    ),
    "negative-limit": (
        lambda q: ("GET", messages_url(q), {"params": {"limit": -1}}),
        422,
        "validation_error",
    ),
    "zero-limit": (lambda q: ("GET", messages_url(q), {"params": {"limit": 0}}), 422, "validation_error"),
    "huge-limit": (lambda q: ("GET", messages_url(q), {"params": {"limit": 201}}), 422, "validation_error"),
    "negative-offset": (
        lambda q: ("GET", messages_url(q), {"params": {"offset": -1}}),
        422,
        "validation_error",
    ),
    "huge-offset": (
        lambda q: ("GET", messages_url(q), {"params": {"offset": 10**12}}),
        422,
        "validation_error",
    ),
    "text-limit": (lambda q: ("GET", messages_url(q), {"params": {"limit": "ten"}}), 422, "validation_error"),
    "bad-status-filter": (
        lambda q: ("GET", messages_url(q), {"params": {"status": "lost"}}),
        422,
        "validation_error",
    ),
    "bad-priority-filter": (
        lambda q: ("GET", messages_url(q), {"params": {"priority": "medium"}}),
        422,
        "validation_error",
    ),
    "bad-created-after": (
        lambda q: ("GET", messages_url(q), {"params": {"created_after": "yesterday"}}),
        422,
        "validation_error",
    ),
    "lone-surrogate-in-json-body": (
        lambda q: ("POST", messages_url(q), {"content": b'{"body": "\\ud800"}', "headers": JSON_TYPE}),
        422,
        "validation_error",
    ),
    "lone-surrogate-in-json-body-batch": (
        lambda q: (
            "POST",
            f"{messages_url(q)}/batch",
            {"content": b'{"items": [{"body": {"k": "\\udfff"}}]}', "headers": JSON_TYPE},
        ),
        422,
        "validation_error",
    ),
    # Python's datetimes end with the year 9999 and begin with the year 1, in UTC as elsewhere.
    "created-after-past-year-9999-in-utc": (
        lambda q: ("GET", messages_url(q), {"params": {"created_after": "9999-12-31T23:00:00-05:00"}}),
        422,
        "validation_error",
    ),
    "created-before-before-year-1-in-utc": (
        lambda q: ("GET", messages_url(q), {"params": {"created_before": "0001-01-01T00:00:00+05:00"}}),
        422,
        "validation_error",
    ),
    "not-before-past-year-9999-in-utc": (
        lambda q: ("POST", messages_url(q), {"json": {"body": 1, "not_before": "9999-12-31T23:00:00-05:00"}}),
        422,
        "validation_error",
    ),
    "not-before-past-year-9999-in-utc-batch": (
        lambda q: (
            "POST",
            f"{messages_url(q)}/batch",
            {"json": {"items": [{"body": 1, "not_before": "9999-12-31T23:00:00-05:00"}]}},
        ),
        422,
        "validation_error",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
async def test_bad_input_changes_nothing(server: Server, client: httpx.AsyncClient, case: str) -> None:
    build, status, code = BAD_INPUT[case]
    queue = await create_queue(client)
    await publish(client, queue, body="already here")
    for target in (queue, unique("missing")):  # an existing queue, and one an admin would auto-create
        method, path, kwargs = build(target)
        before = await snapshot(server)
        response = await client.request(method, path, **kwargs)
        error = assert_error(response, status, code)
        if status == 413:
            assert error["details"]["limit"] == MAX_BODY
        if status == 422:
            assert error["details"], error
        assert await snapshot(server) == before
    assert [m["body"] for m in (await listed(client, queue))["items"]] == ["already here"]


async def test_body_at_the_limit_is_accepted(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    text = "z" * MAX_BODY
    response = await client.post(messages_url(queue), content=text, headers={"Content-Type": "text/plain"})
    assert response.status_code == 201, response.text[:200]
    assert response.json()["body"] == text


async def test_batch_over_its_byte_limit_is_413(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    before = await snapshot(server)
    content = b'{"items": [' + b" " * (8 * 1024 * 1024) + b"]}"
    response = await client.post(
        messages_url(queue) + "/batch", content=content, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 413, "too_large")
    assert await snapshot(server) == before


# Read, filter, page, delete ---------------------------------------------------------------------


async def test_list_filters_and_paging(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    specs = [("a", "low"), ("b", "high"), ("a", "high"), ("b", "normal"), ("a", "urgent")]
    published = []
    for n, (kind, priority) in enumerate(specs):
        published.append(await publish(client, queue, body=n, type=kind, priority=priority))
        await asyncio.sleep(0.005)  # distinct creation times
    ids = [m["id"] for m in published]

    everything = await listed(client, queue)
    assert [m["id"] for m in everything["items"]] == ids
    assert (everything["total"], everything["limit"], everything["offset"], everything["has_more"]) == (
        5,
        50,
        0,
        False,
    )

    first = await listed(client, queue, limit=2)
    assert ([m["id"] for m in first["items"]], first["total"], first["has_more"]) == (ids[:2], 5, True)
    middle = await listed(client, queue, limit=2, offset=2)
    assert ([m["id"] for m in middle["items"]], middle["offset"], middle["has_more"]) == (ids[2:4], 2, True)
    last = await listed(client, queue, limit=2, offset=4)
    assert ([m["id"] for m in last["items"]], last["total"], last["has_more"]) == (ids[4:], 5, False)
    beyond = await listed(client, queue, limit=2, offset=10)
    assert (beyond["items"], beyond["total"], beyond["has_more"]) == ([], 5, False)

    by_type = await listed(client, queue, type="a")
    assert ([m["id"] for m in by_type["items"]], by_type["total"]) == ([ids[0], ids[2], ids[4]], 3)
    by_priority = await listed(client, queue, priority="high")
    assert [m["id"] for m in by_priority["items"]] == [ids[1], ids[2]]
    both = await listed(client, queue, type="a", priority="high", limit=1)
    assert ([m["id"] for m in both["items"]], both["total"], both["has_more"]) == ([ids[2]], 1, False)
    assert (await listed(client, queue, status="pending"))["total"] == 5
    assert (await listed(client, queue, status="done"))["items"] == []
    assert (await listed(client, queue, type="nothing"))["total"] == 0


async def test_list_created_after_and_before(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    published = []
    for n in range(5):
        published.append(await publish(client, queue, body=n))
        await asyncio.sleep(0.01)
    ids = [m["id"] for m in published]
    middle = published[2]["created_at"]
    after = await listed(client, queue, created_after=middle)
    assert [m["id"] for m in after["items"]] == ids[2:]
    assert after["total"] == 3
    before = await listed(client, queue, created_before=middle)
    assert [m["id"] for m in before["items"]] == ids[:2]
    between = await listed(client, queue, created_after=published[1]["created_at"], created_before=middle)
    assert [m["id"] for m in between["items"]] == [ids[1]]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert (await listed(client, queue, created_after=future))["total"] == 0
    assert (await listed(client, queue, created_before=future))["total"] == 5


async def test_list_created_after_in_another_timezone(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    published = []
    for n in range(3):
        published.append(await publish(client, queue, body=n))
        await asyncio.sleep(0.01)
    india = timezone(timedelta(hours=5, minutes=30))
    second = when(published[1]["created_at"]).astimezone(india).isoformat()
    assert "+05:30" in second
    page = await listed(client, queue, created_after=second)
    assert [m["id"] for m in page["items"]] == [m["id"] for m in published[1:]]


async def test_get_and_delete_one_message(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    keep = await publish(client, queue, body="keep")
    gone = await publish(client, queue, body={"bye": True}, type="temp")
    url = messages_url(queue) + f"/{gone['id']}"
    assert (await client.get(url)).json() == gone

    deleted = await client.delete(url)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["id"] == gone["id"]
    assert deleted.json()["body"] == {"bye": True}
    assert deleted.json()["deleted_at"] is not None

    error = assert_error(await client.get(url), 404, "message_not_found")
    assert gone["id"] in error["message"]
    assert_error(await client.delete(url), 404, "message_not_found")
    page = await listed(client, queue)
    assert [m["id"] for m in page["items"]] == [keep["id"]]
    assert await event_types(client, queue) == [
        "queue.created",
        "message.created",
        "message.created",
        "message.deleted",
    ]


async def test_message_of_another_queue_is_not_found(client: httpx.AsyncClient) -> None:
    one, two = await create_queue(client), await create_queue(client)
    message = await publish(client, one, body=1)
    assert_error(await client.get(messages_url(two) + f"/{message['id']}"), 404, "message_not_found")
    assert_error(await client.delete(messages_url(two) + f"/{message['id']}"), 404, "message_not_found")
    assert (await client.get(messages_url(one) + f"/{message['id']}")).status_code == 200


async def test_reads_of_a_missing_queue_are_404(client: httpx.AsyncClient) -> None:
    queue = unique("missing")
    assert_error(await client.get(messages_url(queue)), 404, "queue_not_found")
    assert_error(await client.get(messages_url(queue) + "/nope"), 404, "queue_not_found")
    assert_error(await client.delete(messages_url(queue) + "/nope"), 404, "queue_not_found")


async def test_request_id_is_echoed_or_made(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    sent = await client.post(messages_url(queue), json={"body": 1}, headers={"X-Request-ID": "trace-abc.123"})
    assert sent.headers["x-request-id"] == "trace-abc.123"
    made = await client.get(messages_url(queue))
    other = await client.get(messages_url(queue))
    assert made.headers["x-request-id"] and other.headers["x-request-id"]
    assert made.headers["x-request-id"] != other.headers["x-request-id"]
    failed = await client.get(messages_url(unique()), headers={"X-Request-ID": "failing-1"})
    assert failed.status_code == 404
    assert failed.headers["x-request-id"] == "failing-1"
    invalid = await client.post(
        messages_url(queue), content=b"{", headers={"Content-Type": "application/json", "X-Request-ID": "r-2"}
    )
    assert invalid.status_code == 400
    assert invalid.headers["x-request-id"] == "r-2"


async def test_unsafe_request_id_is_replaced(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/queues", headers={"X-Request-ID": "bad id\twith spaces"})
    assert response.status_code == 200
    assert response.headers["x-request-id"]
    assert response.headers["x-request-id"] != "bad id\twith spaces"


# Scopes -----------------------------------------------------------------------------------------


async def test_scopes_guard_messages(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    message = await publish(client, queue, body=1)
    one = messages_url(queue) + f"/{message['id']}"
    before = await snapshot(server)
    async with (
        server.client(auth(mint("reader", f"subscribe:{queue}"))) as reader,
        server.client(auth(mint("writer", f"publish:{queue}"))) as writer,
    ):
        denied = [
            (await reader.post(messages_url(queue), json={"body": 2}), f"publish:{queue}"),
            (await reader.post(messages_url(queue), content="x"), f"publish:{queue}"),
            (
                await reader.post(messages_url(queue) + "/batch", json={"items": [{"body": 2}]}),
                f"publish:{queue}",
            ),
            (await reader.delete(one), f"manage:{queue}"),
            (await writer.get(messages_url(queue)), f"subscribe:{queue}"),
            (await writer.get(one), f"subscribe:{queue}"),
            (await writer.delete(one), f"manage:{queue}"),
        ]
        for response, needed in denied:
            assert assert_error(response, 403, "forbidden")["details"] == {"needed": needed}
        assert await snapshot(server) == before
        assert (await reader.get(one)).json()["id"] == message["id"]
        assert (await writer.post(messages_url(queue), json={"body": 2})).status_code == 201
    async with server.client({}) as anonymous:
        assert_error(await anonymous.post(messages_url(queue), json={"body": 3}), 401, "unauthorized")
    assert (await listed(client, queue))["total"] == 2


async def test_publish_scope_glob_matches_dotted_names(server: Server, client: httpx.AsyncClient) -> None:
    prefix = unique("builds")
    queue = await create_queue(client, f"{prefix}.web.main")
    async with server.client(auth(mint("ci", f"publish:{prefix}.*"))) as ci:
        assert (await ci.post(messages_url(queue), json={"body": 1})).status_code == 201
        other = await create_queue(client)
        assert_error(await ci.post(messages_url(other), json={"body": 1}), 403, "forbidden")
