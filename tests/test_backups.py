"""Backups of the SQLite database while the service runs, scheduled ones, and restoring one."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SECRET, Server

from settings import SettingsError, load_settings


def _main(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "POMBO_DATA_DIR": str(server.data_dir), "POMBO_JWT_SECRET": SECRET}
    command = [sys.executable, str(ROOT / "main.py"), *args]
    return subprocess.run(command, cwd=server.data_dir, env=env, capture_output=True, text=True, timeout=120)


def _messages_in(path: Path) -> set[str]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {row[0] for row in db.execute("SELECT id FROM messages")}


async def _publish_many(server: Server, queue: str, batches: int) -> None:
    async with server.client() as http:
        for _ in range(batches):
            items = [{"body": {"n": n, "pad": "x" * 200}} for n in range(1000)]
            response = await http.post(f"/api/v1/queues/{queue}/messages/batch", json={"items": items})
            assert response.status_code == 201, response.text


@dataclass
class Published:
    id: str
    answered: float  # when its 2xx came back
    took: float


async def _publish_timed(server: Server, queue: str, until: asyncio.Event) -> list[Published]:
    published = []
    async with server.client() as http:
        while not until.is_set():
            began = time.monotonic()
            response = await http.post(f"/api/v1/queues/{queue}/messages", content="during")
            assert response.status_code == 201, response.text
            now = time.monotonic()
            published.append(Published(response.json()["id"], now, now - began))
    return published


async def test_a_backup_while_publishing_is_consistent_and_barely_slows_publishes(
    make_server: Any, tmp_path: Path
) -> None:
    server = make_server().start()
    await _publish_many(server, "big", 30)
    done = asyncio.Event()
    publishing = asyncio.create_task(_publish_timed(server, "small", done))
    await asyncio.sleep(1.0)
    began = time.monotonic()
    copied = await asyncio.to_thread(_main, server, "backup", str(tmp_path / "copy.sqlite3"))
    finished = time.monotonic()
    await asyncio.sleep(0.5)
    done.set()
    published = await publishing
    assert copied.returncode == 0, copied.stderr
    stored = _messages_in(tmp_path / "copy.sqlite3")
    assert len(stored) >= 30_000
    assert {p.id for p in published if p.answered < began} <= stored
    assert (tmp_path / "copy.sqlite3").stat().st_mode & 0o077 == 0
    quiet = [p.took for p in published if p.answered < began]
    busy = [p.took for p in published if began <= p.answered - p.took and p.answered <= finished]
    print(f"\npublish p50/max {_ms(quiet)} quiet, {_ms(busy)} during a backup ({copied.stdout.strip()})")
    assert busy and max(busy) < 0.5, _ms(busy)


def _ms(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    return f"{ordered[len(ordered) // 2] * 1000:.1f}/{ordered[-1] * 1000:.0f} ms ({len(ordered)})"


async def test_a_backup_into_a_folder_not_made_yet_makes_it(make_server: Any, tmp_path: Path) -> None:
    server = make_server().start()
    await _publish_many(server, "few", 1)
    target = tmp_path / "backups" / "2026" / "pombo.sqlite3"  # as the README's `backups/pombo-$(date +%F)`
    copied = await asyncio.to_thread(_main, server, "backup", str(target))
    assert copied.returncode == 0, copied.stderr
    assert len(_messages_in(target)) >= 1_000
    assert target.parent.stat().st_mode & 0o077 == 0


async def test_restore_is_refused_while_the_server_runs_and_puts_the_copy_back_after(
    make_server: Any, tmp_path: Path
) -> None:
    server = make_server().start()
    await _publish_many(server, "q", 1)
    assert _main(server, "backup", str(tmp_path / "copy.sqlite3")).returncode == 0
    await _publish_many(server, "q", 1)  # after the copy: gone once it is restored
    refused = _main(server, "restore", str(tmp_path / "copy.sqlite3"))
    assert refused.returncode == 2 and "another Pombo process uses" in refused.stderr, refused.stderr
    server.stop()
    restored = _main(server, "restore", str(tmp_path / "copy.sqlite3"))
    assert restored.returncode == 0, restored.stderr
    server.start()
    async with server.client() as http:
        queue = (await http.get("/api/v1/queues/q")).json()
    assert queue["messages"]["pending"] == 1000, queue


def test_restore_refuses_a_file_that_is_not_a_pombo_database(make_server: Any, tmp_path: Path) -> None:
    server = make_server()
    server.data_dir.mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("not a database")
    with sqlite3.connect(tmp_path / "other.sqlite3") as other:
        other.execute("CREATE TABLE t (x)")
    for name, problem in (("notes.txt", "not a SQLite database"), ("other.sqlite3", "not a Pombo database")):
        refused = _main(server, "restore", str(tmp_path / name))
        assert refused.returncode == 2 and problem in refused.stderr, refused.stderr
    assert not (server.data_dir / "pombo.sqlite3").exists()


async def test_scheduled_backups_keep_the_newest_few(make_server: Any) -> None:
    server = make_server(backup_interval="0.4", backup_keep="2").start()
    await _publish_many(server, "q", 1)
    folder = server.data_dir / "backups"
    deadline = time.monotonic() + 20
    while server.log().count("backup written") < 4:  # so the oldest were pruned twice
        assert time.monotonic() < deadline, server.log()[-1500:]
        await asyncio.sleep(0.2)
    copies = sorted(folder.glob("pombo-*.sqlite3"))
    assert len(copies) == 2, copies
    assert all(len(_messages_in(copy)) == 1000 for copy in copies)


def test_scheduled_backups_are_refused_on_postgres() -> None:
    with pytest.raises(SettingsError, match="pg_dump"):
        load_settings(database_url="postgres://x@h/d", jwt_secret=SECRET, backup_interval=60)
