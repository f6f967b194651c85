"""The log a real server writes: access lines batched a moment, everything else at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from observability import FLUSH_SECONDS


async def test_access_lines_arrive_within_the_flush_interval_with_their_request_id(make_server: Any) -> None:
    server = make_server().start()
    async with server.client() as http:
        sent = time.monotonic()
        response = await http.get("/api/v1/me", headers={"X-Request-ID": "seen-in-the-log"})
        while "seen-in-the-log | GET /api/v1/me 200" not in server.log():
            assert time.monotonic() - sent < FLUSH_SECONDS + 1.0, server.log()[-1000:]
            await asyncio.sleep(0.02)
    assert response.headers["x-request-id"] == "seen-in-the-log"


async def test_a_server_stopped_by_sigterm_has_written_every_line(make_server: Any) -> None:
    server = make_server().start()
    async with server.client() as http:
        for n in range(20):
            await http.get("/healthz", headers={"X-Request-ID": f"last-requests-{n}"})
    server.stop()  # at once: the last access lines are still waiting for their flush
    lines = server.log().splitlines()
    assert all(any(f"last-requests-{n} |" in line for line in lines) for n in range(20))
    assert "Finished server process" in lines[-1]
