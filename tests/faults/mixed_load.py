"""Publishers, workers and subscribers on one queue, with a health poller: the load the scenarios
that break a replica or the database run under, and the invariants they all end with."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from .checks import (
    Verdict,
    check_consumption,
    check_drained,
    check_no_500,
    check_published,
    check_subscriber,
    check_unavailable_answers,
    read_log,
    stored_messages,
)
from .load import Crew, Publisher, Replicas, Subscriber, Worker, drained, poll_health


@dataclass
class MixedLoad:
    cluster: Replicas
    queue: str
    publishers: list[Publisher]
    subscribers: list[Subscriber]
    workers: list[Worker]
    log: list[dict[str, Any]] = field(default_factory=list)
    _stop_publishing: asyncio.Event = field(default_factory=asyncio.Event)
    _stop_working: asyncio.Event = field(default_factory=asyncio.Event)
    _background: Crew = field(default_factory=Crew)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def alternating(cls, cluster: Replicas, queue: str) -> MixedLoad:
        """Two of each, one preferring each replica: 20 publishes/s, two workers, two streams."""
        return cls(
            cluster,
            queue,
            publishers=[Publisher(cluster, queue, f"p{i}", prefer=i % 2, interval=0.1) for i in range(2)],
            subscribers=[Subscriber(cluster, queue, prefer=i % 2) for i in range(2)],
            workers=[Worker(cluster, queue, prefer=i % 2, visibility=3.0) for i in range(2)],
        )

    @property
    def head(self) -> int:
        return self.log[-1]["seq"] if self.log else 0

    async def __aenter__(self) -> MixedLoad:
        self._background.start(poll_health(self.cluster), *(s.run() for s in self.subscribers))
        self._tasks = [asyncio.create_task(p.run(self._stop_publishing)) for p in self.publishers]
        self._tasks += [asyncio.create_task(w.run(self._stop_working)) for w in self.workers]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop_publishing.set()
        self._stop_working.set()
        await self._background.stop()
        for task in self._tasks:
            task.cancel()

    async def settle(self, verdict: Verdict, within: float = 40) -> None:
        """Stop publishing, let the workers drain the queue, and every subscriber reach its head."""
        self._stop_publishing.set()
        await asyncio.gather(*self._tasks[: len(self.publishers)])
        check_drained(verdict, await drained(self.cluster, self.queue, timeout=within), within)
        self._stop_working.set()
        await asyncio.gather(*self._tasks[len(self.publishers) :])
        self.log = await read_log(self.cluster, self.queue)
        for subscriber in self.subscribers:
            await subscriber.reach(self.head, timeout=15)

    async def check(self, verdict: Verdict, database_url: str) -> None:
        """Every 2xx publish stored once, every subscriber saw it once in order, every message
        acked once, no 500, every 503 in the envelope with Retry-After."""
        stored = await stored_messages(database_url, self.queue)
        check_published(verdict, self.publishers, stored)
        published = {p.message_id for publisher in self.publishers for p in publisher.published.values()}
        for n, subscriber in enumerate(self.subscribers):
            check_subscriber(verdict, f"subscriber {n}", subscriber, self.head, published)
        check_consumption(verdict, self.log, stored)
        check_no_500(verdict, self.cluster.calls)
        check_unavailable_answers(verdict, self.cluster.calls)
