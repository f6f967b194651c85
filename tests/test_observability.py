"""The log a real server writes: access lines batched a moment, everything else at once."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

from conftest import ROOT

from observability import FLUSH_SECONDS


async def test_access_lines_arrive_within_the_flush_interval_with_their_request_id(make_server: Any) -> None:
    server = make_server().start()
    async with server.client() as http:
        sent = time.monotonic()
        response = await http.get("/api/v1/me", headers={"X-Request-ID": "seen-in-the-log"})
        while not re.search(r"seen-in-the-log \| [0-9a-f]{32} \| GET /api/v1/me 200", server.log()):
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
    assert all(any(f"last-requests-{n} | " in line for line in lines) for n in range(20))
    assert "Finished server process" in lines[-1]


async def test_a_log_file_is_rotated_and_pruned_with_one_json_object_a_line(make_server: Any) -> None:
    server = make_server()
    logs = server.data_dir / "logs"
    server.env |= {
        "POMBO_LOG_FILE": str(logs / "pombo.log"),
        "POMBO_LOG_ROTATION": "4 KB",
        "POMBO_LOG_RETENTION": "2",
        "POMBO_ENVIRONMENT": "production",
    }
    server.start()
    async with server.client() as http:
        for n in range(60):
            await http.get("/healthz", headers={"X-Request-ID": f"rotated-{n}"})
    server.stop()
    files = sorted(logs.iterdir())
    assert logs / "pombo.log" in files and 2 <= len(files) <= 3, files  # the current file and two old
    lines = [line for path in files for line in path.read_text().splitlines()]
    records = [json.loads(line)["record"] for line in lines]
    assert any(r["extra"].get("request_id") == "rotated-59" for r in records)
    assert any(r["name"].startswith("uvicorn") for r in records)  # standard logging, same sink
    assert "rotated-" not in server.log()  # not on stderr as well


def _serve_with_log_file(tmp_path: Any, **settings: str) -> tuple[int, list[str]]:
    """`main.py serve` logging to a file with these settings: its exit status and stderr lines."""
    env = {**os.environ, "POMBO_DATA_DIR": str(tmp_path), "POMBO_LOG_FILE": str(tmp_path / "p.log")}
    env |= {"POMBO_JWT_SECRET": "s" * 40, **settings}
    command = [sys.executable, str(ROOT / "main.py"), "serve"]
    done = subprocess.run(command, env=env, capture_output=True, timeout=60)
    return done.returncode, done.stderr.decode().strip().splitlines()


def test_a_log_rotation_loguru_cannot_read_stops_the_start_in_one_line(tmp_path: Any) -> None:
    status, lines = _serve_with_log_file(tmp_path, POMBO_LOG_ROTATION="now and then")
    assert status == 2
    assert lines == ["pombo: invalid setting POMBO_LOG_ROTATION: Cannot parse rotation from: 'now and then'"]


def test_a_log_retention_loguru_cannot_read_is_named(tmp_path: Any) -> None:
    status, lines = _serve_with_log_file(tmp_path, POMBO_LOG_RETENTION="2 files")
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("pombo: invalid setting POMBO_LOG_RETENTION: "), lines
