"""SQLite on a tmpfs that fills up, then gets its space back: 503s while full, a sound database,
exactly the 2xx publishes stored, a 2xx within 1 s of space returning, and a quiet log."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import unique

from .checks import (
    Verdict,
    check_consumption,
    check_drained,
    check_exact_store,
    check_healthz,
    check_no_500,
    check_published,
    check_subscriber,
    check_unavailable_answers,
    first_success_after,
    histogram,
    is_ready,
    note_peak_rss,
    read_log,
    readyz_between,
    says_down,
    show,
    stored_messages,
)
from .load import Call, Crew, Publisher, Replicas, Subscriber, Worker, drained, poll_health
from .services import Tmpfs

FULL_SECONDS = float(os.environ.get("POMBO_FAULTS_FULL_SECONDS", "4"))
FIRST_FAILURE_WITHIN = 30.0  # free pages and WAL room may absorb some writes after the fill
BACK_WITHIN = 1.0
MAX_LOG_LINES = 20
# A claim's ends with the traces of the messages it handed out.
ACCESS_LINE = re.compile(r"\| (GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) /\S* \d{3} [\d.]+ms( traces \S+)?$")

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


async def test_sqlite_disk_full_then_space_back(make_server: Any, small_tmpfs: Tmpfs) -> None:
    database = small_tmpfs.root / "pombo.sqlite3"
    server = make_server(database_url=f"sqlite://{database}", heartbeat_seconds="2", sweep_seconds="0.5")
    server.start()
    verdict = Verdict(f"SQLite disk full on a {small_tmpfs.size_mib} MiB tmpfs, then space back")
    queue = unique("full")
    async with Replicas([server]) as one:
        response = await one.call("setup", 0, "POST", "/api/v1/queues", json={"name": queue})
        assert response is not None and response.status_code == 201, response
        publishers = [
            Publisher(one, queue, f"p{i}", interval=0.01, pad=4000, give_up_after=60) for i in range(2)
        ]
        subscriber, worker = Subscriber(one, queue), Worker(one, queue, visibility=5.0)
        stop_publishing, stop_working = asyncio.Event(), asyncio.Event()
        background = Crew()
        background.start(poll_health(one), subscriber.run())
        publishing = [asyncio.create_task(p.run(stop_publishing)) for p in publishers]
        working = asyncio.create_task(worker.run(stop_working))
        try:
            await asyncio.sleep(2)
            log_from = server.log_path.stat().st_size
            filled_at, filled = time.monotonic(), await asyncio.to_thread(small_tmpfs.fill)
            failed_at = await first_failure(one.calls, filled_at)
            verdict.note(
                f"filled {filled / 2**20:.1f} MiB; first failed publish {_after(failed_at, filled_at)}"
            )
            await asyncio.sleep(FULL_SECONDS)
            freed_at = time.monotonic()
            await asyncio.to_thread(small_tmpfs.give_back)
            await asyncio.sleep(5)
            log_to = server.log_path.stat().st_size
            stop_publishing.set()
            await asyncio.gather(*publishing)
            counts = await drained(one, queue, timeout=30)
            check_drained(verdict, counts, 30)
            stop_working.set()
            await working
            log = await read_log(one, queue)
            head = log[-1]["seq"] if log else 0
            await subscriber.reach(head, timeout=15)
        finally:
            stop_publishing.set()
            stop_working.set()
            await background.stop()
    note_peak_rss(verdict, [server])  # before it stops
    exit_code = server.stop()
    stored = await stored_messages(f"sqlite://{database}", queue)
    calls = one.calls
    check_full_episode(verdict, calls, filled_at, failed_at, freed_at)
    check_log_lines(verdict, server.log_path, log_from, log_to)
    verdict.expect(exit_code in (0, -15), f"the server exited {exit_code} on SIGTERM after the episode")
    sound = integrity(database)
    verdict.note(f"PRAGMA integrity_check: {sound}")
    verdict.expect(sound == "ok", f"PRAGMA integrity_check said {sound!r}")
    check_published(verdict, publishers, stored)
    check_exact_store(verdict, publishers, stored)
    published_ids = {p.message_id for publisher in publishers for p in publisher.published.values()}
    check_subscriber(verdict, "subscriber", subscriber, head, published_ids)
    check_consumption(verdict, log, stored)
    check_no_500(verdict, calls)
    check_unavailable_answers(verdict, calls)
    check_healthz(verdict, calls)
    verdict.note(f"all calls: {histogram(calls)}")
    verdict.conclude()


async def first_failure(calls: list[Call], since: float) -> float | None:
    """When the first publish sent after `since` failed (None if none did within the limit)."""
    deadline = since + FIRST_FAILURE_WITHIN
    while time.monotonic() < deadline:
        failed = [
            c.started
            for c in calls
            if c.kind == "publish" and c.started >= since and not (c.status and c.status < 300)
        ]
        if failed:
            return min(failed)
        await asyncio.sleep(0.05)
    return None


def check_full_episode(
    verdict: Verdict, calls: list[Call], filled_at: float, failed_at: float | None, freed_at: float
) -> None:
    if failed_at is None:
        verdict.fail(f"no publish failed within {FIRST_FAILURE_WITHIN:.0f} s of the disk filling up")
        return
    full = [c for c in calls if c.kind == "publish" and failed_at <= c.started < freed_at]
    bad = [c for c in full if c.status != 503 and not (c.status and c.status < 300)]
    verdict.note(f"publishes while full: {histogram(full)}")
    verdict.expect(any(c.status == 503 for c in full), f"no 503 while the disk was full: {histogram(full)}")
    verdict.expect(not bad, f"{len(bad)} publishes while full answered neither 503 nor 2xx: {histogram(bad)}")
    back = first_success_after(calls, 0, freed_at, {"publish"})
    verdict.note(f"first 2xx publish after space came back: {_after(back, freed_at)}")
    verdict.expect(
        back is not None and back - freed_at < BACK_WITHIN,
        f"the first 2xx after space came back came {_after(back, freed_at)} (expected < {BACK_WITHIN:.0f} s)",
    )
    down = readyz_between(calls, 0, failed_at + 0.5, freed_at)
    not_down = [c for c in down if not says_down(c)]
    verdict.expect(
        not not_down,
        f"/readyz while full was not 503 with database/writer down: "
        f"{len(not_down)} of {len(down)}, e.g. {show(not_down[:1])}",
    )
    if back is not None:
        after = readyz_between(calls, 0, back + 1.0, float("inf"))
        not_ready = [c for c in after if not is_ready(c)]
        verdict.expect(
            not not_ready,
            f"/readyz from 1 s after the first 2xx was not 200 ready: {len(not_ready)} of {len(after)}, "
            f"e.g. {show(not_ready[:1])}",
        )


def check_log_lines(verdict: Verdict, log_path: Path, start: int, end: int) -> None:
    """Lines the server wrote about the episode, not counting access lines (tracebacks count)."""
    with log_path.open("rb") as log:
        log.seek(start)
        text = log.read(end - start).decode(errors="replace")
    lines = [line for line in text.splitlines() if line.strip() and not ACCESS_LINE.search(line)]
    verdict.note(f"the episode logged {len(lines)} non-access lines")
    verdict.expect(
        len(lines) < MAX_LOG_LINES,
        f"the episode logged {len(lines)} non-access lines (expected < {MAX_LOG_LINES}); first: "
        + " / ".join(line[:160] for line in lines[:4]),
    )


def integrity(database: Path) -> str:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def _after(at: float | None, since: float) -> str:
    return "never" if at is None else f"{at - since:.2f} s after"
