"""Which failures mean "unavailable", the episodes they make, and a transaction that heals itself.

Every error here is a real one, raised by SQLite, PostgreSQL or the network.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import PG_ADMIN_URL, free_port, need_service
from loguru import logger
from tortoise import Tortoise, connections
from tortoise.backends.asyncpg.client import AsyncpgDBClient
from tortoise.exceptions import OperationalError

from availability import PROBE_SECONDS, Availability, unavailable_cause
from database import pg_transaction


def _sqlite_error(path: Path | str, *statements: str, uri: bool = False) -> sqlite3.Error:
    db = sqlite3.connect(path, uri=uri, isolation_level=None)
    try:
        for statement in statements:
            db.execute(statement)
    except sqlite3.Error as error:
        return error
    finally:
        db.close()
    raise AssertionError("no error")


def _as_tortoise_raises(error: sqlite3.Error) -> OperationalError:
    """Tortoise's SQLite client re-raises driver errors as its own, inside the `except`."""
    try:
        try:
            raise error
        except sqlite3.Error as driver_error:
            raise OperationalError(driver_error) from None
    except OperationalError as wrapped:
        return wrapped


def test_a_full_sqlite_database_is_unavailable_also_through_tortoise(tmp_path: Path) -> None:
    # max_page_count caps the file as a full disk would: SQLite answers SQLITE_FULL.
    full = _sqlite_error(
        tmp_path / "full.sqlite3",
        "CREATE TABLE t (x BLOB)",
        "PRAGMA max_page_count = 4",
        *["INSERT INTO t VALUES (randomblob(3000))"] * 8,
    )
    assert "full" in str(full)
    assert unavailable_cause(full) == "database"
    assert unavailable_cause(_as_tortoise_raises(full)) == "database"


def test_a_read_only_sqlite_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "ro.sqlite3"
    _sqlite_error(path, "CREATE TABLE t (x)", "SELECT nothing FROM t")
    read_only = _sqlite_error(f"file:{path}?mode=ro", "INSERT INTO t VALUES (1)", uri=True)
    assert "readonly" in str(read_only)
    assert unavailable_cause(read_only) == "database"


def test_sqlite_errors_of_the_request_itself_are_not_unavailability(tmp_path: Path) -> None:
    path = tmp_path / "bugs.sqlite3"
    duplicate = _sqlite_error(path, "CREATE TABLE u (x UNIQUE)", *["INSERT INTO u VALUES (1)"] * 2)
    syntax = _sqlite_error(path, "SELEC 1")
    assert isinstance(duplicate, sqlite3.IntegrityError) and unavailable_cause(duplicate) is None
    assert unavailable_cause(syntax) is None
    assert unavailable_cause(_as_tortoise_raises(syntax)) is None
    assert unavailable_cause(ValueError("a bug")) is None


@pytest.fixture
async def postgres() -> AsyncIterator[asyncpg.Connection]:
    need_service("PostgreSQL", 5432)
    connection = await asyncpg.connect(PG_ADMIN_URL)
    yield connection
    if not connection.is_closed():
        await connection.close()


async def _error_of(operation: Awaitable[object]) -> BaseException:
    try:
        await operation
    except Exception as error:  # noqa: BLE001 - the error is what is tested
        return error
    raise AssertionError("no error")


async def test_postgres_refusing_or_dropping_connections_is_unavailable(postgres: asyncpg.Connection) -> None:
    refused = await _error_of(asyncpg.connect(host="127.0.0.1", port=free_port(), user="postgres", timeout=2))
    assert unavailable_cause(refused) == "database", repr(refused)
    victim = await asyncpg.connect(PG_ADMIN_URL)
    await postgres.execute("SELECT pg_terminate_backend($1)", victim.get_server_pid())
    dropped = await _error_of(victim.execute("SELECT 1"))
    assert unavailable_cause(dropped) == "database", repr(dropped)


async def test_postgres_errors_of_the_request_itself_are_not_unavailability(
    postgres: asyncpg.Connection,
) -> None:
    syntax = await _error_of(postgres.execute("SELEC 1"))
    wrong_type = await _error_of(postgres.fetchval("SELECT $1::int", "seven"))
    assert unavailable_cause(syntax) is None, repr(syntax)
    assert unavailable_cause(wrong_type) is None, repr(wrong_type)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO", format="{level} {message}")
    yield lines
    logger.remove(sink)


async def test_an_episode_logs_once_when_it_begins_and_once_when_it_ends(log_lines: list[str]) -> None:
    availability = Availability()
    down = OSError("Connection refused")
    for _ in range(50):
        availability.failed("database", down)
        availability.refused()
    availability.recovered("database")  # one success, just after failures, proves little
    assert availability.is_down("database")
    await asyncio.sleep(PROBE_SECONDS)
    availability.recovered("database")
    availability.recovered("database")
    assert not availability.is_down("database")
    assert len(log_lines) == 2, log_lines
    assert log_lines[0].startswith("WARNING database unavailable (OSError: Connection refused)")
    assert log_lines[1].startswith("INFO database available again after")
    assert "50 requests got 503" in log_lines[1]


async def test_while_down_a_probe_ends_the_episode_without_any_request(log_lines: list[str]) -> None:
    availability, answers = Availability(), [False, False, True]

    async def probe() -> None:
        if not answers.pop(0):
            raise OSError("Connection refused")

    availability.watch("database", probe)
    availability.failed("database", OSError("Connection refused"))
    await asyncio.sleep(PROBE_SECONDS * 3 + 0.3)
    assert not availability.is_down("database")
    assert answers == []
    assert [line.split()[0] for line in log_lines] == ["WARNING", "INFO"]
    await availability.close()


@pytest.fixture
async def tortoise_on_postgres(pg_url: str) -> AsyncIterator[AsyncpgDBClient]:
    await Tortoise.init(db_url=f"{pg_url}?minsize=1&maxsize=2", modules={"pombo": ["models"]})
    client = connections.get("default")
    assert isinstance(client, AsyncpgDBClient)
    yield client
    await Tortoise.close_connections()


async def test_a_transaction_whose_connection_dies_leaves_nothing_broken_behind(
    tortoise_on_postgres: AsyncpgDBClient, postgres: asyncpg.Connection
) -> None:
    client = tortoise_on_postgres
    for _ in range(4):  # more deaths than the pool has connections
        with pytest.raises(Exception) as died:
            async with pg_transaction(client) as conn:
                pid = (await conn.execute_query_dict("SELECT pg_backend_pid() AS pid"))[0]["pid"]
                await postgres.execute("SELECT pg_terminate_backend($1)", pid)
                await conn.execute_query("SELECT 1")
        assert unavailable_cause(died.value) == "database", repr(died.value)
        assert connections.get("default") is client  # the task's context was left alone

    # The pool lost no slot: as many transactions as it holds run at once, and commit.
    async def commit(n: int) -> None:
        async with pg_transaction(client) as conn:
            await conn.execute_query(f"CREATE TABLE healed_{n} (x int)")

    await asyncio.wait_for(asyncio.gather(commit(1), commit(2)), 10)
    healed = "SELECT count(*) AS n FROM pg_tables WHERE tablename LIKE 'healed_%'"
    tables = await client.execute_query_dict(healed)
    assert tables[0]["n"] == 2


async def test_successes_do_not_end_an_episode_that_real_work_still_meets(log_lines: list[str]) -> None:
    """A full disk takes the probe's tiny write and refuses a publish: the publishes decide."""
    availability = Availability()

    async def probe() -> None:
        return None

    availability.watch("writer", probe)
    for _ in range(int(PROBE_SECONDS * 3 / 0.05)):
        availability.failed("writer", OSError("database or disk is full"))
        availability.recovered("writer")  # a small write that fitted
        await asyncio.sleep(0.05)
    assert availability.is_down("writer")
    await asyncio.sleep(PROBE_SECONDS * 2 + 0.2)  # the failures stopped: the probe ends it
    assert not availability.is_down("writer")
    assert [line.split()[0] for line in log_lines] == ["WARNING", "INFO"]
    await availability.close()
