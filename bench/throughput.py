"""Request/response scenarios: single publishes, batch publishes, claim+ack by workers."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from options import Options
from results import CpuMeter, Result, latency_ms, per_second, process_cpu_seconds
from wire import Client, HttpError, Target

PUBLISH_BODY = b'{"body": "a small message from the load generator", "type": "bench.publish"}'


async def fresh_queue(target: Target, scenario: str) -> str:
    """A queue of this run's own, so no earlier run's messages or subscribers interfere."""
    name = f"bench-{scenario}-{secrets.token_hex(4)}"
    client = Client(target)
    try:
        (await client.post_json("/api/v1/queues", {"name": name})).expect(201)
    finally:
        client.close()
    return name


@dataclass
class Budget:
    """A count and a deadline shared by concurrent loops: each loop stops when either runs out."""

    left: int
    seconds: float
    deadline: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    loadgen_cpu: float = 0.0

    def start(self) -> float:
        now = time.perf_counter()
        self.deadline = now + self.seconds
        return now

    def take(self, amount: int = 1) -> bool:
        if self.left < amount or time.perf_counter() >= self.deadline:
            return False
        self.left -= amount
        return True

    def failed(self, error: BaseException | str) -> None:
        self.errors += 1
        self.first_error = self.first_error or (str(error) or type(error).__name__)[:200]


async def _post_until_spent(client: Client, path: str, body: bytes, budget: Budget, amount: int) -> None:
    """POST the same body until the budget is spent, timing each answer."""
    while budget.take(amount):
        began = time.perf_counter()
        try:
            response = await client.request("POST", path, body)
        except (OSError, TimeoutError) as error:
            budget.failed(error)
            continue
        if response.ok:
            budget.latencies.append(time.perf_counter() - began)
        else:
            budget.failed(f"HTTP {response.status}: {response.body[:120]!r}")


async def _measure(
    target: Target, concurrency: int, budget: Budget, loop: Callable[[Client], Awaitable[None]]
) -> float:
    """Run `loop` on `concurrency` clients of their own; the seconds it took them all."""
    clients = [Client(target) for _ in range(concurrency)]
    try:
        began, meter = budget.start(), CpuMeter()
        await asyncio.gather(*(loop(client) for client in clients))
        budget.loadgen_cpu = meter.percent()
        return time.perf_counter() - began
    finally:
        for client in clients:
            client.close()


def _errors(budget: Budget) -> list[str]:
    return [f"first error: {budget.first_error}"] if budget.first_error else []


async def publish(target: Target, options: Options) -> list[Result]:
    path = f"/api/v1/queues/{await fresh_queue(target, 'publish')}/messages"
    budget = Budget(options.messages, options.duration)
    cpu_before = process_cpu_seconds(options.server_pid)
    elapsed = await _measure(
        target, options.clients, budget, lambda c: _post_until_spent(c, path, PUBLISH_BODY, budget, 1)
    )
    cpu_after = process_cpu_seconds(options.server_pid)
    metrics = {
        "messages_per_s": per_second(len(budget.latencies), elapsed),
        "messages": len(budget.latencies),
        **latency_ms(budget.latencies, 50, 99),
        "errors": budget.errors,
        "loadgen_cpu_pct": budget.loadgen_cpu,
    }
    if cpu_before is not None and cpu_after is not None and budget.latencies:
        # The server's own CPU per publish: steadier than a rate on a machine others share.
        metrics["server_cpu_us_per_msg"] = round((cpu_after - cpu_before) / len(budget.latencies) * 1e6, 1)
    return [Result("publish", {"clients": options.clients}, metrics, notes=_errors(budget))]


async def batch(target: Target, options: Options) -> list[Result]:
    return [await _batch_of(target, options, size) for size in options.batch_sizes]


async def _batch_of(target: Target, options: Options, size: int) -> Result:
    path = f"/api/v1/queues/{await fresh_queue(target, 'batch')}/messages/batch"
    # Encoded once: the client's JSON work must not be what limits the figure.
    body = json.dumps({"items": [{"body": {"i": i, "text": "batched"}} for i in range(size)]}).encode()
    budget = Budget(options.batch_messages, options.duration)
    elapsed = await _measure(
        target, options.batch_clients, budget, lambda c: _post_until_spent(c, path, body, budget, size)
    )
    sent = len(budget.latencies) * size
    metrics = {
        "messages_per_s": per_second(sent, elapsed),
        "messages": sent,
        **latency_ms(budget.latencies, 50, 99),
        "errors": budget.errors,
        "loadgen_cpu_pct": budget.loadgen_cpu,
    }
    params = {"batch": size, "clients": options.batch_clients}
    return Result("batch", params, metrics, notes=_errors(budget))


async def claim(target: Target, options: Options) -> list[Result]:
    return [await _claim_by(target, options, most) for most in options.claim_batch]


async def _claim_by(target: Target, options: Options, most: int) -> Result:
    """Workers claim up to `most` at a time: one message acks alone, several in one batch ack."""
    queue = await fresh_queue(target, "claim")
    await fill(target, queue, options.claim_messages)
    budget = Budget(options.claim_messages, options.duration)
    elapsed = await _measure(target, options.workers, budget, lambda c: _work(c, queue, most, budget))
    metrics = {
        "messages_per_s": per_second(len(budget.latencies), elapsed),
        "messages": len(budget.latencies),
        **latency_ms(budget.latencies, 50, 99),
        "errors": budget.errors,
        "loadgen_cpu_pct": budget.loadgen_cpu,
    }
    params = {"workers": options.workers, "claim_max": most, "ack": "each" if most == 1 else "batch"}
    return Result("claim", params, metrics, notes=_errors(budget))


async def fill(target: Target, queue: str, count: int) -> None:
    """Put `count` small messages in `queue`, a thousand per batch."""
    client = Client(target)
    try:
        for start in range(0, count, 1000):
            items = [{"body": {"n": n}} for n in range(start, min(start + 1000, count))]
            (await client.post_json(f"/api/v1/queues/{queue}/messages/batch", {"items": items})).expect(201)
    finally:
        client.close()


async def _work(client: Client, queue: str, most: int, budget: Budget) -> None:
    """Claim, then ack what came; a latency sample is one message's claim-to-ack time."""
    claim = json.dumps({"max": most}).encode()
    while time.perf_counter() < budget.deadline:
        began = time.perf_counter()
        try:
            items = (await client.request("POST", f"/api/v1/queues/{queue}/claim", claim)).expect(200).json()
            if not items["items"]:
                return
            (await client.request("POST", *_ack(queue, items["items"], most))).expect(200)
        except (OSError, TimeoutError, HttpError) as error:
            budget.failed(error)
            return
        budget.latencies += [time.perf_counter() - began] * len(items["items"])


def _ack(queue: str, items: list[dict[str, str]], most: int) -> tuple[str, bytes]:
    """One message acks on its own route, as a one-at-a-time worker would; several in one batch."""
    if most == 1:
        [item] = items
        body = {"lease_id": item["lease_id"]}
        return f"/api/v1/queues/{queue}/messages/{item['id']}/ack", json.dumps(body).encode()
    pairs = [{"id": item["id"], "lease_id": item["lease_id"]} for item in items]
    return f"/api/v1/queues/{queue}/ack", json.dumps({"items": pairs}).encode()
