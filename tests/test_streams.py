"""SSE streams against a real server: latency, resume, ordering, bounds, lifetime."""

from __future__ import annotations

import asyncio
import json
import re
import resource
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ADMIN, Listener, Server, assert_error, auth, mint, sql, unique


def stream_url(server: Server, queue: str) -> str:
    return f"{server.url}/api/v1/queues/{queue}/stream"


async def create_queue(http: httpx.AsyncClient, name: str | None = None) -> str:
    name = name or unique()
    response = await http.post("/api/v1/queues", json={"name": name})
    assert response.status_code == 201, response.text
    return name


async def publish_many(http: httpx.AsyncClient, queue: str, bodies: list[Any]) -> None:
    for body in bodies:
        response = await http.post(f"/api/v1/queues/{queue}/messages", json={"body": body})
        assert response.status_code == 201, response.text


async def test_subscriber_sees_a_publish_within_100ms(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    async with Listener(stream_url(server, queue)) as listener:
        lags = []
        for n in range(5):
            sent = time.monotonic()
            await publish_many(client, queue, [{"n": n}])
            await listener.wait_for(n + 1, event="message.created")
            arrived, event = listener.events[-1]
            assert json.loads(event.data)["body"] == {"n": n}
            lags.append(arrived - sent)
    assert max(lags) < 0.1, lags


async def test_stream_headers_and_retry(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    async with client.stream("GET", f"/api/v1/queues/{queue}/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in response.headers
        first = await anext(response.aiter_text())
        assert first.startswith("retry: 3000")


async def resume_after_gap(server: Server, http: httpx.AsyncClient, use_header: bool) -> None:
    queue = await create_queue(http)
    async with Listener(stream_url(server, queue), params={"last_event_id": 0}) as listener:
        [created] = await listener.wait_for(1)
        assert created.event == "queue.created"
    cursor = created.id
    await publish_many(http, queue, [{"n": n} for n in range(100)])
    headers, params = (
        ({**ADMIN, "Last-Event-ID": cursor}, None) if use_header else (ADMIN, {"last_event_id": cursor})
    )
    async with Listener(stream_url(server, queue), headers=headers, params=params) as listener:
        events = await listener.wait_for(100)
        await asyncio.sleep(0.2)  # anything extra would arrive now
        events = listener.logged()
    assert [json.loads(e.data)["body"]["n"] for e in events] == list(range(100))
    assert [int(e.id) for e in events] == list(range(int(cursor) + 1, int(cursor) + 101))


async def test_resume_with_last_event_id_header(server: Server, client: httpx.AsyncClient) -> None:
    await resume_after_gap(server, client, use_header=True)


async def test_resume_with_last_event_id_query(server: Server, client: httpx.AsyncClient) -> None:
    await resume_after_gap(server, client, use_header=False)


async def test_a_live_stream_opened_beside_another_starts_at_the_head(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client)
    async with Listener(stream_url(server, queue)) as first:
        await publish_many(client, queue, [0, 1, 2])
        await first.wait_for(3)
        async with Listener(stream_url(server, queue)) as second:
            await publish_many(client, queue, [3])
            await second.wait_for(1)
            await first.wait_for(4)
            await asyncio.sleep(0.2)  # anything older or doubled would arrive now
    assert [int(e.id) for e in first.logged()] == [2, 3, 4, 5]
    assert [int(e.id) for e in second.logged()] == [5]


async def test_streams_opening_during_publishes_miss_nothing_sent_after_they_opened(server: Server) -> None:
    """A commit between a stream's subscription and its first read of the head is still news to it."""
    async with server.client() as http:
        queue = await create_queue(http)
        sent: list[float] = []

        async def publisher() -> None:
            async with server.client() as own:
                for n in range(150):
                    sent.append(time.monotonic())
                    await publish_many(own, queue, [n])

        async def listener() -> tuple[float, Listener]:
            crowd_member = Listener(stream_url(server, queue))
            await crowd_member.__aenter__()
            return time.monotonic(), crowd_member

        publishing = asyncio.create_task(publisher())
        crowd = await asyncio.gather(*(listener() for _ in range(100)))
        await publishing
        try:
            for opened, member in crowd:
                due = [n for n, at in enumerate(sent) if at > opened]
                events = await member.wait_for(len(due))
                await asyncio.sleep(0.05)
                ids = [int(e.id) for e in member.logged()]
                assert ids == list(range(ids[0], ids[0] + len(ids))) if ids else not due
                assert set(due) <= {json.loads(e.data)["body"] for e in member.logged()}, (opened, events)
        finally:
            await asyncio.gather(*(member.__aexit__() for _, member in crowd))


async def test_a_stream_answers_with_the_request_id(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    headers = {"X-Request-ID": "stream-42"}
    async with client.stream("GET", f"/api/v1/queues/{queue}/stream", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "stream-42"
        # The access line is written when the stream has opened, not when it ends.
        deadline = time.monotonic() + 5
        while f"GET /api/v1/queues/{queue}/stream 200" not in server.log():
            assert time.monotonic() < deadline, "no access line for the open stream"
            await asyncio.sleep(0.02)


async def test_header_cursor_wins_over_query(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    await publish_many(client, queue, [1, 2, 3])
    headers = {**ADMIN, "Last-Event-ID": "3"}
    async with Listener(stream_url(server, queue), headers=headers, params={"last_event_id": 0}) as listener:
        events = await listener.wait_for(1)
    assert [e.id for e in events] == ["4"]


async def concurrent_publishers(server: Server) -> None:
    """4 publishers x 250 while a subscriber streams the whole log: one contiguous run."""
    async with server.client() as http:
        queue = await create_queue(http)
        async with Listener(stream_url(server, queue), params={"last_event_id": 0}) as listener:

            async def publisher(p: int) -> None:
                async with server.client() as own:
                    await publish_many(own, queue, [{"p": p, "n": n} for n in range(250)])

            await asyncio.gather(*(publisher(p) for p in range(4)))
            await listener.wait_for(1001, timeout=30)
            await asyncio.sleep(0.2)
        events = listener.logged()
    assert [int(e.id) for e in events] == list(range(1, 1002))
    bodies = [json.loads(e.data)["body"] for e in events if e.event == "message.created"]
    assert len(bodies) == 1000
    for p in range(4):
        assert [b["n"] for b in bodies if b["p"] == p] == list(range(250))


async def test_concurrent_publishers_keep_one_contiguous_run(server: Server) -> None:
    await concurrent_publishers(server)


async def test_types_filter(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    params = {"last_event_id": 0, "types": "message.created,message.deleted"}
    async with Listener(stream_url(server, queue), params=params) as listener:
        await publish_many(client, queue, ["a"])
        [created] = await listener.wait_for(1)
        message_id = json.loads(created.data)["id"]
        assert (await client.delete(f"/api/v1/queues/{queue}/messages/{message_id}")).status_code == 200
        events = await listener.wait_for(2)
    assert [e.event for e in events] == ["message.created", "message.deleted"]
    assert json.loads(events[1].data)["deleted_at"] is not None


async def test_cursor_above_head_is_reset(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    async with Listener(stream_url(server, queue), params={"last_event_id": 99}) as listener:
        [reset] = await listener.wait_for(1)
        assert reset.event == "stream.reset"
        assert json.loads(reset.data) == {"reason": "cursor_ahead", "oldest_seq": 1}
        await publish_many(client, queue, ["after reset"])
        events = await listener.wait_for(2)
    assert events[1].id == "2"


async def test_cursor_older_than_retention_is_reset(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    await publish_many(client, queue, list(range(5)))
    await sql(server, "DELETE FROM events WHERE log = ? AND seq <= 3", f"queue:{queue}")  # as retention would
    async with Listener(stream_url(server, queue), params={"last_event_id": 1}) as listener:
        events = await listener.wait_for(4)
    assert events[0].event == "stream.reset"
    assert json.loads(events[0].data) == {"reason": "cursor_expired", "oldest_seq": 4}
    assert [e.id for e in events[1:]] == ["4", "5", "6"]


async def test_closed_client_is_released_at_once(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    async with Listener(stream_url(server, queue)):
        assert (await client.get("/healthz")).json()["streams"] >= 1
        before = (await client.get("/healthz")).json()["streams"]
    deadline = time.monotonic() + 1
    while (await client.get("/healthz")).json()["streams"] >= before:
        assert time.monotonic() < deadline, "the closed stream is still subscribed"
        await asyncio.sleep(0.02)


async def test_a_deleted_queue_streams_again_only_once_restored(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client)
    async with Listener(stream_url(server, queue)) as first, Listener(stream_url(server, queue)):
        assert (await client.delete(f"/api/v1/queues/{queue}")).status_code == 200
        await first.wait_for(1, event="queue.deleted")
        assert_error(await client.get(f"/api/v1/queues/{queue}/stream"), 404, "queue_not_found")
    assert (await client.post(f"/api/v1/queues/{queue}/restore")).status_code == 200
    async with Listener(stream_url(server, queue)) as again:
        await publish_many(client, queue, [1])
        [created] = await again.wait_for(1, event="message.created")
    assert json.loads(created.data)["body"] == 1


@pytest.mark.parametrize("cursor", ["-1", "abc", "1.5", "²"])
async def test_a_bad_resume_cursor_is_422_and_opens_no_stream(
    server: Server, client: httpx.AsyncClient, cursor: str
) -> None:
    queue = await create_queue(client)
    before = (await client.get("/healthz")).json()["streams"]
    for url in (f"/api/v1/queues/{queue}/stream", "/api/v1/notifications/stream"):
        response = await client.get(url, params={"last_event_id": cursor})
        assert_error(response, 422, "validation_error")
        assert "query.last_event_id" in response.json()["error"]["details"]
    assert (await client.get("/healthz")).json()["streams"] == before


async def test_a_last_event_id_that_is_no_number_is_422_not_live_from_now(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client)
    url = f"/api/v1/queues/{queue}/stream"
    headers = [(b"last-event-id", b"\xb2")]  # "²" in Latin-1, as servers read headers: a digit, not to int()
    response = await client.get(url, headers=headers, params={"last_event_id": 0})
    assert assert_error(response, 422, "validation_error")["details"].keys() == {"header.Last-Event-ID"}


async def test_stream_needs_a_token_and_the_subscribe_scope(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client)
    url = f"/api/v1/queues/{queue}/stream"
    assert (await client.get(url, headers={"Authorization": ""})).status_code == 401
    denied = await client.get(url, headers=auth(mint("bob", f"publish:{queue}")))
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "forbidden"


async def test_stream_ends_when_its_token_expires(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    token = mint("short", f"subscribe:{queue}", ttl=2)
    started = time.monotonic()
    async with Listener(stream_url(server, queue), params={"access_token": token}, headers={}) as listener:
        events = await listener.wait_for(1, timeout=10, event="stream.expired")
        assert (events and listener.finished) or await _finishes(listener)
    assert 0.5 < time.monotonic() - started < 8


async def _finishes(listener: Listener) -> bool:
    for _ in range(50):
        if listener.finished:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_small_buffer_and_short_lifetime_lose_nothing(make_server: Any) -> None:
    server = make_server(subscriber_buffer="5", stream_lifetime_seconds="1").start()
    async with server.client() as http:
        queue = await create_queue(http)
        seen: list[int] = []
        cursor = "0"
        items = [{"body": n} for n in range(300)]
        publishing = asyncio.create_task(
            http.post(f"/api/v1/queues/{queue}/messages/batch", json={"items": items})
        )
        deadline = time.monotonic() + 20
        while len(seen) < 301 and time.monotonic() < deadline:
            # Each stream lives one second; the client resumes from its last id, like EventSource.
            async with Listener(
                stream_url(server, queue), headers={**ADMIN, "Last-Event-ID": cursor}
            ) as listener:
                await listener.wait_for(10_000, timeout=3)
            seen += [int(e.id) for e in listener.logged()]
            cursor = str(seen[-1]) if seen else cursor
        assert (await publishing).status_code == 201
    assert seen == list(range(1, 302))


async def test_heartbeats_keep_an_idle_stream_alive(make_server: Any) -> None:
    server = make_server(heartbeat_seconds="0.3").start()
    async with server.client() as http:
        queue = await create_queue(http)
        comments = 0
        started = time.monotonic()
        async with http.stream("GET", f"/api/v1/queues/{queue}/stream") as response:
            async for line in response.aiter_lines():
                comments += line.startswith(":")
                if comments == 2:
                    break
    assert 0.5 < time.monotonic() - started < 3


async def test_shutdown_ends_open_streams_and_the_process(make_server: Any) -> None:
    server = make_server().start()
    async with server.client() as http:
        queue = await create_queue(http)
        async with Listener(stream_url(server, queue), params={"last_event_id": 0}) as listener:
            await listener.wait_for(1)
            started = time.monotonic()
            assert await asyncio.to_thread(server.stop) is not None
            assert time.monotonic() - started < 8
            assert await _finishes(listener)


async def test_a_client_that_stops_reading_is_cut(make_server: Any) -> None:
    server = make_server(stream_send_timeout_seconds="1", sweep_seconds="0.2").start()
    async with server.client() as http:
        queue = await create_queue(http)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = f"GET /api/v1/queues/{queue}/stream HTTP/1.1\r\nHost: pombo\r\n{auth_line()}\r\n\r\n"
        writer.write(request.encode())
        await reader.readuntil(b"\r\n\r\n")  # connected; from now on this client reads nothing
        big = [{"body": "x" * 200_000} for _ in range(40)]
        for _ in range(3):  # about 24 MB of frames: more than the sockets can buffer
            assert (
                await http.post(f"/api/v1/queues/{queue}/messages/batch", json={"items": big})
            ).status_code == 201
        deadline = time.monotonic() + 10
        while (await http.get("/healthz")).json()["streams"] > 0:
            assert time.monotonic() < deadline, "a stalled client still holds its stream"
            await asyncio.sleep(0.2)
        writer.close()
    assert "cut a stream whose client stopped reading" in server.log()
    assert "without completing response" not in server.log()  # uvicorn's ERROR: the cut is by design


def auth_line() -> str:
    return "Authorization: " + ADMIN["Authorization"]


async def test_a_subject_holds_so_many_streams_and_a_closed_one_frees_its_place(make_server: Any) -> None:
    server = make_server(streams_per_subject="2").start()
    async with server.client() as http:
        queue = unique()
        assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
        url = f"{server.url}/api/v1/queues/{queue}/stream"
        viewer, other = auth(mint("viewer", "subscribe:*")), auth(mint("other", "subscribe:*"))
        # httpx-sse adds `Accept: text/event-stream` to the dict it is given: each gets its own.
        notifications = f"{server.url}/api/v1/notifications/stream"
        async with Listener(url, {**viewer}), Listener(notifications, {**viewer}):
            refused = await http.get(url, headers=viewer)
            assert assert_error(refused, 429, "rate_limited")["details"] == {"limit": 2}
            async with Listener(url, other), Listener(url, ADMIN), Listener(url, ADMIN), Listener(url, ADMIN):
                pass  # another subject has its own places, and admins have no cap
        deadline = time.monotonic() + 5
        while (await http.get("/healthz")).json()["streams"]:
            assert time.monotonic() < deadline, "closed streams were never released"
            await asyncio.sleep(0.05)
        async with Listener(url, viewer), Listener(url, viewer):  # both places were given back
            pass


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class RawStream(asyncio.Protocol):
    """A lean SSE client for a crowd: keeps what arrives, done once the frame `end` has come."""

    def __init__(self, end: bytes) -> None:
        self.end, self.received = end, bytearray()
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        seen = len(self.received)
        self.received += data
        if self.end in self.received[max(seen - len(self.end), 0) :] and not self.done.done():
            self.done.set_result(bytes(self.received))

    def connection_lost(self, error: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(AssertionError(f"the stream ended early ({error})"))


async def resume_raw(port: int, path: str, cursor: int, last: int) -> bytes:
    """Resume a stream from `cursor`; everything it sent up to the frame with id `last`."""
    loop = asyncio.get_running_loop()
    transport, stream = await loop.create_connection(
        lambda: RawStream(f"id: {last}\n".encode()), "127.0.0.1", port
    )
    request = f"GET {path} HTTP/1.1\r\nHost: pombo\r\n{auth_line()}\r\nLast-Event-ID: {cursor}\r\n\r\n"
    transport.write(request.encode())
    try:
        return await stream.done
    finally:
        transport.close()


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_a_reconnect_storm_shares_its_catch_up_and_gives_the_memory_back(
    make_server: Any, request: pytest.FixtureRequest, database: str
) -> None:
    """1,000 streams resume at once from one cursor behind 500 events: one copy, not a thousand."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    settings = {}
    if database == "postgres":
        redis = request.getfixturevalue("redis_url")
        settings = {
            "database_url": request.getfixturevalue("pg_url"),
            "redis_url": redis,
            "redis_prefix": unique(),
        }
    server = make_server(**settings).start()
    assert server.process is not None
    pid = server.process.pid
    async with server.client() as http:
        queue = await create_queue(http)  # its queue.created is the cursor every stream resumes from
        items = [{"body": {"n": n, "text": "x" * 200}} for n in range(500)]
        assert (
            await http.post(f"/api/v1/queues/{queue}/messages/batch", json={"items": items})
        ).status_code == 201
        await asyncio.sleep(1)
        before = rss_kib(pid)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from now on is the storm's peak
        started = time.monotonic()
        path = f"/api/v1/queues/{queue}/stream"
        streams = await asyncio.gather(*(resume_raw(server.port, path, 1, 501) for _ in range(1000)))
        took = time.monotonic() - started
        peak = rss_kib(pid, "VmHWM") - before
        await asyncio.sleep(3)  # let the server settle with no stream open
        after = rss_kib(pid) - before
    for received in streams:
        ids = [int(n) for n in re.findall(rb"^id: (\d+)$", received, re.M)]
        assert ids == list(range(2, 502))
    print(f"storm: {took:.2f} s, peak +{peak / 1024:.0f} MiB, after +{after / 1024:.0f} MiB")
    assert took < 5 and peak < 100 * 1024 and after < 40 * 1024, (took, peak, after)
