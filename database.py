"""The database's life: one process per SQLite file, migrations at start, connections."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import asyncpg
from tortoise import Tortoise
from tortoise.migrations.api import migrate

from settings import Settings, SettingsError, tortoise_config

# Constants shared by all replicas: they name Pombo's advisory locks in PostgreSQL.
MIGRATION_LOCK = 0x706F6D626F
REPLICA_LOCK = 0x706F6D6270


def prepare_storage(settings: Settings) -> None:
    """Create the data dir, and prove the SQLite file can be opened, or say which setting is wrong."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SettingsError(
            f"invalid setting POMBO_DATA_DIR: cannot create {settings.data_dir}: {error.strerror}"
        ) from None
    path = settings.database.removeprefix("sqlite://").split("?")[0]
    if not settings.is_sqlite or path == ":memory:":
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        sqlite3.connect(path).close()
    except (OSError, sqlite3.Error) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise SettingsError(f"invalid setting POMBO_DATABASE_URL: cannot open {path}: {reason}") from None


@contextmanager
def single_process(settings: Settings) -> Iterator[None]:
    """SQLite serves one process: a second one on the same data dir refuses to start."""
    prepare_storage(settings)
    if not settings.is_sqlite:
        yield
        return
    descriptor = os.open(settings.data_dir / "pombo.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise SettingsError(
            f"another Pombo process uses {settings.data_dir}: SQLite serves one process "
            "(set POMBO_DATABASE_URL to PostgreSQL and POMBO_REDIS_URL to run several)"
        ) from None
    try:
        yield
    finally:
        os.close(descriptor)


async def apply_migrations(settings: Settings) -> None:
    """Bring the schema up to date; replicas starting together take turns."""
    prepare_storage(settings)
    async with _migration_lock(settings):
        try:
            await migrate(config=tortoise_config(settings))
        finally:
            await Tortoise.close_connections()


@asynccontextmanager
async def replicas_share_a_broker(settings: Settings) -> AsyncIterator[None]:
    """On PostgreSQL, a process with the in-process broker must be the only one.

    Replicas with Redis hold a shared lock, one without Redis an exclusive one, so mixing them,
    or starting two without Redis, is refused instead of silently splitting the streams.
    """
    if settings.is_sqlite:
        yield
        return
    connection = await asyncpg.connect(settings.database.split("?")[0])
    try:
        kind = "pg_try_advisory_lock_shared" if settings.redis_url else "pg_try_advisory_lock"
        if not await connection.fetchval(f"SELECT {kind}($1)", REPLICA_LOCK):
            raise SettingsError(
                "another Pombo process uses this PostgreSQL database without Redis: "
                "set POMBO_REDIS_URL on every replica"
            )
        yield
    finally:
        await connection.close()


@asynccontextmanager
async def _migration_lock(settings: Settings) -> AsyncIterator[None]:
    if settings.is_sqlite:
        yield
        return
    connection = await asyncpg.connect(settings.database.split("?")[0])
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        yield
    finally:
        await connection.close()
