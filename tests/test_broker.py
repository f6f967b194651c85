"""Brokers: one contract, two implementations; replicas on PostgreSQL + Redis; Redis outages."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import PG_ADMIN_URL, Listener, RedisProcess, Server, unique
from loguru import logger
from redis.asyncio import Redis
from tortoise import Tortoise

from broker import GONE, TICK_SECONDS, WAKE_SLICE, Broker, MemoryBroker, RedisBroker, Subscriber, redis_names
from event_log import Update


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    if request.param == "memory":
        instance: Broker = MemoryBroker()
    else:
        instance = RedisBroker(request.getfixturevalue("redis_url"), f"test-{secrets.token_hex(4)}")
    await instance.start()
    if isinstance(instance, RedisBroker):
        await asyncio.wait_for(instance.connected.wait(), 5)
    yield instance
    await instance.close()


def update(log: str, seq: int) -> Update:
    return Update(log, seq, "message.created", json.dumps({"n": seq}), "2026-01-01T00:00:00Z")


async def test_a_subscriber_gets_its_logs_in_order_and_nothing_else(broker: Broker) -> None:
    subscriber = broker.subscribe(["queue:a"], capacity=10)
    await broker.publish([update("queue:a", 1), update("queue:b", 1), update("queue:a", 2)])
    await asyncio.wait_for(subscriber.wakeup.wait(), 1)
    assert [u.seq for u in subscriber.inbox] == [1, 2]
    assert broker.subscriber_count == 1
    broker.unsubscribe(subscriber)
    assert broker.subscriber_count == 0


async def test_a_crowd_gets_every_update_in_order_though_woken_a_slice_at_a_time(broker: Broker) -> None:
    crowd = [broker.subscribe(["queue:a"], capacity=50) for _ in range(WAKE_SLICE * 3 + 7)]
    for seq in range(1, 6):  # each publish lands while the last one's crowd is still being woken
        await broker.publish([update("queue:a", seq)])
    deadline = time.monotonic() + 2
    while any(len(s.inbox) < 5 for s in crowd):
        assert time.monotonic() < deadline, "some subscribers were never offered everything"
        await asyncio.sleep(0.01)
    assert all([u.seq for u in s.inbox] == [1, 2, 3, 4, 5] for s in crowd)
    for subscriber in crowd:
        broker.unsubscribe(subscriber)


async def test_an_overflowing_subscriber_is_told_to_catch_up(broker: Broker) -> None:
    subscriber = broker.subscribe(["queue:a"], capacity=3)
    await broker.publish([update("queue:a", seq) for seq in range(1, 6)])
    assert subscriber.must_catch_up
    assert len(subscriber.inbox) <= 3
    broker.unsubscribe(subscriber)


async def test_the_head_of_a_subscribed_log_is_known_from_what_it_delivers(broker: Broker) -> None:
    subscriber = broker.subscribe(["queue:a"], capacity=10)
    assert broker.known_head("queue:a") is None
    broker.learn_head("queue:a", 3)
    await broker.publish([update("queue:a", 4), update("queue:a", 5), update("queue:b", 9)])
    broker.learn_head("queue:a", 4)  # a read that raced a delivery never moves the head back
    assert broker.known_head("queue:a") == 5
    broker.learn_head("queue:b", 9)
    assert broker.known_head("queue:b") is None  # nobody here subscribes to it
    broker.unsubscribe(subscriber)
    assert broker.known_head("queue:a") is None


async def test_a_broker_that_may_have_missed_something_forgets_what_it_knew() -> None:
    broker = MemoryBroker()
    subscriber = broker.subscribe(["queue:a"], capacity=10)
    await broker.publish([update("queue:a", 1)])
    broker.learn_live("queue:a", broker.live_mark())
    broker.catch_up_all()
    assert broker.known_head("queue:a") is None and not broker.known_live("queue:a")
    assert subscriber.must_catch_up
    broker.unsubscribe(subscriber)
    await broker.close()


async def test_a_live_log_is_remembered_until_its_queue_is_deleted(broker: Broker) -> None:
    broker.learn_live("queue:a", broker.live_mark())
    assert broker.known_live("queue:a") and not broker.known_live("queue:b")
    await broker.publish([update("queue:a", 7), Update("queue:a", 8, GONE, "{}", "2026-01-01T00:00:00Z")])
    assert not broker.known_live("queue:a")
    mark = broker.live_mark()  # a lookup starts, then a deletion is delivered before it answers
    await broker.publish([Update("queue:b", 1, GONE, "{}", "2026-01-01T00:00:00Z")])
    broker.learn_live("queue:a", mark)
    assert not broker.known_live("queue:a")


def created(log: str) -> Update:
    return Update(log, 1, "queue.created", "{}", "2026-01-01T00:00:00Z")


async def test_a_subscriber_takes_on_the_new_queues_it_accepts_from_their_first_event(broker: Broker) -> None:
    subscriber = broker.subscribe([], capacity=10, joins=lambda log: log.startswith("queue:builds."))
    await broker.publish([created("queue:builds.web"), created("queue:other"), update("queue:builds.web", 2)])
    await asyncio.wait_for(subscriber.wakeup.wait(), 1)
    assert [(u.log, u.seq) for u in subscriber.inbox] == [("queue:builds.web", 1), ("queue:builds.web", 2)]
    assert subscriber.joined == [("queue:builds.web", 0)]
    broker.close_all()  # one that followed nothing at first is still among those closed
    assert subscriber.closed
    broker.unsubscribe(subscriber)
    assert broker.subscriber_count == 0


@asynccontextmanager
async def two_processes(
    redis_url: str, prefix: str | None = None
) -> AsyncIterator[tuple[RedisBroker, RedisBroker]]:
    """Two brokers under one prefix, as two replicas' processes would have, both connected."""
    prefix = prefix or f"test-{secrets.token_hex(4)}"
    pair = RedisBroker(redis_url, prefix), RedisBroker(redis_url, prefix)
    for instance in pair:
        await instance.start()
        await asyncio.wait_for(instance.connected.wait(), 5)
    try:
        yield pair
    finally:
        for instance in pair:
            await instance.close()


async def test_a_queue_created_on_one_replica_is_taken_on_by_a_subscriber_on_the_other(
    redis_url: str,
) -> None:
    async with two_processes(redis_url) as (creator, streamer):
        subscriber = streamer.subscribe([], capacity=10, joins=lambda log: log == "queue:new")
        await creator.publish([created("queue:new"), update("queue:new", 2)])
        deadline = time.monotonic() + 2
        while len(subscriber.inbox) < 2:
            assert time.monotonic() < deadline, "the other replica's new queue never arrived"
            await asyncio.sleep(0.01)
        assert [u.seq for u in subscriber.inbox] == [1, 2] and subscriber.joined == [("queue:new", 0)]


async def test_a_deletion_on_one_replica_is_forgotten_on_the_other(redis_url: str) -> None:
    async with two_processes(redis_url) as (deleter, streamer):
        streamer.learn_live("queue:x", streamer.live_mark())
        await deleter.publish([Update("queue:x", 3, GONE, "{}", "2026-01-01T00:00:00Z")])
        deadline = time.monotonic() + 2
        while streamer.known_live("queue:x"):
            assert time.monotonic() < deadline, "the deletion did not reach the other replica"
            await asyncio.sleep(0.01)


async def test_a_replica_cut_off_from_redis_knows_no_head(own_redis: RedisProcess) -> None:
    broker = RedisBroker(own_redis.url, f"test-{secrets.token_hex(4)}")
    await broker.start()
    try:
        await asyncio.wait_for(broker.connected.wait(), 5)
        subscriber = broker.subscribe(["queue:a"], capacity=10)
        await broker.publish([update("queue:a", 1)])
        broker.learn_live("queue:a", broker.live_mark())
        assert broker.known_head("queue:a") == 1 and broker.known_live("queue:a")
        own_redis.stop()
        deadline = time.monotonic() + 10
        while broker.connected.is_set():
            assert time.monotonic() < deadline, "the broker did not notice Redis went away"
            await asyncio.sleep(0.05)
        assert broker.known_head("queue:a") is None and not broker.known_live("queue:a")
        broker.unsubscribe(subscriber)
    finally:
        await broker.close()


async def test_the_clock_wakes_a_waiting_subscriber_at_its_time(broker: Broker) -> None:
    subscriber = broker.subscribe(["queue:a"], capacity=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(subscriber.wait(started + 0.3), 2)
    assert 0.3 <= loop.time() - started < 0.3 + TICK_SECONDS + 0.2
    await broker.publish([update("queue:a", 1)])
    await asyncio.wait_for(subscriber.wait(loop.time() + 60), 1)  # an update wakes it at once
    assert [u.seq for u in subscriber.take()] == [1]
    assert subscriber.inbox == []
    broker.unsubscribe(subscriber)


async def test_redis_carries_batches_between_processes(redis_url: str) -> None:
    async with two_processes(redis_url) as (sender, receiver):
        subscriber = receiver.subscribe(["queue:x"], capacity=10)
        await sender.publish([update("queue:x", 1), update("queue:x", 2)])
        await asyncio.wait_for(subscriber.wakeup.wait(), 2)
        await asyncio.sleep(0.05)
        assert [u.seq for u in subscriber.inbox] == [1, 2]


@pytest.mark.parametrize("stray", [b"not json", b'{"o": "someone"}', b"[1, 2]"])
async def test_a_stray_message_on_the_channel_does_not_end_the_subscription(
    redis_url: str, stray: bytes
) -> None:
    prefix = f"test-{secrets.token_hex(4)}"
    async with two_processes(redis_url, prefix) as (sender, receiver):
        subscriber = receiver.subscribe(["queue:x"], capacity=10)
        stranger = Redis.from_url(redis_url)
        try:
            await stranger.publish(redis_names(prefix)["events"], stray)
        finally:
            await stranger.aclose()
        await sender.publish([update("queue:x", 1)])
        deadline = time.monotonic() + 2
        while not subscriber.inbox:  # the subscription still delivers what comes after it
            assert time.monotonic() < deadline, "the subscription ended"
            await asyncio.sleep(0.01)
        assert [u.seq for u in subscriber.inbox] == [1]
        assert subscriber.must_catch_up  # and streams re-read what the stray may have carried


async def replicas(make_server: Any, pg_url: str, redis_url: str) -> tuple[Server, Server]:
    prefix = f"test-{secrets.token_hex(4)}"
    first = make_server(database_url=pg_url, redis_url=redis_url, redis_prefix=prefix).start()
    second = make_server(database_url=pg_url, redis_url=redis_url, redis_prefix=prefix).start()
    return first, second


async def test_publish_on_one_replica_reaches_a_stream_on_the_other_within_100ms(
    make_server: Any, pg_url: str, redis_url: str
) -> None:
    publisher, streamer = await replicas(make_server, pg_url, redis_url)
    async with publisher.client() as http:
        queue = unique()
        assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
        async with Listener(f"{streamer.url}/api/v1/queues/{queue}/stream") as listener:
            await asyncio.sleep(0.1)  # the other replica's subscription is ready
            lags = []
            for n in range(5):
                sent = time.monotonic()
                response = await http.post(f"/api/v1/queues/{queue}/messages", json={"body": n})
                assert response.status_code == 201
                await listener.wait_for(n + 1, timeout=5)
                lags.append(listener.events[-1][0] - sent)
    assert [json.loads(e.data)["body"] for e in listener.logged()] == list(range(5))
    assert max(lags) < 0.1, lags


async def test_a_live_stream_on_a_replica_starts_at_the_head_the_other_replica_wrote(
    make_server: Any, pg_url: str, redis_url: str
) -> None:
    publisher, streamer = await replicas(make_server, pg_url, redis_url)
    async with publisher.client() as http:
        queue = unique()
        assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
        url = f"{streamer.url}/api/v1/queues/{queue}/stream"
        async with Listener(url) as first:
            await asyncio.sleep(0.1)  # the other replica's subscription is ready
            await publish_range(http, queue, range(3))
            await first.wait_for(3)  # the streamer learnt the head (4) from Redis
            async with Listener(url) as second:
                await publish_range(http, queue, range(3, 4))
                await second.wait_for(1)
                await first.wait_for(4)
                await asyncio.sleep(0.2)  # anything older or doubled would arrive now
        assert [int(e.id) for e in first.logged()] == [2, 3, 4, 5]
        assert [int(e.id) for e in second.logged()] == [5]


async def test_a_redis_outage_loses_nothing_and_doubles_nothing(
    make_server: Any, pg_url: str, own_redis: RedisProcess
) -> None:
    publisher, streamer = await replicas(make_server, pg_url, own_redis.url)
    async with publisher.client() as http:
        queue = unique()
        assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
        params = {"last_event_id": 0}
        async with Listener(f"{streamer.url}/api/v1/queues/{queue}/stream", params=params) as listener:
            await publish_range(http, queue, range(0, 20))
            await listener.wait_for(21)
            own_redis.stop()
            await publish_range(http, queue, range(20, 60))  # Redis is down: publishes still succeed
            await asyncio.sleep(2)
            own_redis.start()
            await listener.wait_for(61, timeout=15)
            await publish_range(http, queue, range(60, 80))
            await listener.wait_for(81, timeout=10)
            await asyncio.sleep(0.3)
        events = listener.logged()
    assert [int(e.id) for e in events] == list(range(1, 82))
    bodies = [json.loads(e.data)["body"] for e in events if e.event == "message.created"]
    assert bodies == list(range(80))


async def publish_range(http: httpx.AsyncClient, queue: str, numbers: range) -> None:
    for n in numbers:
        response = await http.post(f"/api/v1/queues/{queue}/messages", json={"body": n})
        assert response.status_code == 201, response.text


async def test_a_second_process_without_redis_on_one_postgres_is_refused(
    make_server: Any, pg_url: str
) -> None:
    first = make_server(database_url=pg_url).start()
    second = make_server(database_url=pg_url)
    with pytest.raises(RuntimeError, match="set POMBO_REDIS_URL on every replica"):
        second.start()
    async with first.client() as http:
        assert (await http.get("/readyz")).status_code == 200


async def wait_for_log_line(server: Server, text: str, count: int = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while server.log().count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in the log of {server.url}"
        await asyncio.sleep(0.05)


async def claim_lag(publisher: httpx.AsyncClient, claimer: httpx.AsyncClient, queue: str) -> float:
    """Seconds from a publish on one replica to the end of a waiting claim on the other."""
    claiming = asyncio.create_task(claimer.post(f"/api/v1/queues/{queue}/claim", json={"wait": 5}))
    await asyncio.sleep(0.3)  # the claim found nothing and waits; a 2 s re-check would come 1.7 s late
    assert not claiming.done()
    sent = time.monotonic()
    await publish_range(publisher, queue, range(1))
    response = await claiming
    assert response.status_code == 200 and len(response.json()["items"]) == 1, response.text
    return time.monotonic() - sent


async def test_a_replica_cut_off_from_redis_feeds_streams_and_claims_from_the_database(
    make_server: Any, pg_url: str, own_redis: RedisProcess
) -> None:
    publisher, streamer = await replicas(make_server, pg_url, own_redis.url)
    async with publisher.client() as http, streamer.client() as on_streamer:
        queue, work = unique(), unique()
        for name in (queue, work):
            assert (await http.post("/api/v1/queues", json={"name": name})).status_code == 201
        url = f"{streamer.url}/api/v1/queues/{queue}/stream"
        async with Listener(url, params={"last_event_id": 0}) as listener:
            await publish_range(http, queue, range(0, 5))
            await listener.wait_for(6)
            own_redis.stop()
            await wait_for_log_line(streamer, "redis subscription lost")
            outage_ends = time.monotonic() + 10
            sent: dict[int, float] = {}
            claim_lags = []
            n = 5
            while time.monotonic() < outage_ends:  # every publish goes to the publisher
                sent[n] = time.monotonic()
                await publish_range(http, queue, range(n, n + 1))
                n += 1
                if n % 10 == 0:
                    claim_lags.append(await claim_lag(http, on_streamer, work))
                await asyncio.sleep(0.25)
            await listener.wait_for(n + 1, timeout=3)
            own_redis.start()
            await wait_for_log_line(streamer, "redis subscription ready", count=2)
            await publish_range(http, queue, range(n, n + 10))
            await listener.wait_for(n + 11, timeout=5)
            await asyncio.sleep(0.5)  # anything doubled would arrive now
        created = [(at, e) for at, e in listener.events if e.event == "message.created"]
        arrived = {json.loads(e.data)["body"]: at for at, e in created}
        lags = [arrived[body] - at for body, at in sent.items() if body in arrived]
        events = listener.logged()
    assert [int(e.id) for e in events] == list(range(1, n + 12))
    bodies = [json.loads(e.data)["body"] for e in events if e.event == "message.created"]
    assert bodies == list(range(n + 10))
    assert len(lags) == len(sent) >= 30 and max(lags) < 2.0, sorted(lags)[-5:]
    assert len(claim_lags) >= 3 and max(claim_lags) < 1.5, claim_lags
    print(f"outage: stream lag max {max(lags):.2f} s, claim lag max {max(claim_lags):.2f} s")
    for server in (publisher, streamer):  # the outage is one warning and one line, not one a retry
        log = server.log()
        assert log.count("redis subscription lost") == 1 and "redis subscription ready again after" in log
        assert log.count("redis publish failed") <= 1


async def append_event(db: asyncpg.Connection, log: str, seq: int) -> None:
    """As another replica's commit would: the event and its log's head."""
    await db.execute(
        "INSERT INTO events (log, seq, type, data, at) VALUES ($1, $2, 'message.created', '{}', now())",
        log,
        seq,
    )
    await db.execute("UPDATE event_logs SET last_seq = $2 WHERE name = $1", log, seq)


async def inbox_reaches(subscriber: Subscriber, seq: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(u.seq == seq for u in subscriber.inbox):
        assert time.monotonic() < deadline, f"{seq} never came: {[u.seq for u in subscriber.inbox]}"
        await asyncio.sleep(0.02)


async def test_the_outage_poller_outlives_a_database_outage_and_says_so_once(
    pg_url: str, own_redis: RedisProcess
) -> None:
    await Tortoise.init(db_url=pg_url, modules={"pombo": ["models"]})
    await Tortoise.generate_schemas()
    broker = RedisBroker(own_redis.url, f"test-{secrets.token_hex(4)}")
    db, admin = await asyncpg.connect(pg_url), await asyncpg.connect(PG_ADMIN_URL)
    warnings: list[str] = []
    sink = logger.add(
        warnings.append, level="WARNING", filter=lambda r: "cannot read the logs" in r["message"]
    )
    name = pg_url.rsplit("/", 1)[1]
    try:
        await db.execute("INSERT INTO event_logs (name, last_seq) VALUES ('queue:a', 0), ('queue:quiet', 0)")
        await broker.start()
        await asyncio.wait_for(broker.connected.wait(), 5)
        subscriber = broker.subscribe(["queue:a"], capacity=10)
        quiet = broker.subscribe(["queue:quiet"], capacity=10)
        await append_event(db, "queue:a", 1)
        await broker.publish([update("queue:a", 1)])  # delivered here: the poller knows where it is
        own_redis.stop()
        await append_event(db, "queue:a", 2)
        await inbox_reaches(subscriber, 2, timeout=2)
        assert quiet.must_catch_up and not subscriber.must_catch_up  # nothing was known of its log
        quiet.must_catch_up = False
        await asyncio.sleep(1)
        assert not quiet.must_catch_up  # told once, not every round
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        )
        await asyncio.sleep(2.5)  # five rounds against a database that is gone
        assert len(warnings) == 1, warnings
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        db = await asyncpg.connect(pg_url)
        await append_event(db, "queue:a", 3)
        await inbox_reaches(subscriber, 3, timeout=3)
        assert len(warnings) == 1, warnings
    finally:
        logger.remove(sink)
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await broker.close()
        await Tortoise.close_connections()
        await asyncio.gather(db.close(), admin.close(), return_exceptions=True)
