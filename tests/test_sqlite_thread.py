"""The writer's own SQLite connection: whole transactions on its thread, seen by Tortoise's reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tortoise import Tortoise, connections
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.sqlite.client import SqliteClient

from models import EventLog
from sqlite_thread import SqliteThread, run_to_end


@pytest.fixture
async def thread(tmp_path: Path) -> AsyncIterator[SqliteThread]:
    url = f"sqlite://{tmp_path / 'pombo.sqlite3'}?journal_mode=WAL&synchronous=FULL&busy_timeout=5000"
    await Tortoise.init(db_url=url, modules={"pombo": ["models"]})
    await Tortoise.generate_schemas()
    client = connections.get("default")
    assert isinstance(client, SqliteClient)
    writer = SqliteThread(client)
    yield writer
    await writer.close()
    await Tortoise.close_connections()


async def test_a_committed_transaction_is_seen_by_tortoises_own_connection(thread: SqliteThread) -> None:
    async def create(conn: BaseDBAsyncClient) -> str:
        row = await EventLog.create(using_db=conn, name="queue:a", last_seq=3)
        return row.name

    assert await thread.run(create) == "queue:a"
    assert await EventLog.filter(name="queue:a").values_list("last_seq", flat=True) == [3]


async def test_a_transaction_that_raises_leaves_nothing(thread: SqliteThread) -> None:
    async def half(conn: BaseDBAsyncClient) -> None:
        await EventLog.create(using_db=conn, name="queue:b", last_seq=1)
        raise ValueError("changed its mind")

    with pytest.raises(ValueError, match="changed its mind"):
        await thread.run(half)
    assert not await EventLog.filter(name="queue:b").exists()


async def test_the_connection_is_opened_with_tortoises_pragmas(thread: SqliteThread) -> None:
    async def pragmas(conn: BaseDBAsyncClient) -> list[dict[str, Any]]:
        return await conn.execute_query_dict("SELECT * FROM pragma_synchronous, pragma_journal_mode")

    assert await thread.run(pragmas) == [{"synchronous": 2, "journal_mode": "wal"}]  # 2 is FULL


def test_run_to_end_refuses_a_coroutine_that_would_wait() -> None:
    async def immediate() -> int:
        return 7

    async def waits() -> None:
        await asyncio.sleep(0)

    assert run_to_end(immediate()) == 7
    with pytest.raises(RuntimeError, match="awaited something"):
        run_to_end(waits())
