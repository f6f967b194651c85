"""Notifications against a real server, as the people who get them see them: each person's own feed
(nobody reaches anyone else's), created by admins and services, read and unread, counted, streamed
live and resumed, raised by the hub itself for dead letters and backlogs, and removed when expired."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from conftest import Listener, Server, assert_error, auth, mint, snapshot, sql, unique

BASE = "/api/v1/notifications"
LONG = 600  # a visibility timeout no test outlives


@dataclass(frozen=True)
class Person:
    """Someone with a token of their own; no scope is needed to reach one's own notifications."""

    subject: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return auth(self.token)


def person(prefix: str = "user", scopes: str = "") -> Person:
    subject = unique(prefix)
    return Person(subject, mint(subject, scopes))


def stream_url(server: Server) -> str:
    return f"{server.url}{BASE}/stream"


async def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


async def send(http: httpx.AsyncClient, recipients: list[str], **fields: Any) -> list[dict[str, Any]]:
    """POST /api/v1/notifications (as `http`, normally the admin) and the notifications it made."""
    body = {"recipients": recipients, "type": "note", "title": "Hello", **fields}
    response = await http.post(BASE, json=body)
    answer = await ok(response, 201)
    assert set(answer) == {"items"}, answer
    return list(answer["items"])


async def send_one(http: httpx.AsyncClient, recipient: str, **fields: Any) -> dict[str, Any]:
    [item] = await send(http, [recipient], **fields)
    return item


async def page(http: httpx.AsyncClient, who: Person, **params: Any) -> dict[str, Any]:
    return dict(await ok(await http.get(BASE, headers=who.headers, params=params)))


async def listed(http: httpx.AsyncClient, who: Person, **params: Any) -> list[dict[str, Any]]:
    return list((await page(http, who, limit=200, **params))["items"])


async def unread(http: httpx.AsyncClient, who: Person) -> int:
    answer = await ok(await http.get(f"{BASE}/unread-count", headers=who.headers))
    assert set(answer) == {"unread_count"}, answer
    return int(answer["unread_count"])


async def stats(http: httpx.AsyncClient, who: Person) -> dict[str, Any]:
    return dict(await ok(await http.get(f"{BASE}/stats", headers=who.headers)))


async def mark(http: httpx.AsyncClient, who: Person, notification_id: str, is_read: bool) -> httpx.Response:
    return await http.patch(f"{BASE}/{notification_id}", headers=who.headers, json={"is_read": is_read})


async def mark_all_read(http: httpx.AsyncClient, who: Person) -> int:
    answer = await ok(await http.post(f"{BASE}/mark-all-read", headers=who.headers))
    assert set(answer) == {"changed"}, answer
    return int(answer["changed"])


def data(event: Any) -> dict[str, Any]:
    return dict(json.loads(event.data))


def counts(listener: Listener) -> list[int]:
    """The `unread_count` values the stream sent, in order."""
    return [data(e)["unread_count"] for _, e in listener.events if e.event == "unread_count"]


async def wait_for_count(listener: Listener, value: int, timeout: float = 5) -> float:
    """Until an `unread_count` event says `value`; the monotonic time it arrived."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for arrived, event in listener.events:
            if event.event == "unread_count" and data(event)["unread_count"] == value:
                return arrived
        await listener.wait_for(len(listener.events) + 1, timeout=max(deadline - time.monotonic(), 0))
    raise AssertionError(f"no unread_count {value}: {counts(listener)}")


async def wait_logged(listener: Listener, count: int, timeout: float = 5) -> list[Any]:
    """Until `count` events of the log (with an `id:`) have arrived; those events."""
    deadline = time.monotonic() + timeout
    while len(listener.logged()) < count and time.monotonic() < deadline and not listener.finished:
        await listener.wait_for(len(listener.events) + 1, timeout=max(deadline - time.monotonic(), 0))
    return listener.logged()


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def rows_of(server: Server, subject: str) -> list[tuple[Any, ...]]:
    """A person's notifications and their log, straight from the database."""
    notes = await sql(server, "SELECT * FROM notifications WHERE recipient = ? ORDER BY id", subject)
    log = await sql(server, "SELECT * FROM events WHERE log = ? ORDER BY seq", f"user:{subject}")
    return notes + log


# ---------------------------------------------------------------------------------------------
# 1. Isolation


async def test_a_person_can_neither_see_mark_delete_nor_stream_someone_elses(
    server: Server, client: httpx.AsyncClient
) -> None:
    alice, bob = person("alice"), person("bob")
    bobs = [
        await send_one(client, bob.subject, type="b.report", priority="urgent", title="Bob's secret"),
        await send_one(client, bob.subject, type="b.report", priority="high"),
        await send_one(client, bob.subject, type="b.other", priority="low"),
    ]
    assert (await mark(client, bob, bobs[1]["id"], True)).status_code == 200
    [own] = await send(client, [alice.subject], type="a.note")

    bob_before = (await listed(client, bob), await unread(client, bob), await stats(client, bob))
    assert bob_before[1] == 2
    before = await snapshot(server)
    by_header = Listener(stream_url(server), headers=alice.headers, params={"last_event_id": 0})
    by_query = Listener(
        stream_url(server), headers={}, params={"access_token": alice.token, "last_event_id": 0}
    )
    watching_bob = Listener(stream_url(server), headers=bob.headers, params={"last_event_id": 0})
    async with by_header, by_query, watching_bob:
        # Seeing: the list (with any filter), the unread count and the stats hold Alice's alone.
        for params in ({}, {"type": "b.report"}, {"priority": "urgent"}, {"unread_only": "true"}):
            answer = await page(client, alice, **params)
            expected = [own["id"]] if not params or "unread_only" in params else []
            assert [n["id"] for n in answer["items"]] == expected, params
            assert answer["total"] == len(expected)
            assert answer["unread_count"] == 1
        assert await unread(client, alice) == 1
        assert await stats(client, alice) == {
            "total": 1,
            "unread": 1,
            "urgent_count": 0,
            "by_type": {"a.note": 1},
            "by_priority": {"urgent": 0, "high": 0, "medium": 1, "low": 0},
        }
        # Marking (both ways) and deleting: Bob's notifications do not exist for Alice.
        for note in bobs:
            for is_read in (True, False):
                assert_error(await mark(client, alice, note["id"], is_read), 404, "notification_not_found")
            response = await client.delete(f"{BASE}/{note['id']}", headers=alice.headers)
            assert_error(response, 404, "notification_not_found")
        assert await snapshot(server) == before
        assert (await listed(client, bob), await unread(client, bob), await stats(client, bob)) == bob_before

        # Alice's mark-all-read reaches her own and nothing of Bob's.
        bob_rows = await rows_of(server, bob.subject)
        assert await mark_all_read(client, alice) == 1
        assert await rows_of(server, bob.subject) == bob_rows
        assert await unread(client, bob) == 2

        # Streaming: Bob's live changes happen (his own stream shows them), Alice's streams see none.
        await send(client, [bob.subject], type="b.live", title="Bob's new secret")
        assert await mark_all_read(client, bob) == 3
        assert (await client.delete(f"{BASE}/{bobs[0]['id']}", headers=bob.headers)).status_code == 200
        marker = await send_one(client, alice.subject, type="a.marker")
        bob_events = await wait_logged(watching_bob, 9)
        for listener in (by_header, by_query):
            await listener.wait_for(2, event="notification.created")
        await asyncio.sleep(0.2)  # anything that should not come would arrive now

    assert [e.event for e in bob_events] == [
        *["notification.created"] * 3,
        "notification.read",
        "notification.created",
        *["notification.read"] * 3,
        "notification.deleted",
    ]
    for listener in (by_header, by_query):
        logged = listener.logged()
        assert [(e.event, data(e)["id"]) for e in logged] == [
            ("notification.created", own["id"]),
            ("notification.read", own["id"]),
            ("notification.created", marker["id"]),
        ]
        assert {data(e)["recipient"] for e in logged} == {alice.subject}
        assert [int(e.id) for e in logged] == [1, 2, 3]
        assert counts(listener) == [1, 0, 1]
        assert "Bob" not in "".join(e.data for _, e in listener.events)


# ---------------------------------------------------------------------------------------------
# 2. Creating, reading, counting, marking, deleting


@pytest.mark.parametrize(
    "scopes",
    [None, "", "publish:* consume:* subscribe:* manage:*"],
    ids=["no token", "no scope", "every queue scope"],
)
async def test_only_admins_and_the_notify_scope_create(
    server: Server, client: httpx.AsyncClient, scopes: str | None
) -> None:
    target = person("target")
    before = await snapshot(server)
    if scopes is None:
        body = {"recipients": [target.subject], "type": "note", "title": "Hi"}
        response = await client.post(BASE, headers={"Authorization": ""}, json=body)
        assert_error(response, 401, "unauthorized")
    else:
        outsider = person("outsider", scopes)
        body = {"recipients": [target.subject, outsider.subject], "type": "note", "title": "Hi"}
        assert_error(await client.post(BASE, headers=outsider.headers, json=body), 403, "forbidden")
    assert await snapshot(server) == before
    assert await unread(client, target) == 0


async def test_a_service_with_the_notify_scope_and_an_admin_create(
    server: Server, client: httpx.AsyncClient
) -> None:
    service, target = person("service", "notify"), person("target")
    async with server.client(service.headers) as as_service:
        made = await send_one(as_service, target.subject, title="From the service")
    assert made["recipient"] == target.subject
    await send_one(client, target.subject, title="From the admin")
    assert [n["title"] for n in await listed(client, target)] == ["From the admin", "From the service"]
    assert await listed(client, service) == []  # the sender gets nothing


async def test_one_call_notifies_many_recipients_once_each(server: Server, client: httpx.AsyncClient) -> None:
    a, b, c = person("a"), person("b"), person("c")
    expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    fields = {
        "type": "deploy.done",
        "priority": "high",
        "title": "Deploy finished",
        "message": 'Version 1.2 is live, comma, "quotes" and 🚀',
        "action_url": "/deploys/42",
        "queue": "builds",
        "message_id": "0190b2c4-0000-7000-8000-000000000000",
        "expires_at": expires.isoformat(),
    }
    items = await send(client, [a.subject, b.subject, a.subject, c.subject, b.subject], **fields)
    assert [n["recipient"] for n in items] == [a.subject, b.subject, c.subject]
    assert len({n["id"] for n in items}) == 3
    for who, made in zip((a, b, c), items, strict=True):
        [seen] = await listed(client, who)
        assert seen == made
        assert {k: seen[k] for k in fields if k != "expires_at"} == {
            k: v for k, v in fields.items() if k != "expires_at"
        }
        assert when(seen["expires_at"]) == expires
        assert seen["is_read"] is False and seen["read_at"] is None and seen["deleted_at"] is None
        assert abs((when(seen["created_at"]) - datetime.now(UTC)).total_seconds()) < 30
        assert await unread(client, who) == 1


BAD_BODIES: dict[str, dict[str, Any]] = {
    "no recipients": {"recipients": []},
    "a message priority": {"priority": "normal"},
    "an unknown priority": {"priority": "critical"},
    "a javascript: link": {"action_url": "javascript:alert(document.cookie)"},
    "a data: link": {"action_url": "data:text/html,<script>alert(1)</script>"},
    "a protocol-less host": {"action_url": "evil.example.com/x"},
    "an empty title": {"title": ""},
    "an unknown field": {"sender": "me"},
    "a naive expiry": {"expires_at": "2030-01-01T00:00:00"},
    "an expiry at 0": {"expires_at": 0},  # 1970: it would be created expired
    "an expiry in the past": {"expires_at": "2020-01-01T00:00:00Z"},
    "an expiry past the year 9999 in UTC": {"expires_at": "9999-12-31T23:00:00-05:00"},
    "too many recipients": {"recipients": [f"r{n}" for n in range(1001)]},
}


@pytest.mark.parametrize("bad", BAD_BODIES, ids=list(BAD_BODIES))
async def test_invalid_creates_are_422_and_store_nothing(
    server: Server, client: httpx.AsyncClient, bad: str
) -> None:
    target = person("target")
    body = {"recipients": [target.subject], "type": "note", "title": "Hi", **BAD_BODIES[bad]}
    before = await snapshot(server)
    assert_error(await client.post(BASE, json=body), 422, "validation_error")
    assert await snapshot(server) == before


async def test_an_expiry_in_another_offset_is_kept_in_utc_and_honoured(client: httpx.AsyncClient) -> None:
    who = person("offset")
    soon = datetime.now(UTC) + timedelta(seconds=1.5)
    karachi = timezone(timedelta(hours=5))  # its wall clock reads later than UTC's
    [made] = await send(
        client, [who.subject], type="t", title="soon gone", expires_at=soon.astimezone(karachi).isoformat()
    )
    assert made["expires_at"].endswith("Z") and when(made["expires_at"]) == soon
    await asyncio.sleep((soon - datetime.now(UTC)).total_seconds() + 0.5)
    assert await listed(client, who) == []


async def test_an_overlong_recipient_is_422_and_stores_nothing(
    server: Server, client: httpx.AsyncClient
) -> None:
    fine = person("fine")
    body = {"recipients": [fine.subject, "r" * 256], "type": "note", "title": "Hi"}
    before = await snapshot(server)
    assert_error(await client.post(BASE, json=body), 422, "validation_error")
    assert await snapshot(server) == before


@pytest.mark.parametrize(
    "url", ["/queues/orders?tab=dead#top", "https://example.com/a?b=1", "http://x.test/"]
)
async def test_relative_and_http_action_urls_are_accepted(client: httpx.AsyncClient, url: str) -> None:
    made = await send_one(client, unique("target"), action_url=url)
    assert made["action_url"] == url


async def test_list_filters_pages_newest_first_with_unread_count(
    server: Server, client: httpx.AsyncClient
) -> None:
    me = person("lister")
    made = []
    for n, (type_, priority) in enumerate(
        [("build", "low"), ("build", "urgent"), ("deploy", "high"), ("build", "urgent"), ("deploy", "medium")]
    ):
        made.append(await send_one(client, me.subject, type=type_, priority=priority, title=f"n{n}"))
    for n in (1, 2):
        assert (await mark(client, me, made[n]["id"], True)).status_code == 200
    newest_first = [n["id"] for n in reversed(made)]

    everything = await page(client, me)
    assert [n["id"] for n in everything["items"]] == newest_first
    assert {k: everything[k] for k in ("total", "limit", "offset", "has_more", "unread_count")} == {
        "total": 5,
        "limit": 50,
        "offset": 0,
        "has_more": False,
        "unread_count": 3,
    }

    def titles(answer: dict[str, Any]) -> list[str]:
        return [n["title"] for n in answer["items"]]

    assert titles(await page(client, me, unread_only="true")) == ["n4", "n3", "n0"]
    assert titles(await page(client, me, unread_only="false")) == ["n4", "n3", "n2", "n1", "n0"]
    assert titles(await page(client, me, priority="urgent")) == ["n3", "n1"]
    assert titles(await page(client, me, type="deploy")) == ["n4", "n2"]
    both = await page(client, me, type="build", priority="urgent", unread_only="true")
    assert titles(both) == ["n3"]
    assert (both["total"], both["unread_count"]) == (1, 3)  # the count is the person's, not the filter's
    assert titles(await page(client, me, type="nothing")) == []

    first = await page(client, me, limit=2)
    middle = await page(client, me, limit=2, offset=2)
    last = await page(client, me, limit=2, offset=4)
    assert (titles(first), first["has_more"], first["total"]) == (["n4", "n3"], True, 5)
    assert (titles(middle), middle["has_more"]) == (["n2", "n1"], True)
    assert (titles(last), last["has_more"]) == (["n0"], False)
    filtered = await page(client, me, priority="urgent", limit=1)
    assert (titles(filtered), filtered["total"], filtered["has_more"]) == (["n3"], 2, True)

    for params in ({"priority": "normal"}, {"limit": 0}, {"limit": 201}, {"offset": -1}):
        response = await client.get(BASE, headers=me.headers, params=params)
        assert_error(response, 422, "validation_error")


async def test_unread_count_and_stats(server: Server, client: httpx.AsyncClient) -> None:
    me = person("counter")
    assert await unread(client, me) == 0
    assert await stats(client, me) == {
        "total": 0,
        "unread": 0,
        "urgent_count": 0,
        "by_type": {},
        "by_priority": {"urgent": 0, "high": 0, "medium": 0, "low": 0},
    }
    urgent = [await send_one(client, me.subject, type="outage", priority="urgent") for _ in range(3)]
    await send_one(client, me.subject, type="outage", priority="high")
    low = await send_one(client, me.subject, type="digest", priority="low")
    await send_one(client, me.subject, type="digest")  # medium by default
    for note in (urgent[0], low):
        assert (await mark(client, me, note["id"], True)).status_code == 200

    assert await unread(client, me) == 4
    assert await stats(client, me) == {
        "total": 6,
        "unread": 4,
        "urgent_count": 2,  # three urgent, one of them read
        "by_type": {"outage": 4, "digest": 2},
        "by_priority": {"urgent": 3, "high": 1, "medium": 1, "low": 1},
    }
    assert await mark_all_read(client, me) == 4
    after = await stats(client, me)
    assert (after["total"], after["unread"], after["urgent_count"]) == (6, 0, 0)


async def test_read_sets_read_at_and_unread_clears_it(server: Server, client: httpx.AsyncClient) -> None:
    me = person("reader")
    note = await send_one(client, me.subject)
    read = await ok(await mark(client, me, note["id"], True))
    assert (read["id"], read["is_read"]) == (note["id"], True)
    assert abs((when(read["read_at"]) - datetime.now(UTC)).total_seconds()) < 30
    assert when(read["read_at"]) >= when(note["created_at"])
    [listed_read] = await listed(client, me)
    assert listed_read == read
    assert await unread(client, me) == 0

    again = await ok(await mark(client, me, note["id"], True))  # reading twice keeps the first time
    assert again["read_at"] == read["read_at"]

    unread_again = await ok(await mark(client, me, note["id"], False))
    assert (unread_again["is_read"], unread_again["read_at"]) == (False, None)
    [listed_unread] = await listed(client, me)
    assert (listed_unread["is_read"], listed_unread["read_at"]) == (False, None)
    assert await unread(client, me) == 1

    for body in ({"is_read": "maybe"}, {}, {"is_read": True, "title": "renamed"}):
        response = await client.patch(f"{BASE}/{note['id']}", headers=me.headers, json=body)
        assert_error(response, 422, "validation_error")
    assert_error(await mark(client, me, "no-such-id", True), 404, "notification_not_found")
    [unchanged] = await listed(client, me)
    assert unchanged == listed_unread


async def test_mark_all_read_says_how_many_changed(server: Server, client: httpx.AsyncClient) -> None:
    me, other = person("marker"), person("bystander")
    notes = [await send_one(client, me.subject, title=f"n{n}") for n in range(4)]
    await send_one(client, other.subject)
    first_read = await ok(await mark(client, me, notes[0]["id"], True))

    assert await mark_all_read(client, me) == 3
    assert await mark_all_read(client, me) == 0
    items = await listed(client, me)
    assert all(n["is_read"] and n["read_at"] for n in items)
    assert next(n for n in items if n["id"] == notes[0]["id"])["read_at"] == first_read["read_at"]
    assert await unread(client, me) == 0
    assert await unread(client, other) == 1
    assert await mark_all_read(client, person("nobody")) == 0


async def test_delete_removes_a_notification(server: Server, client: httpx.AsyncClient) -> None:
    me = person("deleter")
    keep, gone = await send_one(client, me.subject, title="keep"), await send_one(client, me.subject)
    deleted = await ok(await client.delete(f"{BASE}/{gone['id']}", headers=me.headers))
    assert deleted["id"] == gone["id"] and deleted["deleted_at"] is not None
    assert [n["id"] for n in await listed(client, me)] == [keep["id"]]
    assert await unread(client, me) == 1
    assert (await stats(client, me))["total"] == 1
    assert_error(
        await client.delete(f"{BASE}/{gone['id']}", headers=me.headers), 404, "notification_not_found"
    )
    assert_error(await mark(client, me, gone["id"], True), 404, "notification_not_found")


async def test_every_endpoint_needs_a_token(server: Server, client: httpx.AsyncClient) -> None:
    nobody = {"Authorization": ""}
    calls = [
        ("GET", BASE),
        ("GET", f"{BASE}/unread-count"),
        ("GET", f"{BASE}/stats"),
        ("GET", f"{BASE}/stream"),
        ("POST", f"{BASE}/mark-all-read"),
        ("PATCH", f"{BASE}/x"),
        ("DELETE", f"{BASE}/x"),
    ]
    for method, url in calls:
        body = {"is_read": True} if method == "PATCH" else None
        response = await client.request(method, url, headers=nobody, json=body)
        assert_error(response, 401, "unauthorized")


# ---------------------------------------------------------------------------------------------
# 3. Live


async def test_stream_counts_on_connect_and_delivers_creations_within_100ms(
    server: Server, client: httpx.AsyncClient
) -> None:
    me = person("live")
    await send(client, [me.subject, me.subject])  # one notification: recipients are collapsed
    await send_one(client, me.subject)
    async with Listener(stream_url(server), headers=me.headers) as listener:
        assert listener.response is not None
        assert listener.response.headers["content-type"].startswith("text/event-stream")
        [first] = await listener.wait_for(1)
        assert (first.event, data(first), first.id) == ("unread_count", {"unread_count": 2}, "")
        lags = []
        for n in range(5):
            sent = time.monotonic()
            made = await send_one(client, me.subject, title=f"live {n}", priority="urgent")
            created = await listener.wait_for(n + 1, event="notification.created")
            assert len(created) == n + 1
            arrived = next(t for t, e in listener.events if e is created[-1])
            assert data(created[-1]) == made
            lags.append(arrived - sent)
        await wait_for_count(listener, 7)
    assert max(lags) < 0.1, lags
    assert counts(listener) == [2, 3, 4, 5, 6, 7]
    assert [int(e.id) for e in listener.logged()] == [3, 4, 5, 6, 7]  # after the two already in the log


async def test_mark_all_read_elsewhere_updates_the_count_within_100ms(
    server: Server, client: httpx.AsyncClient
) -> None:
    me = person("twotabs")
    notes = [await send_one(client, me.subject, title=f"n{n}") for n in range(3)]
    other_tab = mint(me.subject, "")  # the same person, signed in elsewhere
    async with (
        Listener(stream_url(server), headers={}, params={"access_token": me.token}) as listener,
        server.client(auth(other_tab)) as elsewhere,
    ):
        await wait_for_count(listener, 3)
        sent = time.monotonic()
        assert await mark_all_read(elsewhere, me) == 3
        arrived = await wait_for_count(listener, 0)
        reads = await listener.wait_for(3, event="notification.read")
    assert arrived - sent < 0.1, arrived - sent
    assert sorted(data(e)["id"] for e in reads) == sorted(n["id"] for n in notes)
    assert all(data(e)["is_read"] and data(e)["read_at"] for e in reads)
    assert counts(listener) == [3, 0]


def away(n: int) -> Iterator[str]:
    yield from (f"away {i}" for i in range(n))


@pytest.mark.parametrize("style", ["header", "access_token"])
async def test_resume_after_a_disconnect_loses_and_repeats_nothing(
    server: Server, client: httpx.AsyncClient, style: str
) -> None:
    me = person("resumer")
    url = stream_url(server)
    if style == "header":
        first = Listener(url, headers=me.headers, params={"last_event_id": 0})
    else:
        first = Listener(url, headers={}, params={"access_token": me.token, "last_event_id": 0})
    async with first:
        seen = [await send_one(client, me.subject, title=f"before {n}") for n in range(2)]
        await first.wait_for(2, event="notification.created")
        await wait_for_count(first, 2)
    before = first.logged()
    cursor = before[-1].id
    assert [int(e.id) for e in before] == [1, 2]

    # While away: three more arrive, one is read here, everything is read in another tab, one goes.
    made = [await send_one(client, me.subject, title=title) for title in away(3)]
    assert (await mark(client, me, made[0]["id"], True)).status_code == 200
    assert await mark_all_read(client, me) == 4
    assert (await client.delete(f"{BASE}/{seen[0]['id']}", headers=me.headers)).status_code == 200

    if style == "header":
        again = Listener(url, headers={**me.headers, "Last-Event-ID": cursor})
    else:  # as EventSource's first request: the cursor and the token in the query
        again = Listener(url, headers={}, params={"access_token": me.token, "last_event_id": cursor})
    async with again:
        assert len(await wait_logged(again, 9)) == 9
        late = await send_one(client, me.subject, title="after")
        await wait_logged(again, 10)
        await wait_for_count(again, 1)
        await asyncio.sleep(0.2)  # a duplicate would arrive now
    logged = again.logged()
    assert [int(e.id) for e in logged] == list(range(int(cursor) + 1, int(cursor) + 11))
    assert [(e.event, data(e)["title"]) for e in logged] == [
        ("notification.created", "away 0"),
        ("notification.created", "away 1"),
        ("notification.created", "away 2"),
        ("notification.read", "away 0"),
        *[("notification.read", title) for title in ("before 0", "before 1", "away 1", "away 2")],
        ("notification.deleted", "before 0"),
        ("notification.created", "after"),
    ]
    assert data(logged[-1]) == late
    assert data(logged[-2])["deleted_at"] is not None
    assert counts(again) == [0, 1]  # on connect (after the missed events), then after the new one


# ---------------------------------------------------------------------------------------------
# 4. Automatic notifications


async def owned_queue(http: httpx.AsyncClient, owner: Person, **settings: Any) -> str:
    name = unique("notified")
    response = await http.post("/api/v1/queues", headers=owner.headers, json={"name": name, **settings})
    assert response.status_code == 201, response.text
    assert response.json()["owner"] == owner.subject
    return name


def owner_of(prefix: str) -> Person:
    subject = unique(prefix)
    return Person(subject, mint(subject, "manage:notified-* publish:notified-* consume:notified-*"))


async def publish(http: httpx.AsyncClient, who: Person, queue: str, body: Any = "job") -> dict[str, Any]:
    url = f"/api/v1/queues/{queue}/messages"
    return dict(await ok(await http.post(url, headers=who.headers, json={"body": body}), 201))


async def claim(
    http: httpx.AsyncClient, who: Person, queue: str, visibility_timeout: float = LONG
) -> list[dict[str, Any]]:
    url = f"/api/v1/queues/{queue}/claim"
    body = {"max": 100, "visibility_timeout": visibility_timeout}
    return list((await ok(await http.post(url, headers=who.headers, json=body)))["items"])


@pytest.mark.parametrize("urgent", [False, True], ids=["default", "dead_letter_urgent"])
async def test_a_nack_on_the_last_attempt_notifies_the_owner_once(
    server: Server, client: httpx.AsyncClient, urgent: bool
) -> None:
    owner = owner_of("owner")
    settings = {"max_attempts": 1, "dead_letter_urgent": True} if urgent else {"max_attempts": 1}
    queue = await owned_queue(client, owner, **settings)
    worker = person("worker", f"consume:{queue} publish:{queue}")
    message = await publish(client, worker, queue)
    async with Listener(stream_url(server), headers=owner.headers) as listener:
        [leased] = await claim(client, worker, queue)
        url = f"/api/v1/queues/{queue}/messages/{message['id']}/nack"
        nacked = await ok(
            await client.post(
                url, headers=worker.headers, json={"lease_id": leased["lease_id"], "error": "boom"}
            )
        )
        assert nacked["status"] == "dead"
        [created] = await listener.wait_for(1, event="notification.created")
        await wait_for_count(listener, 1)
        await asyncio.sleep(0.3)  # a second notification would arrive now
    [note] = await listed(client, owner)
    assert data(created) == note
    assert listener.logged() == [created]
    assert (note["recipient"], note["type"], note["queue"], note["message_id"]) == (
        owner.subject,
        "message.dead",
        queue,
        message["id"],
    )
    assert note["priority"] == ("urgent" if urgent else "high")
    assert "boom" in note["message"]
    assert note["action_url"].startswith("/")
    assert (await stats(client, owner))["urgent_count"] == (1 if urgent else 0)
    assert await listed(client, worker) == []  # the worker who nacked is not the owner


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A SQLite server whose sweeper ticks every 0.2 s and removes expired things every 0.5 s."""
    settings = {"POMBO_SWEEP_SECONDS": "0.2", "POMBO_RETENTION_SWEEP_SECONDS": "0.5"}
    server = Server(tmp_path_factory.mktemp("quick"), settings).start()
    yield server
    server.stop()


async def test_a_lease_that_expires_on_the_last_attempt_notifies_the_owner_once(quick: Server) -> None:
    owner = owner_of("owner")
    async with quick.client() as http:
        queue = await owned_queue(http, owner, max_attempts=1)
        message = await publish(http, owner, queue)
        async with Listener(stream_url(quick), headers=owner.headers) as listener:
            [leased] = await claim(http, owner, queue, visibility_timeout=0.5)
            [created] = await listener.wait_for(1, timeout=5, event="notification.created")
            await asyncio.sleep(0.6)  # three more sweeps
        [note] = await listed(http, owner)
        dead = await ok(await http.get(f"/api/v1/queues/{queue}/messages/{message['id']}"))
    assert dead["status"] == "dead"
    assert data(created) == note and listener.logged() == [created]
    assert (note["type"], note["queue"], note["message_id"], note["priority"]) == (
        "message.dead",
        queue,
        message["id"],
        "high",
    )
    assert when(note["created_at"]) >= when(leased["lease_expires_at"])


async def test_a_backlog_alert_fires_once_per_episode(quick: Server) -> None:
    owner = owner_of("owner")
    async with quick.client() as http:
        queue = await owned_queue(http, owner, alert_after=1)
        quiet = await owned_queue(http, owner)  # no alert_after: never a backlog alert
        await publish(http, owner, quiet)
        async with Listener(stream_url(quick), headers=owner.headers) as listener:
            first = await publish(http, owner, queue, "old")
            [raised] = await listener.wait_for(1, timeout=5, event="notification.created")
            await publish(http, owner, queue, "also waiting")
            await asyncio.sleep(1.5)  # seven more sweeps, the backlog older still
            assert len(await listener.wait_for(1, event="notification.created", timeout=0)) == 1

            # Drained: the episode ends. A new backlog that grows old is a new episode.
            claimed = await claim(http, owner, queue)
            items = [{"id": m["id"], "lease_id": m["lease_id"]} for m in claimed]
            assert len(items) == 2
            await ok(
                await http.post(f"/api/v1/queues/{queue}/ack", headers=owner.headers, json={"items": items})
            )
            await asyncio.sleep(0.6)  # the sweeper sees the queue calm
            assert len(await listener.wait_for(1, event="notification.created", timeout=0)) == 1
            second = await publish(http, owner, queue, "new episode")
            alerts = await listener.wait_for(2, timeout=5, event="notification.created")
            await asyncio.sleep(0.6)
        notes = await listed(http, owner)
    assert [data(e) for e in reversed(alerts)] == notes
    assert len(notes) == 2
    for note, message in zip(reversed(notes), (first, second), strict=True):
        assert (note["recipient"], note["type"], note["queue"], note["priority"]) == (
            owner.subject,
            "queue.backlog",
            queue,
            "high",
        )
        waited = (when(note["created_at"]) - when(message["available_at"])).total_seconds()
        assert 1 <= waited < 3, waited
    assert data(raised)["id"] == notes[-1]["id"]


# ---------------------------------------------------------------------------------------------
# 5. Expiry


async def test_expired_notifications_are_removed_and_the_stream_says_so(quick: Server) -> None:
    me = person("expiring")
    async with quick.client() as http:
        expires = datetime.now(UTC) + timedelta(seconds=1)
        short = await send_one(http, me.subject, title="short-lived", expires_at=expires.isoformat())
        lasting = await send_one(http, me.subject, title="lasting")
        later = await send_one(
            http, me.subject, title="later", expires_at=(expires + timedelta(hours=1)).isoformat()
        )
        async with Listener(stream_url(quick), headers=me.headers) as listener:
            [deleted] = await listener.wait_for(1, timeout=5, event="notification.deleted")
            gone_at = datetime.now(UTC)
            await wait_for_count(listener, 2)
        remaining = await listed(http, me)
    assert gone_at >= expires
    assert data(deleted)["id"] == short["id"] and data(deleted)["deleted_at"] is not None
    assert [n["id"] for n in remaining] == [later["id"], lasting["id"]]
    assert counts(listener) == [3, 2]
