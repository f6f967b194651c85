"""Streaming scenarios: fan-out latency to many subscribers, and many idle streams held at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from options import Options
from results import CpuMeter, Result, ServerCpu, Value, latency_ms, per_second
from subscribers import Tally, open_streams, quiet_client_gc, wait_for_deliveries
from throughput import Budget, fresh_queue
from wire import Client, EventStream, Target

# Publishes in flight at once, as many as the publish scenario's clients by default.
PUBLISHERS = 16
# Time for the server to tear the last streams down before anything else is measured.
SETTLE_SECONDS = 1.0


@dataclass
class Publishing:
    """What the steady publisher did: the answers, which numbers were stored, how late it sent."""

    budget: Budget
    published: bytearray
    late: float = 0.0  # the most any message went out after it was due

    @property
    def stored(self) -> int:
        return sum(self.published)


async def publish_steady(target: Target, queue: str, count: int, rate: float) -> Publishing:
    """Publish messages 0..count-1 at `rate` per second, each stamped with the time it was due.

    Stamping the due time rather than the send time keeps a server that stalls publishes (so that
    all publishers are busy and the next one goes out late) from hiding that wait in its figures.
    """
    path = f"/api/v1/queues/{queue}/messages"
    run = Publishing(Budget(count, float("inf")), bytearray(count))
    pool: asyncio.Queue[Client] = asyncio.Queue()
    for _ in range(PUBLISHERS):
        pool.put_nowait(Client(target))
    start, tasks = time.monotonic(), []
    for number in range(count):
        due = start + number / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        client = await pool.get()
        run.late = max(run.late, time.monotonic() - due)
        tasks.append(asyncio.create_task(_publish_stamped(client, path, Stamp(number, due), run, pool)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().close()
    return run


@dataclass(frozen=True)
class Stamp:
    number: int
    due: float


async def _publish_stamped(
    client: Client, path: str, stamp: Stamp, run: Publishing, pool: asyncio.Queue[Client]
) -> None:
    """One publish; its latency (for `publish_p99_ms`) counts from when it was actually sent."""
    body = json.dumps({"body": {"n": stamp.number, "t": stamp.due}}).encode()
    sent = time.monotonic()
    try:
        response = await client.request("POST", path, body)
        if response.ok:
            run.published[stamp.number] = 1
            run.budget.latencies.append(time.monotonic() - sent)
        else:
            run.budget.failed(f"HTTP {response.status}: {response.body[:120]!r}")
    except (OSError, TimeoutError) as error:
        run.budget.failed(error)
    finally:
        pool.put_nowait(client)


async def fanout(target: Target, options: Options) -> list[Result]:
    return [await _fanout_to(target, options, count) for count in options.subscribers]


async def _fanout_to(target: Target, options: Options, subscribers: int) -> Result:
    queue = await fresh_queue(target, "fanout")
    messages = max(1, round(options.rate * options.duration))
    tally = Tally(subscribers, messages)
    streams = await open_streams(target, queue, tally, options.open_concurrency)
    try:
        await _warm_up(target, queue, tally, streams.opened, options.drain)
        with quiet_client_gc():
            meter, cpu = CpuMeter(), ServerCpu(options.server_pid)
            run = await publish_steady(target, queue, messages, options.rate)
            await wait_for_deliveries(tally, len(streams.opened) * run.stored, options.drain)
            loadgen_cpu, server_cpu = meter.percent(), cpu.us_per(len(tally.latencies))
        dropped = streams.dropped()
    finally:
        streams.close()
    await asyncio.sleep(SETTLE_SECONDS)
    metrics: dict[str, Value] = {
        "streams": len(streams.opened),
        "published": run.stored,
        "deliveries": len(tally.latencies),
        **latency_ms(tally.latencies, 50, 95, 99),
        "lost": tally.lost(list(streams.opened), run.published),
        "duplicated": tally.duplicates,
        "publish_p99_ms": latency_ms(run.budget.latencies, 99)["p99_ms"],
        "sent_late_max_s": round(run.late, 2),
        "errors": run.budget.errors + len(streams.errors),
        "dropped_streams": dropped,
        "loadgen_cpu_pct": loadgen_cpu,
        "server_cpu_us_per_delivery": server_cpu,
    }
    params = {"subscribers": subscribers, "rate": options.rate, "seconds": options.duration}
    return Result("fanout", params, metrics, notes=_first(streams.errors, run.budget.first_error))


async def _warm_up(
    target: Target, queue: str, tally: Tally, opened: dict[int, EventStream], seconds: float
) -> None:
    """One message every open stream must receive before the steady publisher starts.

    Latency is measured at steady state: the first messages must not race the opening burst,
    which the connections scenario measures on its own.
    """
    for index in range(len(tally.warm)):
        tally.warm[index] = index not in opened  # streams that failed to open are not waited for
    if all(tally.warm):
        return
    client = Client(target)
    try:
        await client.request("POST", f"/api/v1/queues/{queue}/messages", b'{"body": "warm_up"}')
    finally:
        client.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.warmed.wait(), seconds)


def _first(stream_errors: list[str], publish_error: str) -> list[str]:
    notes = (
        [f"{len(stream_errors)} streams failed to open, first: {stream_errors[0]}"] if stream_errors else []
    )
    return notes + ([f"first publish error: {publish_error}"] if publish_error else [])


def rss_kib(pid: int | None) -> int | None:
    """The process's resident set in KiB (VmRSS), or None when we were not told which process."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _per_stream(before: int | None, after: int | None, held: int) -> float | None:
    """What the server's resident set grew by, per stream held, in KiB."""
    return None if before is None or after is None or not held else round((after - before) / held, 1)


async def connections(target: Target, options: Options) -> list[Result]:
    queue = await fresh_queue(target, "connections")
    tally = Tally(options.streams, 1)
    before, meter = rss_kib(options.server_pid), CpuMeter()
    streams = await open_streams(target, queue, tally, options.open_concurrency)
    opening_cpu = meter.percent()
    try:
        await asyncio.sleep(options.hold)
        after = rss_kib(options.server_pid)
        with quiet_client_gc():
            run = await publish_steady(target, queue, 1, 1.0)
            await wait_for_deliveries(tally, len(streams.opened) * run.stored, options.drain)
        dropped = streams.dropped()
    finally:
        streams.close()
    await asyncio.sleep(SETTLE_SECONDS)
    held = len(streams.opened)
    metrics: dict[str, Value] = {
        "streams": held,
        "open_per_s": per_second(held, streams.seconds),
        "received": len(tally.latencies),
        **latency_ms(tally.latencies, 50, 99),
        "rss_before_mib": _mib(before),
        "rss_after_mib": _mib(after),
        "kib_per_stream": _per_stream(before, after, held),
        "errors": run.budget.errors + len(streams.errors),
        "dropped_streams": dropped,
        "loadgen_cpu_pct": opening_cpu,
    }
    params = {"streams": options.streams, "hold_s": options.hold}
    return [Result("connections", params, metrics, notes=_first(streams.errors, run.budget.first_error))]
