"""`/metrics` on a real server: its figures equal what the database holds after a scripted flow,
it takes the `metrics` scope unless public, and it names a bounded number of queues."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faults.conftest as fault_suite
import httpx
import pytest
from conftest import ADMIN, Listener, Server, assert_error, auth, mint, sql, unique
from faults.services import PostgresCluster
from prometheus_client.parser import text_string_to_metric_families

from main import create_app
from metrics import OTHER, QueueLabels, Recorder, Sample
from schemas import Update
from settings import Settings

# A PostgreSQL cluster of the fault suite's own, which a test may stop: its fixtures, by name.
pg_cluster, pg_fault_url = fault_suite.pg_cluster, fault_suite.pg_fault_url

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

N, S = 12, 3  # messages published, streams following them
ACKED = 7  # the rest are nacked on their only attempt: dead


def parse(text: str) -> Samples:
    """Every sample by name and labels, through prometheus-client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


async def flow(http: httpx.AsyncClient, queue: str) -> None:
    """Publish N (some one by one, the rest in a batch), claim them all, ack some, nack the rest."""
    for i in range(4):
        assert (await http.post(f"/api/v1/queues/{queue}/messages", content=f"m{i}")).status_code == 201
    batch = {"items": [{"body": i} for i in range(4, N)]}
    assert (await http.post(f"/api/v1/queues/{queue}/messages/batch", json=batch)).status_code == 201
    claimed = (await http.post(f"/api/v1/queues/{queue}/claim", json={"max": N})).json()["items"]
    assert len(claimed) == N
    acks = [{"id": m["id"], "lease_id": m["lease_id"]} for m in claimed[:ACKED]]
    assert (await http.post(f"/api/v1/queues/{queue}/ack", json={"items": acks})).status_code == 200
    for message in claimed[ACKED:]:
        nack = await http.post(
            f"/api/v1/queues/{queue}/messages/{message['id']}/nack", json={"lease_id": message["lease_id"]}
        )
        assert nack.json()["status"] == "dead", nack.text


async def database_counts(server: Server, queue: str) -> dict[str, int]:
    [(queue_id,)] = await sql(server, "SELECT id FROM queues WHERE name = ?", queue)
    rows = await sql(
        server,
        "SELECT status, count(*), sum(attempts) FROM messages WHERE queue_id = ? GROUP BY status",
        queue_id,
    )
    by_status = {str(status): int(count) for status, count, _ in rows}
    events = await sql(
        server, "SELECT type, count(*) FROM events WHERE log = ? GROUP BY type", f"queue:{queue}"
    )
    return {
        "published": sum(by_status.values()),
        "claimed": sum(int(attempts) for _, _, attempts in rows),
        "acked": by_status.get("done", 0),
        "dead": by_status.get("dead", 0),
        **{f"event {type_}": int(count) for type_, count in events},
    }


async def test_figures_equal_the_database_after_a_flow_and_lag_counts_every_delivery(server: Server) -> None:
    queue = unique("metrics")
    async with server.client() as http:
        created = await http.post("/api/v1/queues", json={"name": queue, "max_attempts": 1})
        assert created.status_code == 201, created.text
        before = await scrape(http)
        stream = f"{server.url}/api/v1/queues/{queue}/stream"
        async with contextlib.AsyncExitStack() as streams:
            listeners = [
                await streams.enter_async_context(Listener(stream, params={"types": "message.created"}))
                for _ in range(S)
            ]
            await flow(http, queue)
            for listener in listeners:
                assert len(await listener.wait_for(N, event="message.created")) == N
            during = await scrape(http)
        after = await scrape(http)
        counts = await database_counts(server, queue)

    assert counts["published"] == N and counts["acked"] == ACKED and counts["dead"] == N - ACKED
    for transition in ("published", "claimed", "acked", "dead"):
        assert value(after, "pombo_messages_total", queue=queue, transition=transition) == counts[transition]
    for event, transition in (("message.created", "published"), ("message.claimed", "claimed")):
        assert counts[f"event {event}"] == value(
            after, "pombo_messages_total", queue=queue, transition=transition
        )
    assert value(after, "pombo_messages_total", queue=queue, transition="retried") == 0

    lag = value(after, "pombo_delivery_lag_seconds_count") - value(before, "pombo_delivery_lag_seconds_count")
    assert lag == N * S
    live = value(after, "pombo_events_delivered_total", path="live")
    assert live - value(before, "pombo_events_delivered_total", path="live") == N * S
    inf = value(after, "pombo_delivery_lag_seconds_bucket", le="+Inf")
    assert inf == value(after, "pombo_delivery_lag_seconds_count")
    assert value(after, "pombo_delivery_lag_seconds_sum") > value(before, "pombo_delivery_lag_seconds_sum")

    opened = value(during, "pombo_streams_open", kind="queue") - value(
        before, "pombo_streams_open", kind="queue"
    )
    assert opened == S
    assert value(after, "pombo_queue_messages", queue=queue, status="done") == ACKED
    assert value(after, "pombo_queue_messages", queue=queue, status="dead") == N - ACKED
    publish = {"route": "/api/v1/queues/{queue}/messages", "method": "POST", "status": "201"}
    assert total(after, "pombo_http_requests_total", **publish) >= 4
    assert value(after, "pombo_writer_group_size_count") > value(before, "pombo_writer_group_size_count")
    assert value(after, "pombo_ready") == 1 and value(after, "pombo_broker_connected") == 1
    assert value(after, "process_resident_memory_bytes") > 0


async def test_streams_open_goes_back_down_when_they_close(sqlite_server: Server) -> None:
    async with sqlite_server.client() as http:
        before = value(await scrape(http), "pombo_streams_open", kind="notifications")
        async with Listener(f"{sqlite_server.url}/api/v1/notifications/stream"):
            assert value(await scrape(http), "pombo_streams_open", kind="notifications") == before + 1
        for _ in range(50):
            if value(await scrape(http), "pombo_streams_open", kind="notifications") == before:
                return
            await asyncio.sleep(0.1)
        pytest.fail("the closed stream was still counted")


async def test_metrics_take_the_metrics_scope_or_admin(sqlite_server: Server) -> None:
    async with httpx.AsyncClient(base_url=sqlite_server.url) as http:
        assert_error(await http.get("/metrics"), 401, "unauthorized")
        others = auth(mint("reader", "subscribe:* publish:* manage:* consume:* notify"))
        assert_error(await http.get("/metrics", headers=others), 403, "forbidden")
        for scopes in ("metrics", "admin"):
            answer = await http.get("/metrics", headers=auth(mint("prometheus", scopes)))
            assert answer.status_code == 200, answer.text
            assert "pombo_http_requests_total" in answer.text


async def test_public_metrics_need_no_token_and_switched_off_there_are_none(make_server: Any) -> None:
    public = make_server(metrics_public="true").start()
    off = make_server(metrics="false").start()
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{public.url}/metrics")
        assert answer.status_code == 200 and "pombo_messages_total" in answer.text
        assert_error(await http.get(f"{off.url}/metrics", headers=ADMIN), 404, "not_found")
        published = await http.post(f"{off.url}/api/v1/queues/q/messages", content="x", headers=ADMIN)
        assert published.status_code == 201


async def test_only_the_configured_number_of_queues_is_named(make_server: Any) -> None:
    server = make_server(metrics_queues="2").start()
    queues = [unique("cap") for _ in range(5)]
    async with server.client() as http:
        for count, queue in enumerate(queues, start=1):
            for _ in range(count):
                assert (await http.post(f"/api/v1/queues/{queue}/messages", content="x")).status_code == 201
        samples = await scrape(http)
    assert published(samples) == {queues[0]: 1, queues[1]: 2, OTHER: 3 + 4 + 5}
    backlog = {dict(labels)["queue"] for (name, labels) in samples if name == "pombo_queue_messages"}
    assert backlog == {*queues[:2], OTHER}
    assert total(samples, "pombo_queue_messages", status="pending") == 15


def _updates(queue: str, count: int) -> list[Update]:
    return [
        Update(f"queue:{queue}", i, "message.created", "{}", "2026-12-03T00:00:00Z") for i in range(count)
    ]


def test_the_busiest_queues_take_the_places_and_a_close_second_does_not_swap_in() -> None:
    labels = QueueLabels(2, every=0)
    assert [labels.of("a", 5), labels.of("b", 1), labels.of("c", 6)] == ["a", "b", OTHER]
    assert labels.choose() == {"b"}  # c (6) beats b (1 x 2), not a (5 x 2)
    assert labels.named == {"a", "c"}
    assert labels.of("b", 30) == OTHER
    assert labels.choose() == {"c"}  # a and c did nothing this while: the first by name stays
    assert labels.named == {"a", "b"}
    assert labels.of("c") == OTHER


def published(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["queue"]: v
        for (name, labels), v in samples.items()
        if name == "pombo_messages_total" and ("transition", "published") in labels
    }


def test_a_queue_that_loses_its_place_stops_being_reported_and_no_counter_goes_down() -> None:
    recorder = Recorder(1, relabel_every=0)
    recorder.committed(_updates("a", 2), 1, 0.001)  # a takes the one place
    recorder.committed(_updates("b", 5), 1, 0.001)  # counted under _other
    # b did more (5 against a's 2, counted double): b takes the place, a's series ends.
    assert published(parse(recorder.render(Sample()).decode())) == {OTHER: 5}
    recorder.committed(_updates("a", 1), 1, 0.001)
    recorder.committed(_updates("b", 3), 1, 0.001)
    assert published(parse(recorder.render(Sample()).decode())) == {"b": 3, OTHER: 6}


def test_two_apps_in_one_process_keep_registries_of_their_own(tmp_path: Path) -> None:
    first, second = (create_app(Settings(data_dir=tmp_path / name)) for name in ("a", "b"))
    assert first.state.metrics.registry is not second.state.metrics.registry
    assert b"process_cpu_seconds_total" in first.state.metrics.render(Sample())


async def scrape_until(
    http: httpx.AsyncClient, ready: Callable[[Samples], bool], timeout: float = 20
) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(http)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.2)


async def test_a_redis_outage_shows_the_broker_down_failed_publishes_and_one_reconnect(
    make_server: Any, pg_url: str, own_redis: Any
) -> None:
    server = make_server(database_url=pg_url, redis_url=own_redis.url, redis_prefix=unique()).start()
    async with server.client() as http:
        assert value(await scrape(http), "pombo_broker_connected") == 1
        own_redis.stop()
        assert (await http.post(f"/api/v1/queues/{unique()}/messages", content="x")).status_code == 201
        down = await scrape_until(
            http,
            lambda s: (
                value(s, "pombo_broker_connected") == 0
                and value(s, "pombo_broker_publish_failures_total") >= 1
            ),
        )
        assert value(down, "pombo_broker_connected") == 0
        assert value(down, "pombo_broker_publish_failures_total") >= 1
        assert value(down, "pombo_ready") == 1  # degraded, still ready: streams follow the database
        own_redis.start()
        back = await scrape_until(http, lambda s: value(s, "pombo_broker_connected") == 1)
    assert value(back, "pombo_broker_connected") == 1
    assert value(back, "pombo_broker_reconnects_total") == 1


async def test_metrics_still_answer_while_the_database_is_down(
    make_server: Any, pg_cluster: PostgresCluster, pg_fault_url: str
) -> None:
    """On a PostgreSQL of the fault suite's own (its fixtures), which this test stops."""
    own_postgres = pg_cluster
    server = make_server(database_url=pg_fault_url).start()
    queue, backlog = unique(), "pombo_queue_messages"
    async with server.client() as http:
        assert (await http.post(f"/api/v1/queues/{queue}/messages", content="x")).status_code == 201
        assert value(await scrape(http), backlog, queue=queue, status="pending") == 1
        own_postgres.stop()
        assert (await http.post(f"/api/v1/queues/{queue}/messages", content="y")).status_code == 503
        began = time.monotonic()
        down = await scrape(http)  # answered, without what only the database knows
        assert time.monotonic() - began < 5
        assert value(down, "pombo_ready") == 0
        assert not [name for name, _ in down if name == backlog]
        assert total(down, "pombo_http_requests_total", status="503") >= 1
        own_postgres.start()
        back = await scrape_until(http, lambda s: value(s, backlog, queue=queue, status="pending") == 1)
    assert value(back, backlog, queue=queue, status="pending") == 1
