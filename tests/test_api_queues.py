"""Queues and their event logs against a real server: create, read, list, change, delete, restore."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

import httpx
import pytest
from conftest import Server, assert_error, auth, mint, snapshot, unique

DEFAULTS = {
    "description": "",
    "visibility_timeout": 30.0,
    "max_attempts": 5,
    "backoff_base": 1.0,
    "backoff_max": 300.0,
    "retention_seconds": 14 * 86400,
}
NO_MESSAGES = {"pending": 0, "processing": 0, "done": 0, "dead": 0}


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def create_queue(http: httpx.AsyncClient, name: str | None = None, **settings: Any) -> dict[str, Any]:
    response = await http.post("/api/v1/queues", json={"name": name or unique(), **settings})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def publish(http: httpx.AsyncClient, queue: str, body: Any) -> dict[str, Any]:
    response = await http.post(f"/api/v1/queues/{queue}/messages", json={"body": body})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def events(http: httpx.AsyncClient, queue: str, **params: Any) -> dict[str, Any]:
    response = await http.get(f"/api/v1/queues/{queue}/events", params=params)
    assert response.status_code == 200, response.text
    page = dict(response.json())
    assert set(page) == {"items", "total", "limit", "offset", "has_more"}
    return page


# Create and read --------------------------------------------------------------------------------


async def test_create_answers_201_with_defaults_and_owner(server: Server) -> None:
    name = unique()
    async with server.client(auth(mint("carol", f"manage:{name} subscribe:{name}"))) as carol:
        response = await carol.post("/api/v1/queues", json={"name": name})
        assert response.status_code == 201, response.text
        queue = response.json()
        assert {k: queue[k] for k in DEFAULTS} == DEFAULTS
        assert (queue["name"], queue["owner"], queue["deleted_at"]) == (name, "carol", None)
        assert queue["messages"] == NO_MESSAGES
        got = await carol.get(f"/api/v1/queues/{name}")
    assert got.status_code == 200
    assert got.json() == queue


async def test_new_queue_was_updated_when_created(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    assert queue["updated_at"] == queue["created_at"]
    [created] = (await events(client, queue["name"]))["items"]
    assert created["data"]["updated_at"] == created["at"] == queue["created_at"]


async def test_create_with_settings(client: httpx.AsyncClient) -> None:
    settings = {
        "description": "nightly builds",
        "visibility_timeout": 120.5,
        "max_attempts": 9,
        "backoff_base": 2.0,
        "backoff_max": 600.0,
        "retention_seconds": 0,
    }
    queue = await create_queue(client, **settings)
    assert {k: queue[k] for k in settings} == settings
    assert {
        k: v for k, v in (await client.get(f"/api/v1/queues/{queue['name']}")).json().items() if k in settings
    } == (settings)


async def test_create_logs_queue_created(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, description="hello")
    page = await events(client, queue["name"])
    [created] = page["items"]
    assert set(created) == {"seq", "type", "at", "data"}
    assert (created["seq"], created["type"]) == (1, "queue.created")
    assert created["data"]["name"] == queue["name"]
    assert created["data"]["description"] == "hello"
    assert when(created["at"]) == when(queue["created_at"])


async def test_duplicate_name_is_409_and_changes_nothing(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, description="first")
    before = await snapshot(server)
    again = await client.post("/api/v1/queues", json={"name": queue["name"], "description": "second"})
    error = assert_error(again, 409, "queue_exists")
    assert error["details"] == {"queue": queue["name"]}
    assert await snapshot(server) == before
    assert (await client.get(f"/api/v1/queues/{queue['name']}")).json()["description"] == "first"


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "Bad_Name!"},
        {"name": "UPPER"},
        {"name": "-leading-dash"},
        {"name": "x" * 65},
        {"name": "has,comma"},
        {"name": "has:colon"},
        {},
        {"name": "fine", "colour": "red"},
        {"name": "fine", "visibility_timeout": 0},
        {"name": "fine", "max_attempts": 0},
        {"name": "fine", "retention_seconds": -1},
    ],
    ids=[
        "punctuation",
        "uppercase",
        "leading-dash",
        "too-long",
        "comma",
        "colon",
        "no-name",
        "unknown-field",
        "zero-visibility",
        "zero-attempts",
        "negative-retention",
    ],
)
async def test_invalid_create_is_422_and_changes_nothing(
    server: Server, client: httpx.AsyncClient, payload: dict[str, Any]
) -> None:
    if payload.get("name") == "fine":
        payload = {**payload, "name": unique()}
    before = await snapshot(server)
    error = assert_error(await client.post("/api/v1/queues", json=payload), 422, "validation_error")
    assert error["details"]
    assert await snapshot(server) == before


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_malformed_json_is_400_and_changes_nothing(
    server: Server, client: httpx.AsyncClient, method: str
) -> None:
    name = (await create_queue(client))["name"]
    path = "/api/v1/queues" if method == "POST" else f"/api/v1/queues/{name}"
    before = await snapshot(server)
    headers = {"Content-Type": "application/json"}
    response = await client.request(method, path, content=b'{"name": ', headers=headers)
    assert_error(response, 400, "malformed_json")
    assert await snapshot(server) == before


async def test_get_counts_messages_by_status(client: httpx.AsyncClient) -> None:
    name = (await create_queue(client))["name"]
    published = [await publish(client, name, n) for n in range(3)]
    queue = (await client.get(f"/api/v1/queues/{name}")).json()
    assert queue["messages"] == {**NO_MESSAGES, "pending": 3}
    deleted = await client.delete(f"/api/v1/queues/{name}/messages/{published[0]['id']}")
    assert deleted.status_code == 200
    assert (await client.get(f"/api/v1/queues/{name}")).json()["messages"] == {**NO_MESSAGES, "pending": 2}


async def test_get_missing_queue_is_404(client: httpx.AsyncClient) -> None:
    name = unique("missing")
    error = assert_error(await client.get(f"/api/v1/queues/{name}"), 404, "queue_not_found")
    assert name in error["message"]
    assert_error(await client.get(f"/api/v1/queues/{name}/events"), 404, "queue_not_found")
    assert_error(
        await client.patch(f"/api/v1/queues/{name}", json={"description": "x"}), 404, "queue_not_found"
    )
    assert_error(await client.delete(f"/api/v1/queues/{name}"), 404, "queue_not_found")
    assert_error(await client.post(f"/api/v1/queues/{name}/restore"), 404, "queue_not_found")


async def test_invalid_name_in_path_is_422(client: httpx.AsyncClient) -> None:
    for path in ("/api/v1/queues/Bad_Name!", "/api/v1/queues/UPPER/events"):
        assert_error(await client.get(path), 422, "validation_error")
    assert_error(await client.delete("/api/v1/queues/UPPER"), 422, "validation_error")


# List -------------------------------------------------------------------------------------------


async def test_list_shows_only_visible_queues_with_paging(server: Server, client: httpx.AsyncClient) -> None:
    team = unique("team")
    names = [f"{team}.{n}" for n in range(5)]
    for name in reversed(names):
        await create_queue(client, name)
    await publish(client, names[0], "x")
    await create_queue(client, unique("other"))
    async with (
        server.client(auth(mint("viewer", f"subscribe:{team}.*"))) as viewer,
        server.client(auth(mint("boss", f"manage:{team}.[0-1]"))) as boss,
        server.client(auth(mint("poster", f"publish:{team}.*"))) as poster,
    ):
        everything = (await viewer.get("/api/v1/queues")).json()
        assert [q["name"] for q in everything["items"]] == names
        assert (everything["total"], everything["limit"], everything["offset"], everything["has_more"]) == (
            5,
            50,
            0,
            False,
        )
        assert everything["items"][0]["messages"] == {**NO_MESSAGES, "pending": 1}

        pages = []
        for offset in (0, 2, 4):
            page = (await viewer.get("/api/v1/queues", params={"limit": 2, "offset": offset})).json()
            assert (page["total"], page["limit"], page["offset"]) == (5, 2, offset)
            assert page["has_more"] is (offset < 4)
            pages += [q["name"] for q in page["items"]]
        assert pages == names

        assert [q["name"] for q in (await boss.get("/api/v1/queues")).json()["items"]] == names[:2]
        nothing = (await poster.get("/api/v1/queues")).json()
        assert (nothing["items"], nothing["total"], nothing["has_more"]) == ([], 0, False)


async def test_list_filters_by_a_part_of_the_name_among_what_the_caller_may_see(
    server: Server, client: httpx.AsyncClient
) -> None:
    team = unique("filt")
    names = [f"{team}.web_a", f"{team}.web-b", f"{team}.db_a", f"{team}x.web_c"]
    for name in names:
        await create_queue(client, name)
    listed = (await client.get("/api/v1/queues", params={"name": f"{team}.web"})).json()
    assert (sorted(q["name"] for q in listed["items"]), listed["total"]) == (sorted(names[:2]), 2)
    # `_` and `.` are themselves, not wildcards
    underscore = (await client.get("/api/v1/queues", params={"name": "_a", "limit": 200})).json()
    assert {q["name"] for q in underscore["items"]} >= {names[0], names[2]}
    assert all("_a" in q["name"] for q in underscore["items"])
    every = [q["name"] for q in (await client.get("/api/v1/queues", params={"name": team})).json()["items"]]
    assert sorted(every) == sorted(names)
    paged = (await client.get("/api/v1/queues", params={"name": team, "limit": 2, "offset": 2})).json()
    assert ([q["name"] for q in paged["items"]], paged["total"]) == (every[2:], 4)
    async with server.client(auth(mint("viewer", f"subscribe:{team}.web*"))) as viewer:
        seen = (await viewer.get("/api/v1/queues", params={"name": "_"})).json()
    assert [q["name"] for q in seen["items"]] == [names[0]]
    for bad in ("x" * 65, "Web", "a\x00b", "a b"):
        assert_error(await client.get("/api/v1/queues", params={"name": bad}), 422, "validation_error")


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": -1}, {"limit": 201}, {"offset": -1}, {"offset": 10**12}, {"limit": "many"}],
    ids=["zero-limit", "negative-limit", "huge-limit", "negative-offset", "huge-offset", "text-limit"],
)
async def test_list_paging_out_of_range_is_422(
    server: Server, client: httpx.AsyncClient, params: dict[str, Any]
) -> None:
    before = await snapshot(server)
    error = assert_error(await client.get("/api/v1/queues", params=params), 422, "validation_error")
    assert any(key in field for field in error["details"] for key in params)
    assert await snapshot(server) == before


async def test_list_limit_bounds_are_inclusive(client: httpx.AsyncClient) -> None:
    await create_queue(client)
    assert (await client.get("/api/v1/queues", params={"limit": 1})).json()["limit"] == 1
    page = (await client.get("/api/v1/queues", params={"limit": 200})).json()
    assert page["limit"] == 200


# Update -----------------------------------------------------------------------------------------


async def test_patch_changes_only_given_fields_and_logs_it(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client, description="before", max_attempts=7, visibility_timeout=45)
    name = queue["name"]
    response = await client.patch(f"/api/v1/queues/{name}", json={"description": "after", "backoff_max": 900})
    assert response.status_code == 200, response.text
    changed = response.json()
    assert (changed["description"], changed["backoff_max"]) == ("after", 900.0)
    unchanged = {k: v for k, v in queue.items() if k not in {"description", "backoff_max", "updated_at"}}
    assert {k: changed[k] for k in unchanged} == unchanged
    assert when(changed["updated_at"]) > when(queue["updated_at"])
    assert (await client.get(f"/api/v1/queues/{name}")).json() == changed

    page = await events(client, name)
    assert [e["type"] for e in page["items"]] == ["queue.created", "queue.updated"]
    updated = page["items"][1]
    assert updated["seq"] == 2
    assert updated["data"] == changed

    again = await client.patch(f"/api/v1/queues/{name}", json={"max_attempts": 3})
    assert again.json()["description"] == "after"
    assert again.json()["max_attempts"] == 3
    assert again.json()["visibility_timeout"] == 45.0


async def test_a_patch_after_publishing_governs_the_next_claim(client: httpx.AsyncClient) -> None:
    # The writer keeps queue rows between transactions: a change must reach what it keeps.
    queue = await create_queue(client, visibility_timeout=30)
    name = queue["name"]
    await publish(client, name, {"n": 1})
    patched = await client.patch(f"/api/v1/queues/{name}", json={"visibility_timeout": 600})
    assert patched.status_code == 200, patched.text
    claimed = await client.post(f"/api/v1/queues/{name}/claim", json={})
    assert claimed.status_code == 200, claimed.text
    [message] = claimed.json()["items"]
    lease = (when(message["lease_expires_at"]) - when(message["updated_at"])).total_seconds()
    assert 590 < lease <= 600


@pytest.mark.parametrize(
    "patch",
    [
        {"name": "renamed"},
        {"owner": "mallory"},
        {"colour": "red"},
        {"max_attempts": 0},
        {"visibility_timeout": -1},
        {"max_attempts": None},
        {"description": None, "backoff_max": 60},
    ],
    ids=["rename", "owner", "unknown", "zero-attempts", "negative-visibility", "null", "null-beside-valid"],
)
async def test_invalid_patch_is_422_and_changes_nothing(
    server: Server, client: httpx.AsyncClient, patch: dict[str, Any]
) -> None:
    queue = await create_queue(client)
    before = await snapshot(server)
    response = await client.patch(f"/api/v1/queues/{queue['name']}", json=patch)
    assert_error(response, 422, "validation_error")
    assert await snapshot(server) == before
    assert (await client.get(f"/api/v1/queues/{queue['name']}")).json() == queue


async def test_json_nested_too_deeply_is_400_and_changes_nothing(
    server: Server, client: httpx.AsyncClient
) -> None:
    before = await snapshot(server)
    deep = b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = await client.post("/api/v1/queues", content=deep, headers={"Content-Type": "application/json"})
    assert_error(response, 400, "malformed_json")
    assert await snapshot(server) == before


# Delete and restore -----------------------------------------------------------------------------


async def test_delete_is_soft_and_restore_brings_the_queue_back(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client)
    name = queue["name"]
    message = await publish(client, name, {"keep": "me"})

    deleted = await client.delete(f"/api/v1/queues/{name}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["deleted_at"] is not None
    assert deleted.json()["messages"] == {**NO_MESSAGES, "pending": 1}

    before = await snapshot(server)
    base = f"/api/v1/queues/{name}"
    assert_error(await client.get(base), 404, "queue_not_found")
    assert_error(await client.get(f"{base}/messages"), 404, "queue_not_found")
    assert_error(await client.get(f"{base}/messages/{message['id']}"), 404, "queue_not_found")
    assert_error(await client.get(f"{base}/events"), 404, "queue_not_found")
    # Even an admin, who may manage the name, does not re-create it by publishing.
    assert_error(await client.post(f"{base}/messages", json={"body": 1}), 404, "queue_not_found")
    assert_error(await client.post(f"{base}/messages", content="text"), 404, "queue_not_found")
    assert_error(
        await client.post(f"{base}/messages/batch", json={"items": [{"body": 1}]}), 404, "queue_not_found"
    )
    assert_error(await client.patch(base, json={"description": "x"}), 404, "queue_not_found")
    assert_error(await client.delete(base), 404, "queue_not_found")
    assert_error(await client.post("/api/v1/queues", json={"name": name}), 409, "queue_deleted")
    assert name not in [
        q["name"] for q in (await client.get("/api/v1/queues", params={"limit": 200})).json()["items"]
    ]
    assert await snapshot(server) == before

    shown = await client.get(base, params={"include_deleted": "true"})
    assert shown.status_code == 200, shown.text
    assert shown.json()["deleted_at"] == deleted.json()["deleted_at"]
    assert shown.json()["messages"] == {**NO_MESSAGES, "pending": 1}
    async with server.client(auth(mint("boss", f"manage:{name}"))) as boss:
        listed = (await boss.get("/api/v1/queues", params={"include_deleted": "true"})).json()
        assert [q["name"] for q in listed["items"]] == [name]
        assert listed["items"][0]["deleted_at"] is not None
        assert (await boss.get("/api/v1/queues")).json()["total"] == 0

    restored = await client.post(f"{base}/restore")
    assert restored.status_code == 200, restored.text
    assert restored.json()["deleted_at"] is None
    assert {k: restored.json()[k] for k in DEFAULTS} == DEFAULTS
    assert (await client.get(base)).json()["messages"] == {**NO_MESSAGES, "pending": 1}
    kept = await client.get(f"{base}/messages/{message['id']}")
    assert kept.status_code == 200
    assert kept.json()["body"] == {"keep": "me"}
    assert (await client.post(f"{base}/messages", json={"body": 2})).status_code == 201

    page = await events(client, name)
    assert [e["type"] for e in page["items"]] == [
        "queue.created",
        "message.created",
        "queue.deleted",
        "queue.restored",
        "message.created",
    ]
    assert [e["seq"] for e in page["items"]] == [1, 2, 3, 4, 5]
    assert page["items"][2]["data"]["deleted_at"] is not None
    assert page["items"][3]["data"]["deleted_at"] is None


async def test_include_deleted_needs_manage(server: Server, client: httpx.AsyncClient) -> None:
    name = (await create_queue(client))["name"]
    assert (await client.delete(f"/api/v1/queues/{name}")).status_code == 200
    async with server.client(auth(mint("reader", f"subscribe:{name}"))) as reader:
        error = assert_error(
            await reader.get(f"/api/v1/queues/{name}", params={"include_deleted": "true"}), 403, "forbidden"
        )
        assert error["details"] == {"needed": f"manage:{name}"}
        assert_error(await reader.get(f"/api/v1/queues/{name}"), 404, "queue_not_found")


async def test_listing_deleted_queues_needs_manage(server: Server, client: httpx.AsyncClient) -> None:
    name = (await create_queue(client))["name"]
    assert (await client.delete(f"/api/v1/queues/{name}")).status_code == 200
    async with server.client(auth(mint("reader", f"subscribe:{name}"))) as reader:
        response = await reader.get("/api/v1/queues", params={"include_deleted": "true"})
    if response.status_code != 403:
        assert response.status_code == 200, response.text
        assert name not in [q["name"] for q in response.json()["items"]]


# Bounds -----------------------------------------------------------------------------------------
# Settings are PostgreSQL `integer` columns (32-bit); sequence numbers are `bigint` on both databases.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


@pytest.mark.parametrize("field", ["alert_after", "retention_seconds"])
@pytest.mark.parametrize("value", [INT32_MAX + 1, 10**15, INT64_MAX + 1], ids=["2^31", "10^15", "2^63"])
async def test_a_setting_past_its_column_is_422_and_changes_nothing(
    server: Server, client: httpx.AsyncClient, field: str, value: int
) -> None:
    queue = await create_queue(client)
    before = await snapshot(server)
    created = await client.post("/api/v1/queues", json={"name": unique(), field: value})
    assert f"body.{field}" in assert_error(created, 422, "validation_error")["details"]
    patched = await client.patch(f"/api/v1/queues/{queue['name']}", json={field: value})
    assert f"body.{field}" in assert_error(patched, 422, "validation_error")["details"]
    assert await snapshot(server) == before


@pytest.mark.parametrize("field", ["alert_after", "retention_seconds"])
async def test_the_largest_setting_is_kept(client: httpx.AsyncClient, field: str) -> None:
    created = await create_queue(client, **{field: INT32_MAX})
    patched = await client.patch(f"/api/v1/queues/{created['name']}", json={field: INT32_MAX - 1})
    assert (created[field], patched.json()[field]) == (INT32_MAX, INT32_MAX - 1)
    assert (await client.get(f"/api/v1/queues/{created['name']}")).json()[field] == INT32_MAX - 1


@pytest.mark.parametrize("format", ["json", "csv"])
async def test_events_after_past_a_bigint_is_422(client: httpx.AsyncClient, format: str) -> None:
    name = (await create_queue(client))["name"]
    params = {"after": str(INT64_MAX + 1), "format": format}
    response = await client.get(f"/api/v1/queues/{name}/events", params=params)
    assert "query.after" in assert_error(response, 422, "validation_error")["details"]
    last = await events(client, name, after=INT64_MAX)
    assert (last["items"], last["total"], last["has_more"]) == ([], 0, False)


@pytest.mark.parametrize("where", ["query", "header"])
@pytest.mark.parametrize("cursor", [str(INT64_MAX + 1), "9" * 5000], ids=["2^63", "5000-digits"])
async def test_a_stream_cursor_past_a_bigint_is_422(
    client: httpx.AsyncClient, where: str, cursor: str
) -> None:
    name = (await create_queue(client))["name"]
    field, given = (
        ("query.last_event_id", {"params": {"last_event_id": cursor}})
        if where == "query"
        else ("header.Last-Event-ID", {"headers": {"Last-Event-ID": cursor}})
    )
    async with client.stream("GET", f"/api/v1/queues/{name}/stream", **given) as response:
        assert response.status_code == 422  # a stream that opened would run for its lifetime
        await response.aread()
    error = assert_error(response, 422, "validation_error")
    assert error["details"] == {field: [f"a whole number from 0 to {INT64_MAX}"]}


# The event log ----------------------------------------------------------------------------------


async def test_events_keyset_paging(client: httpx.AsyncClient) -> None:
    name = (await create_queue(client))["name"]
    published = [await publish(client, name, {"n": n}) for n in range(5)]

    seen: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await events(client, name, after=after, limit=2)
        assert page["limit"] == 2
        assert page["total"] == 6 - after
        assert len(page["items"]) <= 2
        assert page["has_more"] is (after + len(page["items"]) < 6)
        for item in page["items"]:
            assert set(item) == {"seq", "type", "at", "data"}
        seen += page["items"]
        if not page["items"]:
            break
        after = page["items"][-1]["seq"]
    assert [e["seq"] for e in seen] == [1, 2, 3, 4, 5, 6]
    assert [e["type"] for e in seen] == ["queue.created"] + ["message.created"] * 5
    assert [e["data"]["id"] for e in seen[1:]] == [m["id"] for m in published]
    assert [e["data"]["body"] for e in seen[1:]] == [{"n": n} for n in range(5)]
    assert all(when(a["at"]) <= when(b["at"]) for a, b in itertools.pairwise(seen))

    tail = await events(client, name, after=6)
    assert (tail["items"], tail["total"], tail["has_more"]) == ([], 0, False)
    default = await events(client, name)
    assert (default["limit"], len(default["items"])) == (50, 6)


@pytest.mark.parametrize(
    "params",
    [{"after": -1}, {"limit": 0}, {"limit": 201}, {"after": "latest"}],
    ids=["negative-after", "zero-limit", "huge-limit", "text-after"],
)
async def test_events_paging_out_of_range_is_422(client: httpx.AsyncClient, params: dict[str, Any]) -> None:
    name = (await create_queue(client))["name"]
    assert_error(await client.get(f"/api/v1/queues/{name}/events", params=params), 422, "validation_error")


# Scopes -----------------------------------------------------------------------------------------


async def test_scope_failures_are_403_and_change_nothing(server: Server, client: httpx.AsyncClient) -> None:
    name = (await create_queue(client))["name"]
    deleted = (await create_queue(client))["name"]
    assert (await client.delete(f"/api/v1/queues/{deleted}")).status_code == 200
    fresh = unique()
    before = await snapshot(server)
    scopes = f"subscribe:{name} subscribe:{deleted} publish:{name} publish:{fresh} consume:*"
    async with server.client(auth(mint("limited", scopes))) as limited:
        attempts = [
            (await limited.post("/api/v1/queues", json={"name": fresh}), f"manage:{fresh}"),
            (await limited.patch(f"/api/v1/queues/{name}", json={"description": "x"}), f"manage:{name}"),
            (await limited.delete(f"/api/v1/queues/{name}"), f"manage:{name}"),
            (await limited.post(f"/api/v1/queues/{deleted}/restore"), f"manage:{deleted}"),
        ]
        for response, needed in attempts:
            assert assert_error(response, 403, "forbidden")["details"] == {"needed": needed}
        # Reading still works with subscribe.
        assert (await limited.get(f"/api/v1/queues/{name}")).status_code == 200
        assert (await limited.get(f"/api/v1/queues/{name}/events")).status_code == 200
    async with server.client(auth(mint("poster", f"publish:{name}"))) as poster:
        assert_error(await poster.get(f"/api/v1/queues/{name}"), 403, "forbidden")
        assert_error(await poster.get(f"/api/v1/queues/{name}/events"), 403, "forbidden")
    assert await snapshot(server) == before


async def test_missing_or_bad_token_is_401(server: Server) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer not-a-jwt"},
        auth(mint(secret="another-secret-" + "y" * 40)),
    ):
        async with server.client(headers) as stranger:
            response = await stranger.get("/api/v1/queues")
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"


async def test_expired_token_is_401(server: Server) -> None:
    async with server.client(auth(mint(ttl=-10))) as late:
        assert_error(await late.post("/api/v1/queues", json={"name": unique()}), 401, "unauthorized")


async def test_manager_scope_glob_creates_and_manages(server: Server) -> None:
    team = unique("ops")
    async with server.client(auth(mint("dave", f"manage:{team}.* subscribe:{team}.*"))) as dave:
        queue = await create_queue(dave, f"{team}.alerts.high")
        assert queue["owner"] == "dave"
        assert (
            await dave.patch(f"/api/v1/queues/{queue['name']}", json={"description": "d"})
        ).status_code == 200
        assert (await dave.delete(f"/api/v1/queues/{queue['name']}")).status_code == 200
        assert (await dave.post(f"/api/v1/queues/{queue['name']}/restore")).status_code == 200
        outside = await dave.post("/api/v1/queues", json={"name": unique()})
        assert_error(outside, 403, "forbidden")
