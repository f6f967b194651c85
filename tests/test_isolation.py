"""Housekeeping queue by queue, on a real SQLite server: one queue that cannot be swept stops no
other queue's backlog alerts or retention, and its failure is logged once, not at every tick."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import Server, sql, unique

# Stored before the API bounded it (SQLite kept whatever it was given): more seconds than a
# `timedelta` holds, so the arithmetic of both chores fails for this queue.
BEYOND_DATETIME = 10**15


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A SQLite server whose sweeper ticks every 0.2 s and applies retention every 0.5 s."""
    settings = {"POMBO_SWEEP_SECONDS": "0.2", "POMBO_RETENTION_SWEEP_SECONDS": "0.5"}
    server = Server(tmp_path_factory.mktemp("isolation"), settings).start()
    yield server
    server.stop()


async def queue_with(http: httpx.AsyncClient, **settings: int) -> str:
    name = unique()
    response = await http.post("/api/v1/queues", json={"name": name, **settings})
    assert response.status_code == 201, response.text
    published = await http.post(f"/api/v1/queues/{name}/messages", json={"body": "waiting"})
    assert published.status_code == 201, published.text
    return name


async def backlog_alerts(http: httpx.AsyncClient, queue: str) -> int:
    page = (await http.get("/api/v1/notifications", params={"type": "queue.backlog", "limit": 200})).json()
    return sum(1 for note in page["items"] if note["queue"] == queue)


async def pending(http: httpx.AsyncClient, queue: str) -> int:
    return int((await http.get(f"/api/v1/queues/{queue}/messages")).json()["total"])


async def test_a_queue_that_cannot_be_swept_stops_no_other_queue(quick: Server) -> None:
    async with quick.client() as http:
        broken = await queue_with(http, alert_after=1, retention_seconds=1)
        await sql(
            quick,
            "UPDATE queues SET alert_after = ?, retention_seconds = ? WHERE name = ?",
            BEYOND_DATETIME,
            BEYOND_DATETIME,
            broken,
        )
        watched = await queue_with(http, alert_after=1)
        short_lived = await queue_with(http, retention_seconds=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if await backlog_alerts(http, watched) and not await pending(http, short_lived):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # five more ticks, two more retention sweeps
        assert await backlog_alerts(http, watched) == 1
        assert await pending(http, short_lived) == 0
        assert (await backlog_alerts(http, broken), await pending(http, broken)) == (0, 1)
    log = quick.log()
    assert log.count(f"the backlog check of queue '{broken}' failed") == 1, log[-3000:]
    assert log.count(f"retention in queue '{broken}' failed") == 1, log[-3000:]
