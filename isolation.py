"""Housekeeping queue by queue: one queue's failure undoes its own work only, and is logged once.

A chore that walks every queue (backlog alerts, retention) runs each queue's part in a savepoint
of the chore's transaction. A part that fails is rolled back to it and its events are dropped,
while the other queues' parts go on. The failure is logged when it begins and when that queue's
part works again, not at every tick. An unavailable database is no queue's failure: it is raised,
for the writer and `Availability` to tell as one episode.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from loguru import logger

from availability import unavailable_cause
from writer import Tx

T = TypeVar("T")


class Failures:
    """What is failing now, so that a failure that repeats at every tick is logged once."""

    def __init__(self) -> None:
        self._failing: set[str] = set()

    def failed(self, what: str, error: Exception) -> None:
        if what not in self._failing:
            self._failing.add(what)
            logger.opt(exception=error).error("{} failed; tried again every tick, logged once", what)

    def worked(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            logger.info("{} works again", what)


async def isolated(tx: Tx, failures: Failures, what: str, part: Callable[[], Awaitable[T]]) -> T | None:
    """`part()` in a savepoint of `tx`: None, its rows and events undone, when it fails."""
    emitted = len(tx.emitted)
    await tx.conn.execute_query("SAVEPOINT queue_part")
    try:
        result = await part()
    except Exception as error:
        if unavailable_cause(error) is not None:
            raise
        await tx.conn.execute_query("ROLLBACK TO SAVEPOINT queue_part")
        del tx.emitted[emitted:]
        failures.failed(what, error)
        return None
    await tx.conn.execute_query("RELEASE SAVEPOINT queue_part")
    failures.worked(what)
    return result
