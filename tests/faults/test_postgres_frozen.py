"""PostgreSQL frozen (SIGSTOP) for longer than a statement may take, then thawed, under publish +
claim + stream load on two replicas: its connections stay open and nothing answers, as when the
database's host hangs or the network drops packets. Every request gets an answer within a bound
(503 + Retry-After while frozen), both replicas serve again once it thaws, nothing is lost or
doubled."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from conftest import Server, unique

from .checks import RECOVERY_SECONDS, Verdict, histogram, note_peak_rss
from .load import Call, Replicas, create_queues, probe_outage, probe_recovery
from .mixed_load import MixedLoad
from .services import PostgresCluster

CYCLES = int(os.environ.get("POMBO_FAULTS_FREEZE_CYCLES", "2"))
FROZEN_SECONDS = 20.0
# What bounds an answer: the server's statement timeout (5 s), twice for a read that first waits
# for a pool connection held by a hung statement, and its connect timeout (2 s); well under the
# freeze, so an answer in time is not one the thaw let through.
ANSWER_BOUND = 13.0
READY_BOUND = 2.0  # /readyz, as an orchestrator's probe would wait
SETTINGS = {"heartbeat_seconds": "2", "sweep_seconds": "0.5"}

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_postgres_frozen_twice_under_load(
    pg_cluster: PostgresCluster, replicas: Any, pg_fault_url: str
) -> None:
    servers: list[Server] = replicas(2, **SETTINGS)
    verdict = Verdict(f"PostgreSQL frozen {FROZEN_SECONDS:.0f} s and thawed, x{CYCLES}, two replicas")
    queue, probes = unique("frozen"), unique("probe")
    # The client waits longer than any bound the server keeps, so a hang shows as a hang.
    async with Replicas(servers, timeout=30.0) as cluster:
        await create_queues(cluster, queue, probes)
        load = MixedLoad.alternating(cluster, queue)
        async with load:
            try:
                await asyncio.sleep(2.0)
                freezes = await run_freezes(pg_cluster, cluster, probes, verdict)
            finally:
                pg_cluster.thaw()  # never leave it stopped for the next test
            await load.settle(verdict)
    for frozen, thawed in freezes:
        check_answers_while_frozen(verdict, cluster.calls, frozen, thawed)
    await load.check(verdict, pg_fault_url)
    alive = [s.process is not None and s.process.poll() is None for s in servers]
    verdict.expect(all(alive), f"a replica exited: alive {alive}")
    verdict.note(f"all calls: {histogram(cluster.calls)}")
    note_peak_rss(verdict, servers)
    verdict.conclude()


async def run_freezes(
    pg: PostgresCluster, cluster: Replicas, probes: str, verdict: Verdict
) -> list[tuple[float, float]]:
    """Freeze, probe, thaw, wait for both replicas to serve 2xx again."""
    freezes: list[tuple[float, float]] = []
    for cycle in range(1, CYCLES + 1):
        frozen = await asyncio.to_thread(pg.freeze)
        await probe_outage(cluster, probes, until=frozen + FROZEN_SECONDS)
        thawed = await asyncio.to_thread(pg.thaw)
        freezes.append((frozen, thawed))
        recovered = await probe_recovery(cluster, probes, thawed, RECOVERY_SECONDS)
        firsts = ", ".join("never" if r is None else f"{r:.2f} s" for r in recovered)
        verdict.note(f"cycle {cycle}: first 2xx after the thaw: {firsts}")
        if any(r is None or r > RECOVERY_SECONDS for r in recovered):
            verdict.fail(f"cycle {cycle}: a replica served no 2xx within {RECOVERY_SECONDS:.0f} s of thawing")
            break
        await asyncio.sleep(3.0)
    return freezes


def check_answers_while_frozen(verdict: Verdict, calls: list[Call], frozen: float, thawed: float) -> None:
    """Requests sent while frozen are answered within ANSWER_BOUND: a 503 or, once thawed, a 2xx;
    /readyz says 503 within READY_BOUND."""
    sent = [c for c in calls if frozen <= c.started < thawed and c.kind not in ("healthz", "readyz")]
    slow = [c for c in sent if c.latency > ANSWER_BOUND + (c.kind == "claim") * 20]  # claims long-poll
    early = [c for c in sent if c.status and c.status < 300 and c.ended < thawed]
    worst = max((c.latency for c in sent if c.kind != "claim"), default=0.0)
    ready = [c for c in calls if frozen + 0.5 <= c.started < thawed and c.kind == "readyz"]
    not_503 = [c for c in ready if c.status != 503 or c.latency > READY_BOUND]
    slowest_ready = max((c.latency for c in ready), default=0.0)
    verdict.note(
        f"frozen at {frozen:.1f}: {len(sent)} requests, {histogram(sent)}, slowest {worst:.2f} s; "
        f"/readyz {histogram(ready)}, slowest {slowest_ready:.2f} s"
    )
    verdict.expect(not slow, f"{len(slow)} requests took more than {ANSWER_BOUND:.0f} s: {slow[:3]}")
    verdict.expect(not early, f"{len(early)} 2xx while frozen: {early[:2]}")
    verdict.expect(not not_503, f"/readyz while frozen: {len(not_503)} not a 503 within {READY_BOUND} s")
