"""The read-heavy scenario: queue counts read by many clients while a publisher keeps changing them.

Seeds `--read-queues` queues with `--read-messages` messages each (by batch), times a few reads
with nothing else going on, then `--readers` clients read `GET /api/v1/queues` and
`GET /api/v1/queues/{name}` in turn while one publisher adds `--read-rate` messages/s to those
queues, round robin. Every answer is also checked against what the publisher had been told was
stored before the read was sent: a total below that is counted as `stale`.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

from options import Options
from results import CpuMeter, Result, Value, latency_ms, per_second
from throughput import Budget, fill, fresh_queue
from wire import Client, HttpError, Target

# Sequential reads timed before the load starts: the cost of one read on a quiet server.
QUIET_READS = 20
LIST_PATH = "/api/v1/queues?limit=200"


@dataclass
class Stored:
    """Messages per queue that the server has acknowledged: a read must never show fewer."""

    counts: dict[str, int]
    published: int = 0
    publish_errors: int = 0


@dataclass
class Endpoint:
    """What one kind of read measured."""

    name: str
    latencies: list[float] = field(default_factory=list)
    stale: int = 0


async def reads(target: Target, options: Options) -> list[Result]:
    queues = [await fresh_queue(target, "reads") for _ in range(options.read_queues)]
    await asyncio.gather(*(fill(target, queue, options.read_messages) for queue in queues))
    stored = Stored({queue: options.read_messages for queue in queues})
    quiet = {name: await _quiet(target, path) for name, path in _paths(queues[0]).items()}
    found = {name: Endpoint(name) for name in ("list", "queue")}
    budget = Budget(options.reads, options.duration)
    elapsed, loadgen_cpu = await _under_load(target, options, queues, budget, stored, found)
    notes = [f"first error: {budget.first_error}"] if budget.first_error else []
    return [
        Result(
            "reads",
            {**_params(options), "endpoint": e.name},
            _metrics(e, quiet[e.name], elapsed, budget, stored, loadgen_cpu),
            notes=notes,
        )
        for e in found.values()
    ]


async def _under_load(
    target: Target,
    options: Options,
    queues: list[str],
    budget: Budget,
    stored: Stored,
    found: dict[str, Endpoint],
) -> tuple[float, float]:
    """The readers and the publisher together; the seconds the readers took and our CPU share."""
    began, meter = budget.start(), CpuMeter()
    publisher = asyncio.create_task(_publish_steadily(target, queues, options.read_rate, budget, stored))
    clients = [Client(target) for _ in range(options.readers)]
    try:
        await asyncio.gather(*(_read(c, i, queues, budget, stored, found) for i, c in enumerate(clients)))
        elapsed, loadgen_cpu = time.perf_counter() - began, meter.percent()
        await publisher
    finally:
        publisher.cancel()
        for client in clients:
            client.close()
    return elapsed, loadgen_cpu


def _params(options: Options) -> dict[str, Value]:
    return {
        "queues": options.read_queues,
        "messages": options.read_queues * options.read_messages,
        "readers": options.readers,
        "rate": options.read_rate,
    }


def _paths(queue: str) -> dict[str, str]:
    return {"list": LIST_PATH, "queue": f"/api/v1/queues/{queue}"}


async def _quiet(target: Target, path: str) -> list[float]:
    """Sequential reads with no other load; the first is the first read after seeding."""
    client, times = Client(target), []
    try:
        for _ in range(QUIET_READS):
            began = time.perf_counter()
            (await client.request("GET", path)).expect(200)
            times.append(time.perf_counter() - began)
    finally:
        client.close()
    return times


def _metrics(
    endpoint: Endpoint, quiet: list[float], elapsed: float, budget: Budget, stored: Stored, cpu: float
) -> dict[str, Value]:
    return {
        "quiet_first_ms": round(quiet[0] * 1000, 1),
        "quiet_p50_ms": round(statistics.median(quiet[1:]) * 1000, 1),
        "reads_per_s": per_second(len(endpoint.latencies), elapsed),
        "reads": len(endpoint.latencies),
        **latency_ms(endpoint.latencies, 50, 99),
        "stale": endpoint.stale,
        "published": stored.published,
        "errors": budget.errors + stored.publish_errors,
        "loadgen_cpu_pct": cpu,
    }


async def _read(
    client: Client, index: int, queues: list[str], budget: Budget, stored: Stored, found: dict[str, Endpoint]
) -> None:
    """Alternate list and single-queue reads (half the clients start with each) until spent."""
    turn = index
    while budget.take():
        queue = queues[turn % len(queues)]
        name, path = ("list", LIST_PATH) if turn % 2 == 0 else ("queue", f"/api/v1/queues/{queue}")
        turn += 1
        before = dict(stored.counts)
        began = time.perf_counter()
        try:
            answer = (await client.request("GET", path)).expect(200).json()
        except (OSError, TimeoutError, HttpError) as error:
            budget.failed(error)
            continue
        found[name].latencies.append(time.perf_counter() - began)
        shown = answer["items"] if name == "list" else [answer]
        found[name].stale += sum(
            1 for q in shown if q["name"] in before and sum(q["messages"].values()) < before[q["name"]]
        )


async def _publish_steadily(
    target: Target, queues: list[str], rate: float, budget: Budget, stored: Stored
) -> None:
    """One message every 1/rate s, round robin over the queues, until the readers' deadline."""
    client, start, number = Client(target), time.perf_counter(), 0
    body = json.dumps({"body": "a message that changes the counts", "type": "bench.reads"}).encode()
    try:
        while rate > 0:
            due = start + number / rate
            if due >= budget.deadline or budget.left <= 0:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            queue = queues[number % len(queues)]
            number += 1
            try:
                (await client.request("POST", f"/api/v1/queues/{queue}/messages", body)).expect(201)
            except (OSError, TimeoutError, HttpError) as error:
                stored.publish_errors += 1
                budget.first_error = budget.first_error or f"publish: {error}"[:200]
                continue
            stored.counts[queue] += 1
            stored.published += 1
    finally:
        client.close()
