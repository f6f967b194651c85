"""Consistent copies of the SQLite database while the service runs, and putting one back.

A copy is SQLite's online backup of one read transaction: in WAL mode a reader never blocks the
writer, so publishing goes on while the pages are copied, and the copy is the database as it
was when the copy began. It is written beside its target and renamed into place, so a
half-written copy never carries the target's name. PostgreSQL has `pg_dump` and `pg_restore`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from loguru import logger

from database import single_process
from settings import Settings, SettingsError

BACKUP_DIR = "backups"
# A table every Pombo database has: a file without it is not one of ours.
_OUR_TABLE = "event_logs"


def backup(source: Path, target: Path) -> int:
    """Copy the database at `source` to `target`; returns the copy's size in bytes."""
    partial = target.with_name(f".{target.name}.partial")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # `backups/pombo-$(date +%F).sqlite3`
    partial.unlink(missing_ok=True)
    partial.touch(mode=0o600)  # a copy of the database is as private as the database
    with closing(sqlite3.connect(source)) as reader, closing(sqlite3.connect(partial)) as copy:
        # One step (pages=-1): a stepped copy starts again whenever another connection writes.
        reader.backup(copy, pages=-1)
    _make_durable(partial)
    partial.replace(target)
    return target.stat().st_size


def restore(settings: Settings, source: Path) -> None:
    """Put the copy at `source` in place of the database; refused while a server holds the data dir."""
    target = database_path(settings)
    problem = _not_a_copy(source)
    if problem:
        raise SettingsError(f"cannot restore {source}: {problem}")
    with single_process(settings):  # the lock a running server holds
        for leftover in (target.with_name(f"{target.name}-wal"), target.with_name(f"{target.name}-shm")):
            leftover.unlink(missing_ok=True)  # they belong to the database being replaced
        backup(source, target)


def database_path(settings: Settings) -> Path:
    path = settings.sqlite_path
    if path is None:
        raise SettingsError("backup and restore copy SQLite files; for PostgreSQL use pg_dump and pg_restore")
    return path


class ScheduledBackups:
    """Every `interval` seconds a copy into the data dir's backups/, keeping the newest `keep`."""

    def __init__(self, settings: Settings) -> None:
        self._source = database_path(settings)
        self._folder = settings.data_dir / BACKUP_DIR
        self._interval = settings.backup_interval
        self._keep = settings.backup_keep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._folder.mkdir(mode=0o700, exist_ok=True)
        self._task = asyncio.create_task(self._loop(), name="backups")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await asyncio.to_thread(self.take)
            except (OSError, sqlite3.Error) as error:
                logger.warning("scheduled backup failed: {}", error)

    def take(self) -> Path:
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        target = self._folder / f"pombo-{stamp}.sqlite3"
        size = backup(self._source, target)
        for old in sorted(self._folder.glob("pombo-*.sqlite3"))[: -self._keep]:
            old.unlink(missing_ok=True)
        logger.info("backup written: {} ({:.1f} MiB)", target, size / 2**20)
        return target


def _not_a_copy(source: Path) -> str | None:
    if not source.is_file():
        return "no such file"
    try:
        with closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as db:
            if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                return "the file is damaged (PRAGMA integrity_check)"
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:
        return f"not a SQLite database ({error})"
    return None if _OUR_TABLE in tables else "not a Pombo database"


def _make_durable(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
