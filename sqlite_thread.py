"""The SQLite writer's own connection on a thread of its own: a whole transaction in one trip.

Through aiosqlite every statement is a trip to its thread and back, and each return waits its
turn on the busy event loop: a group commit made five of them. Here the writer's transaction
(its operations, their ORM queries, the commit) runs on this thread as one call. Those
operations are coroutines that await nothing but the database, and on this connection every
such await completes at once, so each transaction is driven to its end without an event loop.
The other connection, Tortoise's, keeps serving reads; in WAL mode they see each commit as soon
as it is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.sqlite.client import SqliteClient, SqliteTransactionWrapper

T = TypeVar("T")
Transaction = Callable[[BaseDBAsyncClient], Coroutine[Any, Any, T]]


class SqliteThread:
    """Runs transactions one at a time on one connection, opened like Tortoise's own."""

    def __init__(self, client: SqliteClient) -> None:
        self._client = client
        # Never run: Tortoise gathers a save's signal listeners, and even none needs a current loop.
        self._loop = asyncio.new_event_loop()
        self._executor = ThreadPoolExecutor(1, "pombo-writer", asyncio.set_event_loop, (self._loop,))
        self._db: sqlite3.Connection | None = None

    async def run(self, transaction: Transaction[T]) -> T:
        """`transaction(conn)` inside BEGIN … COMMIT on this thread; rolled back if it raises."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, transaction)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._executor.shutdown()

    def _run(self, transaction: Transaction[T]) -> T:
        conn = SqliteTransactionWrapper(self._client)
        conn._connection = _Immediate(self._connect())  # type: ignore[assignment]
        try:
            return run_to_end(_in_transaction(conn, transaction))
        except BaseException:
            self._discard_in_doubt()
            raise

    def _discard_in_doubt(self) -> None:
        """A connection still inside a transaction after its rollback (a full or failing disk) is
        closed: the next transaction opens a fresh one."""
        if self._db is not None and self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self._client.filename, isolation_level=None)
            db.row_factory = sqlite3.Row
            for pragma, value in self._client.pragmas.items():
                db.execute(f"PRAGMA {pragma}={value}")
            self._db = db
        return self._db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._loop.close()


async def _in_transaction(conn: SqliteTransactionWrapper, transaction: Transaction[T]) -> T:
    await conn._connection.execute("BEGIN IMMEDIATE")
    try:
        result = await transaction(conn)
    except BaseException:
        # A rollback that fails too (the disk) must not hide why the transaction failed.
        with contextlib.suppress(Exception):
            await conn.rollback()
        raise
    await conn.commit()
    return result


def run_to_end(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine whose every await completes at once; an error if one would wait."""
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("a SQLite transaction awaited something other than its database")


class _Immediate:
    """The part of aiosqlite's connection that Tortoise uses, done at once on this thread."""

    __slots__ = ("_db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @property
    def total_changes(self) -> int:
        return self._db.total_changes

    async def execute(self, sql: str, parameters: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, tuple(parameters or ()))

    async def execute_fetchall(self, sql: str, parameters: Iterable[Any] = ()) -> list[Any]:
        return self._db.execute(sql, tuple(parameters or ())).fetchall()

    async def execute_insert(self, sql: str, parameters: Iterable[Any] = ()) -> tuple[int | None]:
        return (self._db.execute(sql, tuple(parameters or ())).lastrowid,)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> sqlite3.Cursor:
        return self._db.executemany(sql, rows)

    async def executescript(self, script: str) -> sqlite3.Cursor:
        return self._db.executescript(script)

    async def commit(self) -> None:
        self._db.commit()

    async def rollback(self) -> None:
        self._db.rollback()
