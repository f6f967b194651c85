"""Counting requests in fixed windows: in Redis, shared by the replicas, or in this process.

A count that cannot be made (Redis away) is no count at all: the caller lets the request through
(fail open), and `Availability` logs the episode once when it begins and once when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from limits import RateLimitItem
from redis.exceptions import RedisError

from availability import Availability
from broker import redis_names

STORE = "rate limit store"
# Redis must answer a count this fast, or the request goes on uncounted.
REDIS_TIMEOUT = 0.5
# After a failed count, requests go uncounted this long before Redis is tried again: one slow
# try per pause, not one per request.
PAUSE_SECONDS = 1.0
# How often counts kept in memory are pruned of windows gone by.
PRUNE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Count:
    """Where one caller stands in one window: `used` of `limit`, the window over in `reset` s."""

    limit: int
    used: int
    reset: float

    @property
    def over(self) -> bool:
        return self.used > self.limit

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset))


def binding(counts: list[Count]) -> Count:
    """The count a caller must heed: the exceeded one that frees up last, else the one with
    the least left."""
    over = [count for count in counts if count.over]
    if over:
        return max(over, key=lambda count: count.reset)
    return min(counts, key=lambda count: count.remaining)


class Store(Protocol):
    """What counting needs of a storage: limits' `incr` (the count after it; a new key expires)."""

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int: ...


class LocalCounts:
    """Counts in this process. limits' own MemoryStorage walks every key after each increment
    (measured: 19 us an increment with one key, 360 us with 1,000 callers in a window, 3.7 ms with
    10,000); a window's key is never counted again once it is over, so pruning once a second is
    enough."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._expires: dict[str, float] = {}
        self._prune_at = 0.0

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.monotonic()
        if now >= self._prune_at:
            self._prune(now)
        used = self._counts.get(key, 0) + amount
        self._counts[key] = used
        if used == amount:
            self._expires[key] = now + expiry
        return used

    def _prune(self, now: float) -> None:
        self._prune_at = now + PRUNE_SECONDS
        for key in [key for key, expires in self._expires.items() if expires <= now]:
            del self._counts[key], self._expires[key]


class RedisCounts:
    """Counts in Redis, shared by the replicas. The increments of concurrent requests go out
    together, one pipeline at a time, as the writer commits: with 16 requests at once an
    increment cost 41 us of the event loop's CPU, against 101-115 us for limits' Redis storage,
    a round trip (and a Lua script) each (measured side by side)."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self._redis = aioredis.from_url(
            redis_url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT
        )
        self._prefix = redis_names(prefix)["rate_limits"]
        self._waiting: list[tuple[str, int, int, asyncio.Future[int]]] = []
        self._sending: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sending
        await self._redis.aclose()

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        counted: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append((f"{self._prefix}:{key}", expiry, amount, counted))
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send(), name="rate-limit-counts")
        return await counted

    async def _send(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                counts = await self._pipelined([("incrby", key, amount) for key, _, amount, _ in batch])
            except Exception as error:  # noqa: BLE001 - each waiting request decides (fails open)
                _settle(batch, error)
                continue
            _settle(batch, counts)
            # Only a window's first count sets its key's lifetime: half the commands. A key left
            # without one (a failure just now) costs memory, never a count: no window comes back.
            fresh = [
                ("expire", key, expiry)
                for (key, expiry, amount, _), used in zip(batch, counts, strict=True)
                if used == amount
            ]
            if fresh:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await self._pipelined(fresh)

    async def _pipelined(self, commands: list[tuple[str, str, int]]) -> list[int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for command, key, value in commands:
                pipe.execute_command(command.upper(), key, value)
            return [int(answer) for answer in await pipe.execute()]


def _settle(batch: list[tuple[str, int, int, asyncio.Future[int]]], outcome: list[int] | Exception) -> None:
    for i, (*_, counted) in enumerate(batch):
        if counted.done():
            continue  # its request went away
        if isinstance(outcome, Exception):
            counted.set_exception(outcome)
        else:
            counted.set_result(int(outcome[i]))


class Counters:
    """Counts in Redis, shared by the replicas, or in this process's memory.

    Redis being away is no reason to refuse anyone: requests then go uncounted (fail open), and
    the log says so once when it begins and once when it ends (`Availability`).
    """

    def __init__(self, redis_url: str, prefix: str, availability: Availability) -> None:
        self._availability = availability
        self._redis = RedisCounts(redis_url, prefix) if redis_url else None
        self._storage: Store = self._redis or LocalCounts()
        self._paused_until = 0.0

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()

    async def hit(self, items: list[RateLimitItem], group: str, who: str) -> Count | None:
        """Count one request of `who` in `group`; None when it could not be counted."""
        counts = []
        for item in items:
            count = await self._hit(item, group, who)
            if count is None:
                return None
            counts.append(count)
        return binding(counts)

    async def _hit(self, item: RateLimitItem, group: str, who: str) -> Count | None:
        now = time.time()
        period = item.get_expiry()
        window = int(now // period)
        # limits' `key_for` quotes every part: a tenth of the middleware's time, for names that
        # need none (a group, "subject:" or "address:" and the caller, a number).
        key = f"{group}/{item.amount}/{item.multiples}/{item.GRANULARITY.name}/{who}/{window}"
        used = await self._incr(key, period)
        if used is None:
            return None
        return Count(item.amount, used, (window + 1) * period - now)

    async def _incr(self, key: str, expiry: int) -> int | None:
        if self._paused_until and time.monotonic() < self._paused_until:
            return None
        try:
            used = await self._storage.incr(key, expiry)
        except (RedisError, OSError, TimeoutError) as error:
            self._paused_until = time.monotonic() + PAUSE_SECONDS
            self._availability.failed(STORE, error, meanwhile="requests go without rate limits")
            return None
        if self._paused_until:
            self._paused_until = 0.0
            self._availability.recovered(STORE)
        return used
