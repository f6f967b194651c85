"""Rows the writer inserts itself, however many, on the connection the writer uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tortoise import Tortoise, connections
from tortoise.backends.asyncpg.client import AsyncpgDBClient
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.sqlite.client import SqliteClient

from database import pg_transaction
from models import Message, NewMessage, Priority, Queue, new_id
from sqlite_thread import SqliteThread
from writer import ROWS_PER_INSERT, Tx, insert_rows

ROWS = 2 * ROWS_PER_INSERT + 345  # two full statements and a short one


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path / 'pombo.sqlite3'}?journal_mode=WAL&synchronous=FULL"
    else:
        url = request.getfixturevalue("pg_url")
    await Tortoise.init(db_url=url, modules={"pombo": ["models"]})
    await Tortoise.generate_schemas()
    yield request.param
    await Tortoise.close_connections()


def _queue(at: datetime) -> dict[str, Any]:
    """A whole row: the writer's inserts, like SQL's, fill in no model defaults."""
    defaults = {name: Queue._meta.fields_map[name].default for name in Queue._meta.db_fields}
    return defaults | {"id": 1, "name": "a", "owner": "tester", "created_at": at, "updated_at": at}


def _message(n: int, at: datetime) -> dict[str, Any]:
    body = f'{{"n":{n}}}'
    row = NewMessage(new_id(), 1, body, "application/json", "", Priority.normal, {}, None, at, at, at)
    return vars(row)


async def _insert_as_the_writer(rows: list[dict[str, Any]], at: datetime) -> None:
    async def insert(conn: BaseDBAsyncClient) -> None:
        tx = Tx(conn, at)
        await insert_rows(tx, Queue, [_queue(at)])
        await insert_rows(tx, Message, rows)

    client = connections.get("default")
    if isinstance(client, SqliteClient):  # the writer's own connection and thread, as in service
        thread = SqliteThread(client)
        try:
            await thread.run(insert)
        finally:
            await thread.close()
    else:
        assert isinstance(client, AsyncpgDBClient)
        async with pg_transaction(client) as conn:
            await insert(conn)


async def test_more_rows_than_one_statement_holds_are_all_stored(database: str) -> None:
    """Messages have the most columns: a statement of ROWS_PER_INSERT of them must be allowed."""
    at = datetime(2026, 11, 24, 4, 0, 0, 123456, tzinfo=UTC)
    rows = [_message(n, at) for n in range(ROWS)]
    await _insert_as_the_writer(rows, at)
    stored = await Message.all().order_by("id")
    assert [m.id for m in stored] == [row["id"] for row in rows]
    last = stored[-1]
    assert (last.body, last.queue_id, last.priority, last.headers) == (
        f'{{"n":{ROWS - 1}}}',
        1,
        Priority.normal,
        {},
    )
    assert last.created_at == at and last.idempotency_key is None
