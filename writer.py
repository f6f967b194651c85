"""The single writer: group commit, sequence numbers, and handing events to the broker in order.

Hub operations queue up here. The writer runs whatever is waiting in one transaction, appends
the events they emitted to their logs (one counter bump per log, under that row's lock, so
sequence order is commit order), commits, and only then publishes to the broker and answers.

An operation may raise `ApiError` only before it writes anything: the writer then discards
its events and carries on with the rest of the group. Any other error rolls the whole group
back and each operation is retried in a transaction of its own, so one client's failure never
costs another client its publish. A database that is unavailable (down, restarting, out of
disk) fails the whole group at once with 503, without retries that could only fail again; the
next group tries afresh on a fresh connection.

On a SQLite file the transaction runs on the writer's own connection and thread
(`sqlite_thread.py`), in one trip from the event loop; on PostgreSQL, in one of the pool's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Generic, TypeVar

from loguru import logger
from tortoise import connections
from tortoise.backends.asyncpg.client import AsyncpgDBClient
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.sqlite.client import SqliteClient
from tortoise.fields import Field
from tortoise.models import Model
from tortoise.transactions import in_transaction

from availability import Availability, refusal, unavailable_cause
from broker import Broker
from database import pg_transaction
from errors import ApiError, unavailable
from event_log import Update, utc_text
from models import Event, Queue, utcnow
from sqlite_thread import SqliteThread

T = TypeVar("T")


@dataclass
class _Pending:
    log: str
    type: str
    data: str


@dataclass
class Tx:
    """What an operation sees: the transaction's connection and a way to emit events."""

    conn: BaseDBAsyncClient
    now: datetime
    emitted: list[_Pending] = field(default_factory=list)
    queues: dict[str, Queue] = field(default_factory=dict)
    # Queue rows as committed, kept across transactions when no other process writes them.
    known_queues: dict[str, Queue] | None = None
    deferred: dict[type[Model], list[Mapping[str, Any]]] = field(default_factory=dict)
    updates: list[Update] = field(default_factory=list)

    def insert_later(self, model: type[Model], rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert at the end of the transaction, with every other operation's rows, in one statement.

        Only for rows no later operation of the group reads back. A clash (say, a unique key two
        operations both used) fails the group, and each operation is retried alone.
        """
        self.deferred.setdefault(model, []).extend(rows)

    def emit(self, log: str, type_: str, data: str) -> None:
        self.emitted.append(_Pending(log, type_, data))

    @property
    def is_sqlite(self) -> bool:
        return self.conn.capabilities.dialect == "sqlite"

    def sql(self, text: str) -> str:
        """`?` placeholders, numbered for PostgreSQL (`$n` binds out of order on SQLite)."""
        if self.is_sqlite:
            return text
        parts = text.split("?")
        return parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], start=1))


Operation = Callable[[Tx], Awaitable[T]]


@dataclass
class _Job(Generic[T]):
    operation: Operation[T]
    done: asyncio.Future[T]


class Writer:
    def __init__(self, broker: Broker, max_batch: int, availability: Availability) -> None:
        self._broker = broker
        self._availability = availability
        self._max_batch = max_batch
        self._jobs: asyncio.Queue[_Job[Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # On SQLite this process is the only writer: a queue row read once stays true until one
        # of our own transactions changes it. Any failed group forgets them all.
        self._known_queues: dict[str, Queue] = {}
        self._sqlite: SqliteThread | None = None
        # When a commit last succeeded (the loop's clock): readiness probes only an idle writer.
        self.committed_at = 0.0

    async def run(self, operation: Operation[T]) -> T:
        """Run `operation` in the next group commit; returns after its commit."""
        if self._closing:
            raise unavailable("shutting down")
        job: _Job[T] = _Job(operation, asyncio.get_running_loop().create_future())
        self._jobs.put_nowait(job)
        return await job.done

    async def probe(self) -> None:
        """Commit a write that leaves nothing behind, beside the groups: can a write succeed now?

        A transaction of its own, so it holds no lock while a group's operations take theirs.
        """
        job: _Job[None] = _Job(_probe, asyncio.get_running_loop().create_future())
        await self._transaction([job])
        self.committed_at = time.monotonic()

    def start(self) -> None:
        client = connections.get("default")
        if isinstance(client, SqliteClient) and client.filename != ":memory:":  # a file two can open
            self._sqlite = SqliteThread(client)
        self._task = asyncio.create_task(self._loop(), name="writer")

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        if self._task is not None:
            self._jobs.put_nowait(_Job(_stop, asyncio.get_running_loop().create_future()))
            await self._task
        if self._sqlite is not None:
            await self._sqlite.close()

    async def _loop(self) -> None:
        while True:
            jobs = [await self._jobs.get()]
            while len(jobs) < self._max_batch and not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
            stop = any(job.operation is _stop for job in jobs)
            await self._commit([job for job in jobs if job.operation is not _stop])
            if stop and self._jobs.empty():
                return

    async def _commit(self, jobs: list[_Job[Any]]) -> None:
        if not jobs:
            return
        try:
            outcomes, updates = await self._transaction(jobs)
        except Exception as error:  # noqa: BLE001 - isolate, then report per job
            self._known_queues.clear()  # rolled back: rows changed in memory may not be stored
            if unavailable_cause(error) is not None:
                self._availability.failed("writer", error)
                outcomes, updates = [refusal("database") for _ in jobs], []
            elif len(jobs) > 1:
                for job in jobs:
                    await self._commit([job])
                return
            else:
                logger.opt(exception=error).error("write failed")
                outcomes, updates = [error], []
        else:
            self.committed_at = time.monotonic()
            self._availability.recovered("writer")
        if updates:
            await self._broker.publish(updates)
        for job, outcome in zip(jobs, outcomes, strict=True):
            _settle(job.done, outcome)

    async def _transaction(self, jobs: list[_Job[Any]]) -> tuple[list[Any], list[Update]]:
        client = connections.get("default")
        if isinstance(client, AsyncpgDBClient):
            async with pg_transaction(client) as conn:
                outcomes, tx = await _group(jobs, None, conn)
        elif self._sqlite is None:
            async with in_transaction() as conn:  # an in-memory SQLite database, for tests
                outcomes, tx = await _group(jobs, None, conn)
        else:
            outcomes, tx = await self._sqlite.run(partial(_group, jobs, self._known_queues))
            self._known_queues.update(tx.queues)  # committed
        return outcomes, tx.updates


async def _group(
    jobs: list[_Job[Any]], known_queues: dict[str, Queue] | None, conn: BaseDBAsyncClient
) -> tuple[list[Any], Tx]:
    """The jobs' operations, their deferred rows and their events, in the caller's transaction."""
    tx = Tx(conn, utcnow(), known_queues=known_queues)
    outcomes = [await _attempt(job.operation, tx) for job in jobs]
    for model, rows in tx.deferred.items():
        await insert_rows(tx, model, rows)
    tx.updates = await _append(tx)
    return outcomes, tx


async def _stop(_: Tx) -> None:
    return None


_PROBE_LOG = "probe:writer"


async def _probe(tx: Tx) -> None:
    await tx.conn.execute_query(tx.sql(_CREATE_LOG), [_PROBE_LOG])
    await tx.conn.execute_query(tx.sql("DELETE FROM event_logs WHERE name = ?"), [_PROBE_LOG])


async def _attempt(operation: Operation[Any], tx: Tx) -> Any:
    mark = len(tx.emitted)
    deferred = {model: len(rows) for model, rows in tx.deferred.items()}
    try:
        return await operation(tx)
    except ApiError as error:
        del tx.emitted[mark:]
        for model, rows in tx.deferred.items():
            del rows[deferred.get(model, 0) :]
        return error


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


async def _append(tx: Tx) -> list[Update]:
    """Give each emitted event its log's next sequence number and store it."""
    by_log: dict[str, list[_Pending]] = {}
    for pending in tx.emitted:
        by_log.setdefault(pending.log, []).append(pending)
    at = utc_text(tx.now)
    updates: list[Update] = []
    # Logs lock in name order ("queue:…" before "user:…"), so writers never deadlock.
    for log in sorted(by_log):
        events = by_log[log]
        last = await _bump(tx, log, len(events))
        first = last - len(events) + 1
        updates += [Update(log, first + i, e.type, e.data, at) for i, e in enumerate(events)]
    rows = [{"log": u.log, "seq": u.seq, "type": u.type, "data": u.data, "at": tx.now} for u in updates]
    await insert_rows(tx, Event, rows)
    return updates


# 1,000 rows of a message's 17 columns stay within SQLite's 32,766 parameters a statement.
ROWS_PER_INSERT = 1000


async def insert_rows(tx: Tx, model: type[Model], rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows of plain values, skipping ORM objects (most of a publish's cost).

    Values still go through each field's own conversion, exactly as Tortoise stores them.
    """
    if not rows:
        return
    fields = model._meta.fields_map
    names = list(rows[0])
    converted = [_column(tx, model, fields[n], [row[n] for row in rows]) for n in names]
    values = list(zip(*converted, strict=True))
    columns = ", ".join(f'"{fields[n].source_field or n}"' for n in names)
    insert = f'INSERT INTO "{model._meta.db_table}" ({columns})'
    row_marks = f"({', '.join('?' * len(names))})"
    if not tx.is_sqlite:  # asyncpg pipelines executemany; one huge statement costs it a plan
        await tx.conn.execute_many(tx.sql(f"{insert} VALUES {row_marks}"), [list(row) for row in values])
        return
    # Not executemany on SQLite: sqlite3 lets go of the GIL for every row it steps, and while the
    # event loop is busy each row then waits up to the switch interval (5 ms) to get it back.
    for start in range(0, len(values), ROWS_PER_INSERT):
        chunk = values[start : start + ROWS_PER_INSERT]
        sql = f"{insert} VALUES {', '.join([row_marks] * len(chunk))}"
        await tx.conn.execute_query(sql, [value for row in chunk for value in row])


def _column(tx: Tx, model: type[Model], field: Field[Any], values: list[Any]) -> list[Any]:
    """Each distinct object converted once: a batch's rows share their times, status and priority.

    Keyed by identity, not equality: equal times in different zones are stored as different text.
    """
    keys = list(map(id, values))
    empty: dict[type, Any] = {}  # every row's own `{}` of headers encodes alike

    def convert(value: Any) -> Any:
        if value.__class__ in (dict, list) and not value:
            if value.__class__ not in empty:
                empty[value.__class__] = field.to_db_value(value, model)
            return empty[value.__class__]
        converted = field.to_db_value(value, model)
        # sqlite3's adapter as Tortoise registers it: once here, not once per cell in its thread.
        return converted.isoformat(" ") if tx.is_sqlite and isinstance(converted, datetime) else converted

    distinct = {key: convert(value) for key, value in dict(zip(keys, values, strict=True)).items()}
    return list(map(distinct.__getitem__, keys))


_BUMP = "UPDATE event_logs SET last_seq = last_seq + ? WHERE name = ? RETURNING last_seq"
_CREATE_LOG = "INSERT INTO event_logs (name, last_seq) VALUES (?, 0) ON CONFLICT DO NOTHING"


async def _bump(tx: Tx, log: str, count: int) -> int:
    """Reserve `count` sequence numbers; the row lock is held until commit."""
    rows = await tx.conn.execute_query_dict(tx.sql(_BUMP), [count, log])
    if not rows:
        await tx.conn.execute_query(tx.sql(_CREATE_LOG), [log])
        rows = await tx.conn.execute_query_dict(tx.sql(_BUMP), [count, log])
    return int(rows[0]["last_seq"])
