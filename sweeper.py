"""Background housekeeping: expired leases come back, old messages and events go away.

Each tick does bounded work through the writer, so a large backlog is worked off over several
ticks instead of stalling publishes.
"""

from __future__ import annotations

import asyncio
import time

from loguru import logger

from hub import Hub
from leases import Leases
from notifications import Notifications
from settings import Settings

LEASES_PER_TICK = 500
MESSAGES_PER_TICK = 500
EVENTS_PER_TICK = 5000


class Sweeper:
    def __init__(self, hub: Hub, leases: Leases, notifications: Notifications, settings: Settings) -> None:
        self._hub = hub
        self._leases = leases
        self._notifications = notifications
        self._settings = settings
        self._task: asyncio.Task[None] | None = None

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
            try:
                await self._leases.release_expired(LEASES_PER_TICK)
                await self._notifications.check_backlogs()
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + self._settings.retention_sweep_seconds
                    await self._retention()
            except Exception as error:  # noqa: BLE001 - a bad tick must not end housekeeping
                logger.opt(exception=error).error("sweep failed")

    async def _retention(self) -> None:
        expired = await self._hub.expire_messages(MESSAGES_PER_TICK)
        expired += await self._notifications.remove_expired(MESSAGES_PER_TICK)
        trimmed = 0
        if self._settings.event_retention_seconds > 0:
            trimmed = await self._hub.trim_logs(self._settings.event_retention_seconds, EVENTS_PER_TICK)
        if expired or trimmed:
            logger.info(
                "retention: {} messages and notifications expired, {} events trimmed", expired, trimmed
            )
