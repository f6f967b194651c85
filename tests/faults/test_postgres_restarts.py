"""PostgreSQL stopped 5 s and started again, ten times, under publish + claim + stream load on two
replicas: no replica wedges, outages answer 503 + Retry-After fast, nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import Server, unique

from .checks import (
    RECOVERY_SECONDS,
    Verdict,
    check_healthz,
    histogram,
    is_ready,
    note_peak_rss,
    readyz_between,
    says_down,
    show,
)
from .load import Call, Replicas, create_queues, probe_outage, probe_recovery
from .mixed_load import MixedLoad
from .services import PostgresCluster

CYCLES = int(os.environ.get("POMBO_FAULTS_PG_CYCLES", "10"))
OUTAGE_SECONDS = 5.0
STEADY_SECONDS = 2.0
FAST_503 = 1.0  # an outage's answers come this fast
SETTINGS = {"heartbeat_seconds": "2", "sweep_seconds": "0.5"}


@dataclass(frozen=True)
class Outage:
    cycle: int
    stopping: float  # pg_ctl stop was called
    stopped: float  # PostgreSQL is down
    restarting: float  # pg_ctl start was called
    started: float  # PostgreSQL accepts connections again


pytestmark = [pytest.mark.faults, pytest.mark.timeout(660)]


async def test_postgres_stopped_5s_and_started_ten_times_under_load(
    pg_cluster: PostgresCluster, replicas: Any, pg_fault_url: str
) -> None:
    servers: list[Server] = replicas(2, **SETTINGS)
    pids = [server.process.pid for server in servers if server.process]
    verdict = Verdict(f"PostgreSQL stopped {OUTAGE_SECONDS:.0f} s and started, x{CYCLES}, two replicas")
    queue, probes = unique("pg"), unique("probe")
    async with Replicas(servers) as cluster:
        await create_queues(cluster, queue, probes)
        load = MixedLoad.alternating(cluster, queue)
        async with load:
            await asyncio.sleep(STEADY_SECONDS)
            outages = await run_outages(pg_cluster, cluster, probes, verdict)
            await load.settle(verdict)
    check_outages(verdict, cluster.calls, outages)
    await load.check(verdict, pg_fault_url)
    check_healthz(verdict, cluster.calls)
    alive = [s.process is not None and s.process.poll() is None for s in servers]
    same = [s.process.pid for s in servers if s.process] == pids
    verdict.expect(all(alive) and same, f"a replica exited or was restarted: alive {alive}, same pids {same}")
    verdict.note(f"all calls: {histogram(cluster.calls)}")
    note_peak_rss(verdict, servers)
    verdict.conclude()


async def run_outages(pg: PostgresCluster, cluster: Replicas, probes: str, verdict: Verdict) -> list[Outage]:
    """Stop, probe, start, wait for both replicas to serve 2xx; stop early if one wedges."""
    outages: list[Outage] = []
    for cycle in range(1, CYCLES + 1):
        stopping = time.monotonic()
        stopped = await asyncio.to_thread(pg.stop)
        await probe_outage(cluster, probes, until=stopped + OUTAGE_SECONDS)
        restarting = time.monotonic()
        started = await asyncio.to_thread(pg.start)
        outages.append(Outage(cycle, stopping, stopped, restarting, started))
        recovered = await probe_recovery(cluster, probes, started, RECOVERY_SECONDS)
        verdict.note(
            f"cycle {cycle}: stop took {stopped - stopping:.2f} s, start {started - restarting:.2f} s; "
            f"first 2xx after start: {', '.join(_seconds(r) for r in recovered)}"
        )
        wedged = [n for n, r in enumerate(recovered) if r is None or r > RECOVERY_SECONDS]
        if wedged:
            since = [c for c in cluster.calls if c.started >= started and c.replica in wedged]
            ready = [c for c in since if c.kind == "readyz"]
            verdict.fail(
                f"cycle {cycle}: replica(s) {wedged} served no 2xx within {RECOVERY_SECONDS:.0f} s after "
                f"PostgreSQL came back; their answers since: "
                f"{histogram(c for c in since if c.kind != 'readyz')}, /readyz meanwhile: {histogram(ready)} "
                f"(last: {show(ready[-1:])}); stopped after this cycle"
            )
            break
        await asyncio.sleep(STEADY_SECONDS)
    return outages


def check_outages(verdict: Verdict, calls: list[Call], outages: list[Outage]) -> None:
    for n, outage in enumerate(outages):
        following = outages[n + 1].stopping if n + 1 < len(outages) else float("inf")
        during = [c for c in calls if outage.stopped <= c.started < outage.restarting and c.kind != "readyz"]
        check_outage_answers(verdict, outage, [c for c in during if c.kind != "healthz"])
        for replica in {c.replica for c in calls}:
            check_readiness(verdict, outage, calls, replica, following)


def check_outage_answers(verdict: Verdict, outage: Outage, during: list[Call]) -> None:
    """Requests sent while PostgreSQL was down: 503 + Retry-After within 1 s (a 2xx only once it was back)."""
    slow = [c for c in during if c.status == 503 and c.latency >= FAST_503 + (c.kind == "claim")]
    early = [c for c in during if c.status and c.status < 300 and c.ended < outage.restarting]
    other = [c for c in during if c.status != 503 and not (c.status and c.status < 300)]
    verdict.note(
        f"cycle {outage.cycle} outage: {len(during)} requests, {histogram(during)}, "
        f"slowest 503 {max((c.latency for c in during if c.status == 503), default=0):.3f} s"
    )
    verdict.expect(not slow, f"cycle {outage.cycle}: {len(slow)} 503s took {FAST_503:.0f} s or more")
    verdict.expect(
        not early, f"cycle {outage.cycle}: {len(early)} 2xx while PostgreSQL was down: {show(early[:2])}"
    )
    verdict.expect(
        not other,
        f"cycle {outage.cycle}: {len(other)} outage answers were not 503: "
        f"{histogram(other)} by kind {sorted({(c.kind, c.status) for c in other}, key=str)}",
    )


def check_readiness(verdict: Verdict, outage: Outage, calls: list[Call], replica: int, until: float) -> None:
    """/readyz: 503 (database or writer down) while PostgreSQL is down, 200 ready from 10 s after."""
    down = readyz_between(calls, replica, outage.stopped + 0.5, outage.restarting)
    not_503 = [c for c in down if c.status != 503]
    unnamed = [c for c in down if c.status == 503 and not says_down(c)]
    after = readyz_between(calls, replica, outage.started + RECOVERY_SECONDS, until)
    not_ready = [c for c in after if not is_ready(c)]
    where = f"cycle {outage.cycle}, replica {replica}"
    verdict.expect(
        not not_503, f"{where}: /readyz during the outage answered {histogram(not_503)} ({len(down)} polls)"
    )
    verdict.expect(
        not unnamed, f"{where}: /readyz 503 did not say database or writer down: {show(unnamed[:1])}"
    )
    verdict.expect(
        not not_ready,
        f"{where}: /readyz from 10 s after the restart was not 200 ready with database ok: "
        f"{len(not_ready)} of {len(after)}, e.g. {show(not_ready[:1])}",
    )


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"
