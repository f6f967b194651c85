"""A replica lost under load, by SIGKILL (fail-over) or SIGTERM (a deploy): publishers retry their
key on the other replica, subscribers resume there, workers carry on; nothing lost or doubled."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import subprocess
import time
from typing import Any

import pytest
from conftest import Server, unique

from .checks import (
    RECOVERY_SECONDS,
    Verdict,
    check_healthz,
    first_success_after,
    histogram,
    note_peak_rss,
)
from .load import Call, Publisher, Replicas, Subscriber, Worker
from .mixed_load import MixedLoad

SETTINGS = {"heartbeat_seconds": "2", "sweep_seconds": "0.5"}
FAIL_OVER_WITHIN = 2.0  # a publisher's next 2xx after the loss, on the other replica
EXIT_WITHIN = 10.0  # SIGTERM: the replica has exited by then
PROBLEM_LINE = re.compile(r"\| (ERROR|CRITICAL|WARNING) +\||Traceback")

pytestmark = pytest.mark.faults


@pytest.mark.timeout(150)
async def test_replica_sigkill_under_load_fails_over_to_the_other(replicas: Any, pg_fault_url: str) -> None:
    await lose_a_replica(replicas(2, **SETTINGS), pg_fault_url, signal.SIGKILL)


@pytest.mark.timeout(150)
async def test_replica_sigterm_under_publish_load_stores_every_2xx_and_exits_cleanly(
    replicas: Any, pg_fault_url: str
) -> None:
    await lose_a_replica(replicas(2, **SETTINGS), pg_fault_url, signal.SIGTERM)


async def lose_a_replica(servers: list[Server], database_url: str, signum: signal.Signals) -> None:
    """Everything starts on replica 0 (workers on both); replica 0 gets `signum` mid-load."""
    victim = servers[0]
    verdict = Verdict(f"replica {signum.name} under load, two replicas on PostgreSQL + Redis")
    queue = unique("loss")
    async with Replicas(servers) as cluster:
        response = await cluster.call("setup", 0, "POST", "/api/v1/queues", json={"name": queue})
        assert response is not None and response.status_code == 201, response
        load = MixedLoad(
            cluster,
            queue,
            publishers=[Publisher(cluster, queue, f"p{i}", prefer=0, interval=0.01) for i in range(3)],
            subscribers=[Subscriber(cluster, queue, prefer=0) for _ in range(2)],
            workers=[Worker(cluster, queue, prefer=i, visibility=3.0) for i in range(2)],
        )
        async with load:
            await asyncio.sleep(3)
            log_from, lost_at = victim.log_path.stat().st_size, time.monotonic()
            exit_code, exited_at = await signal_and_wait(victim, signum)
            shutdown_log = victim.log_path.read_bytes()[log_from:].decode(errors="replace")
            await asyncio.sleep(4)
            await load.settle(verdict, within=30)
            restarted_at = time.monotonic()
            await asyncio.to_thread(victim.start)  # the lost replica comes back and serves again
            back = await publish_until_2xx(cluster, 0, unique("back"), restarted_at + RECOVERY_SECONDS)
    calls = cluster.calls
    verdict.note(f"replica 0 exited {exit_code} {exited_at - lost_at:.2f} s after {signum.name}")
    if signum == signal.SIGTERM:
        verdict.expect(
            exit_code in (0, -15), f"replica 0 exited {exit_code} after SIGTERM (expected 0 or -15)"
        )
        verdict.expect(
            exited_at - lost_at < EXIT_WITHIN, f"replica 0 took {exited_at - lost_at:.1f} s to exit"
        )
        check_quiet_shutdown(verdict, shutdown_log)
    check_fail_over(verdict, calls, lost_at)
    verdict.expect(back is not None, f"the restarted replica served no 2xx within {RECOVERY_SECONDS:.0f} s")
    survivor_5xx = [c for c in calls if c.replica == 1 and c.status is not None and c.status >= 500]
    verdict.expect(not survivor_5xx, f"the surviving replica answered 5xx: {histogram(survivor_5xx)}")
    await load.check(verdict, database_url)
    for n, subscriber in enumerate(load.subscribers):
        moved = {replica for _, replica, status in subscriber.connects if status == 200}
        verdict.expect(1 in moved, f"subscriber {n} never streamed from the surviving replica")
    check_healthz(verdict, [c for c in calls if c.replica == 1])
    verdict.note(f"all calls: {histogram(calls)}")
    note_peak_rss(verdict, servers)
    verdict.conclude()


async def signal_and_wait(server: Server, signum: signal.Signals) -> tuple[int | None, float]:
    assert server.process is not None
    server.process.send_signal(signum)
    try:
        code = await asyncio.to_thread(server.process.wait, EXIT_WITHIN + 20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        code = await asyncio.to_thread(server.process.wait)
    return code, time.monotonic()


def check_fail_over(verdict: Verdict, calls: list[Call], lost_at: float) -> None:
    """After the loss, publishes went on through the other replica within FAIL_OVER_WITHIN."""
    first = first_success_after(calls, 1, lost_at, {"publish"})
    gap = None if first is None else first - lost_at
    verdict.note(f"first 2xx publish on the surviving replica {gap and f'{gap:.2f} s'} after the loss")
    done = sorted(c.ended for c in calls if c.kind == "publish" and c.status and c.status < 300)
    longest = max((b - a for a, b in itertools.pairwise(done)), default=0.0)
    verdict.note(f"longest gap between 2xx publishes: {longest:.2f} s")
    verdict.expect(
        gap is not None and gap < FAIL_OVER_WITHIN, f"fail-over took {gap} s (< {FAIL_OVER_WITHIN})"
    )


def check_quiet_shutdown(verdict: Verdict, shutdown_log: str) -> None:
    """A SIGTERM is routine: the stopping replica logs no error, warning or traceback."""
    problems = [line for line in shutdown_log.splitlines() if PROBLEM_LINE.search(line)]
    verdict.note(f"replica 0 logged {len(problems)} error/warning/traceback lines")
    verdict.expect(not problems, f"replica 0 logged {len(problems)} problem lines: {problems[:3]}")


async def publish_until_2xx(cluster: Replicas, replica: int, queue: str, deadline: float) -> float | None:
    while time.monotonic() < deadline:
        path = f"/api/v1/queues/{queue}/messages"
        response = await cluster.call("recovery", replica, "POST", path, json={"body": "back"}, timeout=2.0)
        if response is not None and response.is_success:
            return time.monotonic()
        await asyncio.sleep(0.1)
    return None
