"""Message counts per queue, kept in Redis under the head of the queue's log.

Every committed change to a queue appends an event to its log and bumps the log's head in the
same transaction, so a (queue, head) pair names one state of its counts and a key never needs
invalidating: the next change makes a new key. A read takes the heads from the database (one
indexed row per queue, read after any write its client was answered for), then the counts
stored under them; what is missing is counted and stored. Counts filed under a head were
counted after that head committed, so they are never older than it: a client always sees its
own writes, on any replica, however late the other replicas hear of them.

Without Redis there is one process (SQLite, or PostgreSQL with the in-process broker, which
refuses a second process), so the same keys live in this process's memory. With Redis they are
shared by the replicas, and while Redis is down, reads count in the database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from loguru import logger
from redis.exceptions import RedisError

from broker import redis_names
from models import EventLog, Queue

Counts = dict[int, dict[str, int]]
Counter = Callable[[list[int]], Awaitable[Counts]]

# Keys never go stale, so the lifetime only bounds memory (a busy queue makes a key per change)
# and how long a database restored from a backup could meet counts of its future.
KEY_SECONDS = 60
# A read waits at most this long for Redis, then counts in the database.
REDIS_TIMEOUT = 0.5
# After a Redis error, reads skip Redis this long: one slow or failed try per pause, one warning.
PAUSE_SECONDS = 5.0
# Keys kept in memory without Redis: a busy queue makes one per change, read at most once after it.
LOCAL_KEYS = 4096


class CountCache:
    """Counts by queue id, kept in Redis or, without it, in memory; `of` never raises for Redis."""

    def __init__(self, redis_url: str, prefix: str, enabled: bool = True) -> None:
        self._enabled = enabled
        self._local: dict[str, dict[str, int]] = {}
        self._redis: aioredis.Redis | None = None
        if redis_url and enabled:
            self._redis = aioredis.from_url(
                redis_url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT
            )
        self._names = redis_names(prefix)
        self._paused_until = 0.0

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def of(self, queues: Mapping[str, Queue], count: Counter) -> Counts:
        """The counts of `queues` (keyed by their log's name), as `count` would give them."""
        ids = [q.id for q in queues.values()]
        if not self._enabled or not queues or time.monotonic() < self._paused_until:
            return await count(ids)
        keys = await self._keys(queues)
        found = await self._stored(keys)
        if found is None:
            return await count(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            counted = await count(missing)
            await self._store({keys[i]: counted.get(i, {}) for i in missing})
            found.update(counted)
        return found

    async def _stored(self, keys: dict[int, str]) -> Counts | None:
        """What is kept under `keys`, by queue id; None when Redis failed."""
        if self._redis is None:
            return {i: self._local[key] for i, key in keys.items() if key in self._local}
        try:
            stored = await self._redis.mget(list(keys.values()))
        except (RedisError, OSError) as error:
            self._pause(error)
            return None
        return {i: json.loads(raw) for i, raw in zip(keys, stored, strict=True) if raw is not None}

    async def _keys(self, queues: Mapping[str, Queue]) -> dict[int, str]:
        """Each queue's key: its id, its creation (a queue made again starts a new log) and its head."""
        rows = await EventLog.filter(name__in=list(queues)).values_list("name", "last_seq")
        heads: dict[str, Any] = dict(rows)
        base = self._names["counts"]
        return {
            q.id: f"{base}:{q.id}:{q.created_at.timestamp():.6f}:{heads.get(log, 0)}"
            for log, q in queues.items()
        }

    async def _store(self, values: dict[str, dict[str, int]]) -> None:
        if self._redis is None:
            self._local.update(values)
            while len(self._local) > LOCAL_KEYS:
                del self._local[next(iter(self._local))]  # the oldest
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, counts in values.items():
                    pipe.set(key, json.dumps(counts), ex=KEY_SECONDS)
                await pipe.execute()
        except (RedisError, OSError) as error:
            self._pause(error)

    def _pause(self, error: Exception) -> None:
        self._paused_until = time.monotonic() + PAUSE_SECONDS
        logger.warning(
            "count cache unavailable for {:.0f}s ({}); counting in the database", PAUSE_SECONDS, error
        )
