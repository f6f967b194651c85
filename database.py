"""The database's life: one process per SQLite file, migrations at start, connections."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
from loguru import logger
from tortoise import Tortoise
from tortoise.backends.asyncpg.client import AsyncpgDBClient, TransactionWrapper
from tortoise.migrations.api import migrate

from availability import unavailable_cause
from settings import Settings, SettingsError, tortoise_config

# Constants shared by all replicas: they name Pombo's advisory locks in PostgreSQL.
MIGRATION_LOCK = 0x706F6D626F
REPLICA_LOCK = 0x706F6D6270
CONNECT_SECONDS = 5.0
# A transaction waits at most this long for a pooled connection, then its caller gets 503.
ACQUIRE_SECONDS = 2.0
# A rollback that takes longer than this leaves its connection in doubt: it is terminated.
ROLLBACK_SECONDS = 2.0


# The data dir holds the secret, the first admin token and the database: the server's user only.
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def prepare_storage(settings: Settings) -> None:
    """Create the data dir, and prove the SQLite file can be written, or say which setting is wrong.

    Both are private to the server's user: the dir 0700, the database file 0600, created so
    rather than changed after (no moment when another user could open it). SQLite gives its
    -wal and -shm files the database file's mode; ones left by an older start are narrowed too.
    """
    try:
        settings.data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        _private(settings.data_dir, PRIVATE_DIR)
        reason = _unwritable(settings.data_dir)
    except OSError as error:
        reason = error.strerror
    if reason:
        raise SettingsError(f"invalid setting POMBO_DATA_DIR: cannot write to {settings.data_dir}: {reason}")
    path = settings.sqlite_path
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # SQLite writes beside its file too (the WAL and its index).
        reason = _unwritable(path.parent)
        if not reason:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
            for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                _private(file, PRIVATE_FILE)
            sqlite3.connect(path).close()
            reason = _unwritable(path)
    except (OSError, sqlite3.Error) as error:
        reason = getattr(error, "strerror", None) or str(error)
    if reason:
        raise SettingsError(f"invalid setting POMBO_DATABASE_URL: cannot write {path}: {reason}")


def _private(path: Path, mode: int) -> None:
    """`path` narrowed to `mode`, if it exists and is ours to change (else as it was, with a warning)."""
    try:
        if path.stat().st_mode & 0o777 & ~mode:
            path.chmod(mode)
    except PermissionError:
        logger.warning("cannot make {} private (mode {:o}): it belongs to another user", path, mode)
    except OSError:
        pass  # missing, or a read-only mount: _unwritable says so


def _unwritable(path: Path) -> str | None:
    """Why `path` cannot be written, if it cannot: a read-only mount refuses even root."""
    if os.access(path, os.W_OK):
        return None
    return "read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "permission denied"


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


async def prepare_database(settings: Settings) -> None:
    """The database exists (created when PostgreSQL lets us) and its schema is up to date."""
    try:
        if not settings.is_sqlite:
            await _create_if_missing(settings.database.split("?")[0])
        await apply_migrations(settings)
    except Exception as error:
        if unavailable_cause(error) is None:
            raise
        where = urlsplit(settings.database).hostname or settings.database
        raise SettingsError(f"cannot use the database at {where} (POMBO_DATABASE_URL): {error}") from None


async def _create_if_missing(url: str) -> None:
    try:
        connection = await asyncpg.connect(url, timeout=CONNECT_SECONDS)
    except asyncpg.InvalidCatalogNameError:
        await _create(url)
    else:
        await connection.close()


async def _create(url: str) -> None:
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    # The maintenance database every PostgreSQL has; the same user, who may be allowed to create.
    connection = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")), timeout=CONNECT_SECONDS)
    try:
        await connection.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
        logger.info("created the database {}", name)
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        pass  # another replica, starting at the same time (its CREATE may still be committing)
    except asyncpg.InsufficientPrivilegeError:
        raise SettingsError(
            f"invalid setting POMBO_DATABASE_URL: the database {name!r} does not exist "
            f"and {parts.username!r} may not create it"
        ) from None
    finally:
        await connection.close()


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


@asynccontextmanager
async def pg_transaction(client: AsyncpgDBClient) -> AsyncIterator[TransactionWrapper]:
    """A transaction on one of the pool's connections, terminated rather than handed back in doubt.

    Not Tortoise's `in_transaction`: when handing its connection back to asyncpg's pool fails
    (a connection lost mid-transaction: "cannot switch to state 15", asyncpg issue 784), it
    leaves the task's context pointing at the released connection, and a long-lived task (the
    writer) then fails every transaction until the process restarts. Here the task's context is
    never touched, and a connection whose state is unknown is terminated, which also gives its
    slot back to the pool; the next acquire connects afresh.
    """
    pool = await _pool_of(client)
    connection = await pool.acquire(timeout=ACQUIRE_SECONDS)
    wrapper = TransactionWrapper(client)
    wrapper._connection = connection
    clean = False
    try:
        await wrapper.begin()
        yield wrapper
        await wrapper.commit()
        clean = True
    except BaseException as error:
        # A server that let a statement time out would let the rollback time out too.
        clean = not isinstance(error, TimeoutError) and await _rolled_back(wrapper)
        raise
    finally:
        await _hand_back(pool, connection, clean)


async def _pool_of(client: AsyncpgDBClient) -> Any:
    if client._pool is None:
        async with client._pool_init_lock:
            if client._pool is None:
                await client.create_connection(with_db=True)
    return client._pool


async def _rolled_back(wrapper: TransactionWrapper) -> bool:
    """Whether the transaction was rolled back and its connection is fit for reuse.

    A connection lost mid-transaction may already be back in the pool (asyncpg releases it as it
    closes), and then even asking whether it is closed raises.
    """
    try:
        if wrapper._finalized or wrapper._connection.is_closed():
            return False
        await asyncio.wait_for(wrapper.rollback(), ROLLBACK_SECONDS)
    except Exception:  # noqa: BLE001 - any doubt about the connection: it is terminated
        return False
    return True


async def _hand_back(pool: Any, connection: Any, clean: bool) -> None:
    try:
        if clean:
            # A release whose reset fails terminates the connection itself, then raises.
            await pool.release(connection)
        else:
            connection.terminate()
    except Exception as error:  # noqa: BLE001 - the connection is gone either way; its slot is free
        logger.debug("a connection could not be handed back ({}); it was terminated", error)
