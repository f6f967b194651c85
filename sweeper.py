"""Background housekeeping: small chores run every few seconds, retention every minute or so.

Each chore does bounded work (through the writer when it writes), so a large backlog is worked
off over several ticks instead of stalling publishes. While the database is unavailable, chores
fail quietly: the episode is logged once, by `Availability`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from loguru import logger

from availability import Availability, unavailable_cause
from errors import ApiError
from isolation import Failures
from settings import Settings

Chore = Callable[[], Awaitable[object]]


class Sweeper:
    def __init__(
        self,
        settings: Settings,
        every_tick: Sequence[Chore],
        retention: Sequence[Chore],
        availability: Availability,
    ) -> None:
        self._settings = settings
        self._availability = availability
        self._every_tick = every_tick
        self._retention = retention
        self._task: asyncio.Task[None] | None = None
        self._failures = Failures()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sweeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        next_retention = time.monotonic()
        while True:
            await asyncio.sleep(self._settings.sweep_seconds)
            chores = list(self._every_tick)
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + self._settings.retention_sweep_seconds
                chores += self._retention
            for chore in chores:
                await self._run(chore)

    async def _run(self, chore: Chore) -> None:
        try:
            done = await chore()
        except Exception as error:  # noqa: BLE001 - one bad chore must not end housekeeping
            self._failed(chore, error)
            return
        self._failures.worked(_name(chore))
        _report(chore, done)

    def _failed(self, chore: Chore, error: Exception) -> None:
        if isinstance(error, ApiError) and error.status == 503:
            return  # refused by the writer, whose episode is already under way
        dependency = unavailable_cause(error)
        if dependency is None:
            self._failures.failed(_name(chore), error)
        else:
            self._availability.failed(dependency, error)


def _report(chore: Chore, done: object) -> None:
    if isinstance(done, int) and done and not isinstance(done, bool):
        logger.info("{}: {}", _name(chore), done)


def _name(chore: Chore) -> str:
    function = getattr(chore, "func", chore)  # a functools.partial names its function
    return str(getattr(function, "__name__", "chore")).replace("_", " ")
