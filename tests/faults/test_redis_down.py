"""Redis down 10 s while every publish goes to replica A: subscribers and long-poll claims on
replica B still get each event promptly (from the database), and nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import RedisProcess, Server, unique

from .checks import (
    RECOVERY_SECONDS,
    Verdict,
    check_healthz,
    check_no_500,
    check_published,
    check_subscriber,
    histogram,
    is_ready,
    note_peak_rss,
    read_log,
    readyz_between,
    show,
    stored_messages,
)
from .load import Call, Crew, Publisher, Replicas, Subscriber, poll_health

OUTAGE_SECONDS = float(os.environ.get("POMBO_FAULTS_REDIS_OUTAGE", "10"))
STREAM_WITHIN = 2.0  # from a publish's commit on A to its message.created on B
CLAIM_WITHIN = 1.5  # from a publish on A to a long-poll claim waiting on B returning it
NOTICE_WITHIN = 3.0  # /readyz says the broker is down by then
SETTINGS = {"heartbeat_seconds": "2"}
A, B = 0, 1

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]


@dataclass
class ClaimProbe:
    """Publish one message on A while a claim waits on B; how long until the claim returned it."""

    cluster: Replicas
    queue: str
    wakes: list[tuple[float, float | None]] = field(default_factory=list)  # (published at, latency)
    doubled: list[str] = field(default_factory=list)

    async def run(self) -> None:
        seen: set[str] = set()
        while True:
            waiting = asyncio.create_task(self._claim())
            await asyncio.sleep(0.5)  # the claim is parked on B
            sent = time.monotonic()
            path = f"/api/v1/queues/{self.queue}/messages"
            key = {"Idempotency-Key": unique("k")}
            await self.cluster.call("probe", A, "POST", path, json={"body": "wake"}, headers=key)
            items = await waiting
            self.wakes.append((sent, time.monotonic() - sent if items else None))
            for item in items:
                self.doubled += [item["id"]] if item["id"] in seen else []
                seen.add(item["id"])
                ack = f"/api/v1/queues/{self.queue}/messages/{item['id']}/ack"
                await self.cluster.call("ack", B, "POST", ack, json={"lease_id": item["lease_id"]})
            await asyncio.sleep(0.5)

    async def _claim(self) -> list[dict[str, Any]]:
        body = {"max": 10, "visibility_timeout": 30, "wait": 5}
        path = f"/api/v1/queues/{self.queue}/claim"
        response = await self.cluster.call("claim", B, "POST", path, json=body, timeout=10)
        return list(response.json()["items"]) if response is not None and response.status_code == 200 else []


async def test_redis_down_10s_streams_and_claims_on_the_other_replica_keep_up(
    replicas: Any, own_redis: RedisProcess, pg_fault_url: str
) -> None:
    servers: list[Server] = replicas(2, **SETTINGS)
    verdict = Verdict(f"Redis down {OUTAGE_SECONDS:.0f} s; publishes on A, streams and claims on B")
    queue, wake = unique("redis"), unique("wake")
    async with Replicas(servers) as cluster:
        for name in (queue, wake):
            response = await cluster.call("setup", A, "POST", "/api/v1/queues", json={"name": name})
            assert response is not None and response.status_code == 201, response
        publisher = Publisher(cluster, queue, "p", prefer=A, interval=0.05)
        subscribers = [Subscriber(cluster, queue, prefer=B, alternate=False) for _ in range(3)]
        probe = ClaimProbe(cluster, wake)
        stop = asyncio.Event()
        background = Crew()
        background.start(poll_health(cluster), probe.run(), *(s.run() for s in subscribers))
        publishing = asyncio.create_task(publisher.run(stop))
        try:
            await asyncio.sleep(3)
            down_at = time.monotonic()
            await asyncio.to_thread(own_redis.stop)
            await asyncio.sleep(OUTAGE_SECONDS)
            up_at = time.monotonic()
            await asyncio.to_thread(own_redis.start)
            await asyncio.sleep(RECOVERY_SECONDS + 1)
            stop.set()
            await publishing
            head = (await read_log(cluster, queue))[-1]["seq"]
            for subscriber in subscribers:
                await subscriber.reach(head, timeout=15)
        finally:
            stop.set()
            await background.stop()
            publishing.cancel()
        stored = await stored_messages(pg_fault_url, queue)
    calls = cluster.calls
    check_stream_lag(verdict, publisher, subscribers, down_at, up_at)
    check_claim_wakes(verdict, probe, down_at, up_at)
    check_broker_readiness(verdict, calls, down_at, up_at)
    moved = [p for p in publisher.published.values() if p.replica != A]
    verdict.expect(
        not moved, f"{len(moved)} publishes had to go to B (A failed them): {histogram(_on(calls, A))}"
    )
    check_published(verdict, [publisher], stored)
    published_ids = {p.message_id for p in publisher.published.values()}
    for n, subscriber in enumerate(subscribers):
        check_subscriber(verdict, f"subscriber {n} on B", subscriber, head, published_ids)
    check_no_500(verdict, calls)
    failed = [c for c in calls if c.kind in ("publish", "claim", "ack") and not (c.status and c.status < 300)]
    verdict.expect(
        not failed, f"{len(failed)} publishes, claims or acks failed with Redis down: {histogram(failed)}"
    )
    check_healthz(verdict, calls)
    verdict.note(f"all calls: {histogram(calls)}")
    note_peak_rss(verdict, servers)
    verdict.conclude()


def check_stream_lag(
    verdict: Verdict, publisher: Publisher, subscribers: list[Subscriber], down_at: float, up_at: float
) -> None:
    during = [p for p in publisher.published.values() if down_at <= p.sent < up_at]
    verdict.note(f"{len(during)} messages published on A while Redis was down")
    for n, subscriber in enumerate(subscribers):
        lags = [
            subscriber.arrival[p.message_id] - p.sent for p in during if p.message_id in subscriber.arrival
        ]
        late = [lag for lag in lags if lag >= STREAM_WITHIN]
        verdict.note(f"subscriber {n} on B during the outage: max lag {max(lags, default=0):.2f} s")
        verdict.expect(
            not late and len(lags) == len(during),
            f"subscriber {n} on B: {len(late)} of {len(during)} outage events came {STREAM_WITHIN:.0f} s or "
            f"more after their publish (max {max(lags, default=0):.2f} s), {len(during) - len(lags)} never",
        )


def check_claim_wakes(verdict: Verdict, probe: ClaimProbe, down_at: float, up_at: float) -> None:
    def phase(at: float) -> str:
        return "before" if at < down_at else "during" if at < up_at else "after"

    for name in ("before", "during", "after"):
        lags = [lag for at, lag in probe.wakes if phase(at) == name]
        shown = ", ".join("never" if lag is None else f"{lag:.2f}" for lag in lags)
        verdict.note(f"long-poll claims on B woken by a publish on A, {name} the outage: [{shown}] s")
        slow = [lag for lag in lags if lag is None or lag >= CLAIM_WITHIN]
        verdict.expect(
            bool(lags) and not slow,
            f"{name} the outage: {len(slow)} of {len(lags)} claim wakes took {CLAIM_WITHIN} s+ or never came",
        )
    verdict.expect(not probe.doubled, f"{len(probe.doubled)} wake messages were claimed twice")


def check_broker_readiness(verdict: Verdict, calls: list[Call], down_at: float, up_at: float) -> None:
    """Degraded (200, broker down) while Redis is down; ready again within 10 s of its return."""
    for replica in (A, B):
        during = readyz_between(calls, replica, down_at, up_at)
        not_200 = [c for c in during if c.status != 200]
        noticed = [c for c in during if c.started >= down_at + NOTICE_WITHIN]
        unsaid = [c for c in noticed if c.state != "degraded" or (c.checks or {}).get("broker") != "down"]
        after = readyz_between(calls, replica, up_at + RECOVERY_SECONDS, float("inf"))
        not_ready = [c for c in after if not is_ready(c) or (c.checks or {}).get("broker") != "ok"]
        where = f"replica {'AB'[replica]}"
        verdict.expect(
            not not_200, f"{where}: /readyz with Redis down answered {histogram(not_200)}, not 200"
        )
        verdict.expect(
            not unsaid,
            f"{where}: /readyz with Redis down did not say degraded, broker down: "
            f"{len(unsaid)} of {len(noticed)}, e.g. {show(unsaid[:1])}",
        )
        verdict.expect(
            not not_ready,
            f"{where}: /readyz from 10 s after Redis came back was not 200 ready with every check ok: "
            f"{len(not_ready)} of {len(after)}, e.g. {show(not_ready[:1])}",
        )


def _on(calls: list[Call], replica: int) -> list[Call]:
    return [c for c in calls if c.replica == replica and c.kind == "publish"]
