"""A reconnect storm: 1,000 streams come back at once, each 500 events behind. All catch up within
5 s, the server's peak RSS grows by at most 100 MiB, and no stream misses or doubles an event."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import mint, unique

from .checks import Verdict, contiguity, histogram, read_log
from .load import Replicas
from .rawsse import RawStream

STREAMS = int(os.environ.get("POMBO_FAULTS_STORM_STREAMS", "1000"))
BEHIND = int(os.environ.get("POMBO_FAULTS_STORM_EVENTS", "500"))
CATCH_UP_WITHIN = 5.0
MAX_GROWTH_MIB = 100.0
MIB = 2**20

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


class PeakRss:
    """The peak resident set of a process while it runs: VmHWM after a reset, and VmRSS sampled."""

    def __init__(self, pid: int) -> None:
        self.status = Path(f"/proc/{pid}/status")
        self.clear_refs = Path(f"/proc/{pid}/clear_refs")
        self.sampled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def kib(self, field: str) -> int:
        for line in self.status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in {self.status}")

    def start(self) -> int:
        """Reset the high-water mark (where the kernel lets us) and start sampling; the baseline."""
        with contextlib.suppress(OSError):  # else VmHWM keeps an earlier peak; the samples still tell
            self.clear_refs.write_text("5")
        baseline = self.kib("VmRSS")
        self._thread.start()
        return baseline

    def stop(self) -> tuple[int, int]:
        """(peak from samples, VmHWM) in KiB."""
        self._stop.set()
        self._thread.join()
        return self.sampled, self.kib("VmHWM")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.sampled = max(self.sampled, self.kib("VmRSS"))


async def test_a_reconnect_storm_of_1000_streams_500_events_behind(make_server: Any) -> None:
    server = make_server().start()
    assert server.process is not None
    verdict = Verdict(f"reconnect storm: {STREAMS} streams, each {BEHIND} events behind")
    queue, token = unique("storm"), mint()
    async with Replicas([server], timeout=30) as one:
        cursor = await publish(one, queue, 1, create=True)
        head = await publish(one, queue, BEHIND)
        verdict.expect(head == cursor + BEHIND, f"the log moved from {cursor} to {head}, not by {BEHIND}")
        path = f"/api/v1/queues/{queue}/stream"
        streams = [RawStream(server.port, path, token, cursor) for _ in range(STREAMS)]
        rss = PeakRss(server.process.pid)
        baseline = rss.start()
        began = time.monotonic()
        try:
            caught = await storm(streams, head, began)
            peak_sampled, hwm = rss.stop()
            live = await publish(one, queue, 1)
            live_ok = await asyncio.gather(*(s.read_until(live, time.monotonic() + 5) for s in streams))
        finally:
            for stream in streams:
                stream.close()
    statuses = histogram_of(s.status for s in streams)
    times = sorted(t - began for t in caught if t is not None)
    verdict.note(f"open statuses: {statuses}; {len(times)} of {STREAMS} caught up")
    if times:
        verdict.note(f"catch-up: median {times[len(times) // 2]:.2f} s, last {times[-1]:.2f} s")
    verdict.expect(
        len(times) == STREAMS and times[-1] < CATCH_UP_WITHIN,
        f"{len(times)} of {STREAMS} streams caught up, the last after "
        f"{times[-1] if times else float('nan'):.2f} s (expected all within {CATCH_UP_WITHIN:.0f} s)",
    )
    growth = (max(peak_sampled, hwm) - baseline) / 1024
    verdict.note(
        f"server RSS: baseline {baseline / 1024:.1f} MiB, peak sampled {peak_sampled / 1024:.1f} MiB, "
        f"VmHWM {hwm / 1024:.1f} MiB: growth {growth:.1f} MiB"
    )
    verdict.expect(growth <= MAX_GROWTH_MIB, f"peak RSS grew {growth:.1f} MiB (at most {MAX_GROWTH_MIB:.0f})")
    broken = [(n, p) for n, s in enumerate(streams) if (p := contiguity(s.seqs, cursor + 1, live))]
    verdict.expect(not broken, f"{len(broken)} streams missed or doubled events, e.g. {broken[:2]}")
    verdict.expect(all(live_ok), f"{live_ok.count(False)} streams missed the live event after catching up")
    resets = sum(len(s.controls) for s in streams)
    verdict.expect(resets == 0, f"{resets} control events (stream.reset?) during the storm")
    verdict.note(f"all calls: {histogram(one.calls)}")
    verdict.conclude()


async def publish(one: Replicas, queue: str, count: int, create: bool = False) -> int:
    """Publish `count` small messages in one batch; the log's head after it."""
    if create:
        response = await one.call("setup", 0, "POST", "/api/v1/queues", json={"name": queue})
        assert response is not None and response.status_code == 201, response
    items = [{"body": {"n": n}} for n in range(count)]
    path = f"/api/v1/queues/{queue}/messages/batch"
    response = await one.call("publish", 0, "POST", path, json={"items": items})
    assert response is not None and response.status_code == 201, response
    log = await read_log(one, queue)
    return int(log[-1]["seq"])


async def storm(streams: list[RawStream], head: int, began: float) -> list[float | None]:
    """Open every stream at once and read each until `head`; when each got there (None: never)."""

    async def one(stream: RawStream) -> float | None:
        try:
            if await stream.open() != 200:
                return None
        except OSError:
            return None
        return time.monotonic() if await stream.read_until(head, began + 30) else None

    return list(await asyncio.gather(*(one(s) for s in streams)))


def histogram_of(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return counts
