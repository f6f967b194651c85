"""One stream over several logs (`GET /api/v1/stream`), against a real server: every event of
every log once and in order, a vector cursor that resumes them all, patterns that take on new
queues (also across two replicas), scopes per queue, the bound on logs, unreadable cursors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from conftest import ADMIN, Listener, Server, assert_error, auth, mint, unique
from httpx_sse import ServerSentEvent

PATH = "/api/v1/stream"


def url(server: Server) -> str:
    return f"{server.url}{PATH}"


def positions(event: ServerSentEvent) -> dict[str, int]:
    """The cursor vector of a frame's `id:`."""
    pairs = (pair.rpartition(":") for pair in event.id.split(","))
    return {label: int(seq) for label, _, seq in pairs}


def by_log(events: list[ServerSentEvent]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Each log's events as (its sequence, the data), in the order they came."""
    logs: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for event in events:
        data = json.loads(event.data)
        logs.setdefault(data["log"], []).append((positions(event)[data["log"]], data))
    return logs


async def create_queue(http: httpx.AsyncClient, name: str) -> str:
    response = await http.post("/api/v1/queues", json={"name": name})
    assert response.status_code == 201, response.text
    return name


async def publish(http: httpx.AsyncClient, queue: str, body: Any) -> None:
    response = await http.post(f"/api/v1/queues/{queue}/messages", json={"body": body})
    assert response.status_code == 201, response.text


async def notify(http: httpx.AsyncClient, subject: str, title: str) -> None:
    body = {"recipients": [subject], "type": "note", "title": title}
    response = await http.post("/api/v1/notifications", json=body)
    assert response.status_code == 201, response.text


async def head_of(http: httpx.AsyncClient, queue: str) -> int:
    response = await http.get(f"/api/v1/queues/{queue}/events", params={"limit": 200})
    return int(response.json()["items"][-1]["seq"])


async def publish_all(http: httpx.AsyncClient, queues: list[str], subject: str, rounds: range) -> None:
    """`rounds` messages to each queue and notifications to `subject`, interleaved and concurrent."""

    async def one(n: int) -> None:
        await asyncio.gather(*(publish(http, q, {"n": n}) for q in queues), notify(http, subject, f"t{n}"))

    await asyncio.gather(*(one(n) for n in rounds))


async def logged(listener: Listener, count: int, timeout: float = 10) -> list[ServerSentEvent]:
    """The log events once `count` came, and a moment more: anything extra or doubled comes then."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(listener.logged()) < count and not listener.finished:
        assert asyncio.get_running_loop().time() < deadline, (
            f"{len(listener.logged())} of {count} events came"
        )
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    return listener.logged()


def assert_each_once_in_order(
    events: list[ServerSentEvent], queues: list[str], rounds: range, after: dict[str, int]
) -> None:
    """Each queue's log after `after[queue]` and the notifications: all, once each, in sequence;
    and every frame's cursor holds for every log (never behind where the stream started)."""
    previous = after
    for event in events:
        vector = positions(event)
        assert set(vector) == set(after) and all(vector[log] >= previous[log] for log in after), event.id
        previous = vector
    logs = by_log(events)
    assert set(logs) == {*queues, "@notifications"}, set(logs)
    for queue in queues:
        seqs = [seq for seq, _ in logs[queue]]
        assert seqs == list(range(after[queue] + 1, after[queue] + 1 + len(rounds))), (queue, seqs)
        assert sorted(data["body"]["n"] for _, data in logs[queue]) == list(rounds)
    notes = logs["@notifications"]
    first = after["@notifications"] + 1
    assert [seq for seq, _ in notes] == list(range(first, first + len(rounds)))
    assert sorted(data["title"] for _, data in notes) == sorted(f"t{n}" for n in rounds)


async def test_three_queues_and_notifications_each_event_once_in_order_then_resume(
    server: Server, client: httpx.AsyncClient
) -> None:
    base = unique("mux")
    queues = [await create_queue(client, f"{base}.{name}") for name in ("a", "b", "c")]
    subject = unique("viewer")
    viewer = auth(mint(subject, f"subscribe:{base}.*"))
    params = [*(("queue", q) for q in queues), ("notifications", "true")]
    heads = {q: await head_of(client, q) for q in queues} | {"@notifications": 0}
    async with Listener(url(server), headers=viewer, params=params) as listener:
        [count] = await listener.wait_for(1, event="unread_count")
        assert json.loads(count.data) == {"unread_count": 0, "log": "@notifications"}
        await publish_all(client, queues, subject, range(20))
        events = await logged(listener, 80)
    assert_each_once_in_order(events, queues, range(20), heads)
    last = events[-1].id
    assert set(positions(events[-1])) == {*queues, "@notifications"}
    assert positions(events[-1]) == {q: heads[q] + 20 for q in queues} | {"@notifications": 20}

    # Away: ten more in each log. Back with the last id, by header, then by the query.
    await publish_all(client, queues, subject, range(20, 30))
    for headers, query in (({**viewer, "Last-Event-ID": last}, []), (viewer, [("last_event_id", last)])):
        async with Listener(url(server), headers=headers, params=[*params, *query]) as listener:
            missed = await logged(listener, 40)
        after = {q: heads[q] + 20 for q in queues} | {"@notifications": 20}
        assert_each_once_in_order(missed, queues, range(20, 30), after)


async def test_a_pattern_takes_on_a_queue_created_after_it_connected(
    server: Server, client: httpx.AsyncClient
) -> None:
    base = unique("pat")
    old = await create_queue(client, f"{base}.old")
    viewer = auth(mint(unique("viewer"), f"subscribe:{base}.*"))
    async with Listener(url(server), headers=viewer, params={"queue": f"{base}.*"}) as listener:
        await publish(client, old, "before")
        await listener.wait_for(1)
        new = await create_queue(client, f"{base}.new")
        await create_queue(client, unique("elsewhere"))  # matches nothing: never seen
        for n in range(3):
            await publish(client, new, n)
        logs = by_log(await logged(listener, 5))
    assert [data["body"] for _, data in logs[old]] == ["before"]
    assert [(seq, data.get("body")) for seq, data in logs[new]] == [(1, None), (2, 0), (3, 1), (4, 2)]
    assert set(logs) == {old, new}


async def test_a_queue_the_token_may_not_read_is_refused_naming_each(
    server: Server, client: httpx.AsyncClient
) -> None:
    base = unique("deny")
    queues = [await create_queue(client, f"{base}-{name}") for name in ("a", "b", "c")]
    reader = auth(mint(unique("reader"), f"subscribe:{queues[0]}"))
    params = [("queue", queues[0]), ("queue", queues[1]), ("queue", f"{base}-*"), ("queue", queues[2])]
    async with httpx.AsyncClient(base_url=server.url) as http:
        error = assert_error(await http.get(PATH, params=params, headers=reader), 403, "forbidden")
        assert error["details"]["queues"] == [queues[1], f"{base}-*", queues[2]]
        async with http.stream("GET", PATH, params={"queue": queues[0]}, headers=reader) as allowed:
            assert allowed.status_code == 200
        assert_error(await http.get(PATH, params={"queue": queues[0]}), 401, "unauthorized")


async def test_a_queue_named_before_it_exists_is_followed_from_its_creation(
    server: Server, client: httpx.AsyncClient
) -> None:
    base = unique("later")
    old, late, gone = await create_queue(client, f"{base}-old"), f"{base}-late", f"{base}-gone"
    await create_queue(client, gone)
    assert (await client.delete(f"/api/v1/queues/{gone}")).status_code == 200
    viewer = auth(mint(unique("viewer"), f"subscribe:{base}-*"))
    params = [("queue", old), ("queue", late), ("queue", gone), ("notifications", "true")]
    async with Listener(url(server), headers=viewer, params=params) as listener:
        assert listener.response is not None and listener.response.status_code == 200
        await publish(client, old, "before")
        await listener.wait_for(1, event="message.created")
        await create_queue(client, late)
        await create_queue(client, f"{late}x")  # only the very name: never seen
        for n in range(3):
            await publish(client, late, n)
        assert (await client.post(f"/api/v1/queues/{gone}/restore")).status_code == 200
        await publish(client, gone, "back")
        events = await logged(listener, 7)
    logs = by_log(events)
    assert set(logs) == {old, late, gone}
    assert [(seq, data.get("body")) for seq, data in logs[late]] == [(1, None), (2, 0), (3, 1), (4, 2)]
    assert [(seq, data.get("body")) for seq, data in logs[gone]] == [(3, None), (4, "back")]
    assert set(positions(events[-1])) == {old, late, gone, "@notifications"}
    # The single queue's stream still refuses a queue that does not exist.
    missing = await client.get(f"/api/v1/queues/{base}-nothing/stream")
    assert_error(missing, 404, "queue_not_found")


async def test_a_cursor_that_cannot_be_read_is_422_and_a_stale_one_reset_per_log(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client, unique("cur"))
    params = {"queue": queue, "notifications": "true"}
    for bad in (
        "5",
        f"{queue}",
        f"{queue}:x",
        f"{queue}:-1",
        f"{queue}:1,{queue}:2",
        "Bad:1",
        f"{queue}:1,",
        "",
    ):
        response = await client.get(PATH, params={**params, "last_event_id": bad})
        error = assert_error(response, 422, "validation_error")
        assert "query.last_event_id" in error["details"], error
        if not bad:
            continue  # a header cannot be sent empty
        response = await client.get(PATH, params=params, headers={**ADMIN, "Last-Event-ID": bad})
        assert "header.Last-Event-ID" in assert_error(response, 422, "validation_error")["details"]
    for bad_params in ({"queue": "Nope!"}, {"queue": queue, "notifications": "maybe"}, {}):
        assert_error(await client.get(PATH, params=bad_params), 422, "validation_error")
    await publish(client, queue, "one")
    resume = {**ADMIN, "Last-Event-ID": f"{queue}:999,@notifications:0"}
    async with Listener(url(server), headers=resume, params=params) as listener:
        [reset] = await listener.wait_for(1, event="stream.reset")
        await publish(client, queue, "two")
        [message] = await listener.wait_for(1, event="message.created")
    assert json.loads(reset.data) == {"reason": "cursor_ahead", "oldest_seq": 1, "log": queue}
    assert json.loads(message.data)["body"] == "two"
    assert positions(message)[queue] == 3


async def test_types_filter_every_log_of_the_stream(server: Server, client: httpx.AsyncClient) -> None:
    base = unique("typ")
    queues = [await create_queue(client, f"{base}.{n}") for n in "ab"]
    params = [("queue", f"{base}.*"), ("types", "message.created")]
    async with Listener(url(server), params=params) as listener:
        for queue in queues:
            await publish(client, queue, queue)
            response = await client.post(f"/api/v1/queues/{queue}/claim", json={"max": 1})
            assert response.json()["items"], response.text
        events = await logged(listener, 2)
    assert [(e.event, json.loads(e.data)["log"]) for e in listener.logged()] == [
        ("message.created", queues[0]),
        ("message.created", queues[1]),
    ], events


async def test_at_most_so_many_logs_a_stream(make_server: Any) -> None:
    server = make_server(stream_max_logs="2").start()
    base = unique("max")
    async with server.client() as http:
        first, second = [await create_queue(http, f"{base}.{n}") for n in "ab"]
        response = await http.get(
            PATH, params=[("queue", first), ("queue", second), ("notifications", "true")]
        )
        error = assert_error(response, 422, "too_many_logs")
        assert "POMBO_STREAM_MAX_LOGS" in error["message"], error
        assert error["details"] == {"logs": 3, "limit": 2}
        async with Listener(url(server), params=[("queue", first), ("queue", f"{base}.x*")]) as listener:
            await create_queue(http, f"{base}.x1")  # the second log: taken on
            await listener.wait_for(1)
            await create_queue(http, f"{base}.x2")  # a third: said, and the stream ends
            [limit] = await listener.wait_for(1, event="stream.limit")
            await listener.wait_for(10**6, timeout=5)  # returns once the stream has ended
            assert listener.finished
    assert json.loads(limit.data) == {"reason": "too_many_logs", "limit": 2, "log": f"{base}.x2"}
    taken = [json.loads(e.data)["log"] for e in listener.logged() if e.event != "stream.limit"]
    assert taken == [f"{base}.x1"]


async def test_a_pattern_on_one_replica_takes_on_a_queue_created_on_the_other(
    replicas: tuple[Server, Server],
) -> None:
    first, second = replicas
    base = unique("rep")
    async with first.client() as one, Listener(url(second), params={"queue": f"{base}.*"}) as listener:
        queue = await create_queue(one, f"{base}.late")
        for n in range(5):
            await publish(one, queue, n)
        logs = by_log(await logged(listener, 6))
    assert [(seq, data.get("body")) for seq, data in logs[queue]] == [
        (1, None),
        *((n + 2, n) for n in range(5)),
    ]


async def test_a_queue_named_on_one_replica_is_followed_once_the_other_creates_it(
    replicas: tuple[Server, Server],
) -> None:
    first, second = replicas
    late = unique("rep-late")
    async with first.client() as one, Listener(url(second), params={"queue": late}) as listener:
        await create_queue(one, late)
        for n in range(2):
            await publish(one, late, n)
        logs = by_log(await logged(listener, 3))
    assert [(seq, data.get("body")) for seq, data in logs[late]] == [(1, None), (2, 0), (3, 1)]
