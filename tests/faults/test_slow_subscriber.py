"""A subscriber that stops reading: it is cut (not waited for), the others keep their pace, and it
resumes from its Last-Event-ID without a gap or a double."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import pytest
from conftest import mint, unique

from .checks import (
    Verdict,
    check_healthz,
    check_no_500,
    check_subscriber,
    contiguity,
    histogram,
    note_peak_rss,
    read_log,
)
from .load import Crew, Replicas, Subscriber, poll_health
from .rawsse import RawStream

SEND_TIMEOUT = 2.0
SETTINGS = {"stream_send_timeout_seconds": str(SEND_TIMEOUT), "heartbeat_seconds": "1"}
MESSAGES = int(os.environ.get("POMBO_FAULTS_SLOW_MESSAGES", "3000"))
BATCH, PAD = 200, 4000  # 4 KB bodies: the stuck reader's socket buffers fill within a few hundred frames
FAST_LATENCY = 1.0  # the others' p99 from sending a batch to each of its message.created
CUT_WITHIN = SEND_TIMEOUT + 5.0

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


async def test_a_subscriber_that_stops_reading_is_cut_the_others_keep_up_and_it_resumes(
    make_server: Any,
) -> None:
    server = make_server(**SETTINGS).start()
    verdict = Verdict(f"a stuck subscriber among two readers, {MESSAGES} messages of {PAD} bytes")
    queue = unique("slow")
    async with Replicas([server]) as one:
        response = await one.call("setup", 0, "POST", "/api/v1/queues", json={"name": queue})
        assert response is not None and response.status_code == 201, response
        readers = [Subscriber(one, queue, alternate=False) for _ in range(2)]
        background = Crew()
        background.start(poll_health(one), *(r.run() for r in readers))
        stuck = RawStream(server.port, f"/api/v1/queues/{queue}/stream", mint(), 0, rcvbuf=4096)
        try:
            assert await stuck.open() == 200
            await stuck.read_until(1, time.monotonic() + 5)  # queue.created, then it stops reading
            await asyncio.sleep(0.5)
            answered = await publish_batches(one, queue, verdict)
            last_publish = time.monotonic()
            head = (await read_log(one, queue))[-1]["seq"]
            for n, reader in enumerate(readers):
                verdict.expect(await reader.reach(head, 20), f"reader {n} did not reach {head} within 20 s")
            check_pace(verdict, readers, answered, last_publish)
            await asyncio.sleep(CUT_WITHIN)
            held_at = stuck.last
            cut = await stuck.read_to_end(time.monotonic() + 10)
            resumed = Subscriber(one, queue, after=stuck.last, alternate=False)
            background.start(resumed.run())
            reached = await resumed.reach(head, 20)
        finally:
            stuck.close()
            await background.stop()
    ids = set(answered)
    for n, reader in enumerate(readers):
        check_subscriber(verdict, f"reader {n}", reader, head, ids)
        verdict.expect(len(reader.connects) == 1, f"reader {n} was disconnected: {reader.connects}")
    verdict.note(f"stuck reader held at seq {held_at} of {head}; cut: {cut}; then resumed from {stuck.last}")
    verdict.expect(held_at < head, f"the stuck reader was never held up (it had all {head} events)")
    verdict.expect(cut, f"the stuck reader was not cut within {CUT_WITHIN + 10:.0f} s of the last publish")
    verdict.expect(reached, f"the resumed reader did not reach {head} within 20 s (at {resumed.last})")
    problem = contiguity(stuck.seqs + resumed.seqs, 1, head)
    verdict.expect(problem is None, f"stuck + resumed: {problem}")
    check_no_500(verdict, one.calls)
    check_healthz(verdict, one.calls)
    verdict.note(f"all calls: {histogram(one.calls)}")
    note_peak_rss(verdict, [server])
    verdict.conclude()


async def publish_batches(one: Replicas, queue: str, verdict: Verdict) -> dict[str, float]:
    """MESSAGES messages in batches; each id with the time its batch was sent (it was answered 2xx)."""
    answered: dict[str, float] = {}
    for start in range(0, MESSAGES, BATCH):
        items = [{"body": {"n": n, "pad": "x" * PAD}} for n in range(start, min(start + BATCH, MESSAGES))]
        path, sent = f"/api/v1/queues/{queue}/messages/batch", time.monotonic()
        response = await one.call("publish", 0, "POST", path, json={"items": items}, timeout=30)
        assert response is not None and response.status_code == 201, response and response.text[:300]
        answered.update({item["id"]: sent for item in response.json()["items"]})
        await asyncio.sleep(0.05)
    return answered


def check_pace(verdict: Verdict, readers: list[Subscriber], answered: dict[str, float], last: float) -> None:
    for n, reader in enumerate(readers):
        lags = sorted(reader.arrival[i] - t for i, t in answered.items() if i in reader.arrival)
        if not lags:
            verdict.fail(f"reader {n} received no message.created")
            continue
        p99 = lags[int(len(lags) * 0.99) - 1] if len(lags) > 1 else lags[0]
        verdict.note(
            f"reader {n}: lag median {statistics.median(lags) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
            f"max {lags[-1] * 1000:.0f} ms"
        )
        verdict.expect(
            p99 < FAST_LATENCY, f"reader {n} lag p99 {p99:.2f} s (expected < {FAST_LATENCY:.0f} s)"
        )
