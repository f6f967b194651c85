"""The fast path from a commit to the streams: one protocol, an in-process and a Redis broker.

The database is the truth; a broker only hurries it along. Subscribers hold a bounded buffer,
and whenever the broker may have lost something (overflow, reconnect) it tells them to catch up
from the database instead of pretending nothing happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from enum import Enum
from typing import Any, Protocol

import redis.asyncio as aioredis
from loguru import logger
from redis.exceptions import RedisError

from event_log import Heads, Update, read_heads, read_page
from log_pages import SharedReads
from metrics import NO_METRICS, Metrics

# Batches waiting for Redis; past this, Redis is too far behind and replicas re-read instead.
OUTBOX_LIMIT = 10_000
# How often the one clock wakes subscribers whose time came (heartbeats, lifetimes): late by at
# most this, which no heartbeat or lifetime notices.
TICK_SECONDS = 0.25
# The event after which a queue's log is no longer live, and how many live logs are remembered.
GONE = "queue.deleted"
# The events with which a queue's log becomes live: a stream following a pattern may take it on.
JOINS = frozenset({"queue.created", "queue.restored"})
LIVE_LIMIT = 10_000
WAKE_SLICE = 100
# Cut off from Redis, a replica reads the heads of its subscribed logs this often, and at most
# this many new events of a log per read: the database is the truth, Redis only the fast path.
POLL_SECONDS = 0.5
POLL_PAGE = 500

# Whether a subscriber takes on a queue log that has just become live.
Joins = Callable[[str], bool]


class Direct(Enum):
    """What a stream's `direct` writer did with an update it was offered."""

    DECLINED = 0  # not taken: the subscriber buffers it and wakes its stream
    SKIPPED = 1  # taken, but no frame went out (its type is filtered out, or the client left)
    WRITTEN = 2  # its frame was written to the client


DECLINED, SKIPPED, WRITTEN = Direct.DECLINED, Direct.SKIPPED, Direct.WRITTEN


class Subscriber:
    """One stream's inbox: a bounded buffer, a flag to re-read the database, and a way to wait.

    Lean on purpose, as a server holds 10,000 of them: the inbox is a plain list, a future exists
    only while its stream waits, and the broker's one clock wakes it at
    `wake_at` (heartbeats, lifetime) instead of a timer per stream.
    """

    __slots__ = (
        "_event",
        "_waiter",
        "capacity",
        "closed",
        "direct",
        "firsts",
        "inbox",
        "joined",
        "joins",
        "logs",
        "must_catch_up",
        "sending_since",
        "stalled",
        "task",
        "wake_at",
    )

    def __init__(self, logs: Iterable[str], capacity: int, joins: Joins | None = None) -> None:
        self.logs = set(logs)
        self.capacity = capacity
        self.inbox: list[Update] = []
        self.must_catch_up = False
        self.closed = False
        # The first sequence offered of each log since subscribing, until the stream has placed
        # itself (then None): a stream starting live begins before it, whatever head it learns.
        self.firsts: dict[str, int] | None = {}
        # Which queue logs that become live (JOINS) this subscriber takes on, and those it took
        # on, each with the sequence it starts after, until its stream has seen them.
        self.joins = joins
        self.joined: list[tuple[str, int]] = []
        # Set by a stream while it waits with nothing buffered: writes an update at once, from
        # the broker's own call, instead of waking the stream for it (False: not this one).
        self.direct: Callable[[Update], Direct] | None = None
        # Set by the stream around each write, read by `cut_stalled`: a watchdog that costs a
        # write stamp per frame instead of a timer per frame.
        self.sending_since = 0.0
        self.stalled = False
        self.task: asyncio.Task[Any] | None = None
        self.wake_at = math.inf
        self._waiter: asyncio.Future[None] | None = None
        self._event: asyncio.Event | None = None

    @property
    def wakeup(self) -> asyncio.Event:
        """Set on every update, close and catch-up, for callers that prefer an event to `wait`."""
        if self._event is None:
            self._event = asyncio.Event()
            if self.inbox or self.must_catch_up or self.closed:
                self._event.set()
        return self._event

    def offer(self, update: Update) -> bool:
        """Take `update`; True when its frame was written to the client at once (`direct`)."""
        firsts = self.firsts
        if firsts is not None and update.log not in firsts:
            firsts[update.log] = update.seq
        direct = self.direct
        if direct is not None and (taken := direct(update)) is not DECLINED:
            return taken is WRITTEN
        self.direct = None  # buffered now: what comes after it must queue behind it
        if len(self.inbox) >= self.capacity:
            # Never wait for a slow reader: drop its buffer, it re-reads the log.
            self.catch_up()
            return False
        self.inbox.append(update)
        self.wake()
        return False

    def close(self) -> None:
        """The stream should end: its client left, or the server is going down."""
        self.closed = True
        self.wake()

    def catch_up(self) -> None:
        self.inbox.clear()
        self.must_catch_up = True
        self.wake()

    def wake(self) -> None:
        self.direct = None
        waiter = self._waiter
        if waiter is not None:
            self._waiter, self.wake_at = None, math.inf
            if not waiter.done():
                waiter.set_result(None)
        if self._event is not None:
            self._event.set()

    def wait(self, until: float) -> asyncio.Future[None]:
        """Done when there is something to do, or when the loop's clock reaches `until`.

        A bare future rather than a coroutine: one object fewer per idle stream.
        """
        waiter = asyncio.get_running_loop().create_future()
        if self.inbox or self.must_catch_up or self.closed:
            waiter.set_result(None)
        else:
            self._waiter, self.wake_at = waiter, until
        return waiter

    def take(self) -> list[Update]:
        """Everything buffered, oldest first; the inbox starts empty again.

        A copy that dies with the drain, and the same inbox kept: a new list per delivery would
        outlive the collector's young generations and make its full passes come sooner.
        """
        taken = self.inbox.copy()
        self.inbox.clear()
        return taken


class Broker(Protocol):
    reads: SharedReads

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def publish(self, updates: Sequence[Update]) -> None: ...
    async def ready(self) -> bool: ...
    def subscribe(self, logs: Iterable[str], capacity: int, joins: Joins | None = None) -> Subscriber: ...
    def follow(self, subscriber: Subscriber, log: str) -> None: ...
    def unsubscribe(self, subscriber: Subscriber) -> None: ...
    def close_all(self) -> None: ...
    async def cut_stalled(self, limit: float) -> int: ...
    def known_head(self, log: str) -> int | None: ...
    def learn_head(self, log: str, seq: int) -> None: ...
    def known_live(self, log: str) -> bool: ...
    def live_mark(self) -> int: ...
    def learn_live(self, log: str, mark: int) -> None: ...
    @property
    def subscriber_count(self) -> int: ...


class LocalFanout:
    """Delivers updates to this process's subscribers; both brokers build on it.

    It also keeps the head of every log someone here subscribes to, learnt from what it
    delivers, and which logs the database said are live until it delivers their `queue.deleted`,
    so that a stream opening live needs no database read; and one clock for all subscribers,
    ticking while there are any.
    """

    def __init__(self, metrics: Metrics = NO_METRICS) -> None:
        self._metrics = metrics
        self._by_log: dict[str, set[Subscriber]] = {}
        self._subscribers: set[Subscriber] = set()
        self._joining: set[Subscriber] = set()  # those with `joins`
        self._heads = Heads()
        self._live: set[str] = set()
        self._gone = 0  # deletions delivered: a lookup that raced one is not remembered
        self._clock: asyncio.TimerHandle | None = None
        # Offers not made yet, in delivery order: a crowd is woken WAKE_SLICE at a time.
        self._backlog: deque[tuple[Update, tuple[Subscriber, ...]]] = deque()
        # How this process's streams read their logs: a crowd catching up shares its reads.
        self.reads = SharedReads()

    def subscribe(self, logs: Iterable[str], capacity: int, joins: Joins | None = None) -> Subscriber:
        """A subscriber to `logs`, and to each queue log that becomes live for which `joins` says so."""
        subscriber = Subscriber(logs, capacity, joins)
        for log in subscriber.logs:
            self._by_log.setdefault(log, set()).add(subscriber)
        self._subscribers.add(subscriber)
        if joins is not None:
            self._joining.add(subscriber)
        if self._clock is None:
            self._clock = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)
        return subscriber

    def follow(self, subscriber: Subscriber, log: str) -> None:
        """Deliver `log` to `subscriber` too, from now on."""
        subscriber.logs.add(log)
        self._by_log.setdefault(log, set()).add(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        self._joining.discard(subscriber)
        for log in subscriber.logs:
            subscribers = self._by_log.get(log)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del self._by_log[log]
                    self._heads.forget(log)

    def deliver(self, updates: Sequence[Update]) -> None:
        heads, backlog = self._heads, self._backlog
        pending = bool(backlog)
        for update in updates:
            if update.type == GONE:
                self._live.discard(update.log)
                self._gone += 1
            elif update.type in JOINS and self._joining:
                self._join(update)
            subscribers = self._by_log.get(update.log)
            if not subscribers:
                continue
            heads.advance(update.log, update.seq)
            backlog.append((update, tuple(subscribers)))
        if backlog and not pending:
            self._offer_slice()

    def _join(self, update: Update) -> None:
        """Subscribers that take on the queue log `update` makes live follow it from `update` on."""
        for subscriber in self._joining:
            joins = subscriber.joins
            if update.log not in subscriber.logs and joins is not None and joins(update.log):
                subscriber.joined.append((update.log, update.seq - 1))
                self.follow(subscriber, update.log)

    def _offer_slice(self) -> None:
        """Wake the next WAKE_SLICE subscribers; the rest after what the loop has queued meanwhile.

        Waking a thousand streams at once queues a thousand writes ahead of everything else,
        the writer's next database round trips included: publishes then wait out every burst.
        """
        backlog, budget, delivered = self._backlog, WAKE_SLICE, self._metrics.delivered
        while backlog and budget > 0:
            update, subscribers = backlog[0]
            written = 0
            for subscriber in subscribers[:budget]:
                written += subscriber.offer(update)
            if written:  # one clock read for the slice: its lag is that of its last frame
                delivered(update, written)
            if len(subscribers) > budget:
                backlog[0] = (update, subscribers[budget:])
            else:
                backlog.popleft()
            budget -= len(subscribers)
        if backlog:
            asyncio.get_running_loop().call_soon(self._offer_slice)

    def known_head(self, log: str) -> int | None:
        """The log's last sequence number, when known here without asking the database."""
        return self._heads.get(log)

    def learn_head(self, log: str, seq: int) -> None:
        """Remember a head read from the database, for as long as the log has subscribers here."""
        if log in self._by_log:
            self._heads.advance(log, seq)

    def known_live(self, log: str) -> bool:
        """Whether the database said the log's queue is live, and no deletion came since."""
        return log in self._live

    def live_mark(self) -> int:
        """Taken before asking the database, handed to `learn_live` with its answer."""
        return self._gone

    def learn_live(self, log: str, mark: int) -> None:
        if mark != self._gone:
            return  # a deletion was delivered meanwhile: the answer may be stale
        if len(self._live) >= LIVE_LIMIT:
            self._live.clear()
        self._live.add(log)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for subscriber in self._subscribers:
            if subscriber.wake_at <= now:
                subscriber.wake()
        self._clock = loop.call_later(TICK_SECONDS, self._tick) if self._subscribers else None

    def stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    async def cut_stalled(self, limit: float) -> int:
        """End the streams whose client has not taken a frame for `limit` seconds."""
        now, cut = asyncio.get_running_loop().time(), 0
        for subscriber in self._subscribers:
            since = subscriber.sending_since
            if since and now - since > limit and subscriber.task is not None and not subscriber.stalled:
                subscriber.stalled = True
                subscriber.task.cancel()
                cut += 1
        return cut

    def close_all(self) -> None:
        for subscriber in self._subscribers:
            subscriber.close()

    def catch_up_all(self) -> None:
        # Something may have been missed: heads and liveness are read again.
        self._heads.clear()
        self._live.clear()
        self._gone += 1
        for subscriber in self._subscribers:
            subscriber.catch_up()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)


class MemoryBroker(LocalFanout):
    """The embedded default: one process, no network."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self.stop_clock()

    async def publish(self, updates: Sequence[Update]) -> None:
        self.deliver(updates)

    async def ready(self) -> bool:
        return True


def redis_names(prefix: str) -> dict[str, str]:
    """Every Redis key and channel Pombo uses, from one prefix."""
    return {"events": f"{prefix}:events", "counts": f"{prefix}:counts", "rate_limits": f"{prefix}:ratelimits"}


class RedisBroker(LocalFanout):
    """Replicas: one Redis pub/sub connection per process, fanned out in memory.

    Local subscribers are served directly, so this process never depends on Redis to see its
    own commits; batches from other processes arrive on one channel. Publishing to Redis happens
    in a task of its own, so a slow or absent Redis never holds up a commit. When a publish fails,
    the next one that succeeds is preceded by a resync notice: other replicas re-read the database.
    """

    def __init__(self, url: str, prefix: str, metrics: Metrics = NO_METRICS) -> None:
        super().__init__(metrics)
        self._redis = aioredis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self._channel = redis_names(prefix)["events"]
        self._origin = os.urandom(8).hex()
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox: asyncio.Queue[str] = asyncio.Queue(maxsize=OUTBOX_LIMIT)
        self._lost_some = False
        self._poller: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self._lost_at: float | None = None  # when the subscription was lost, while it is
        self.reconnects = 0  # subscriptions regained after a loss, and batches Redis did not take
        self.publish_failures = 0

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="redis-listener"),
            asyncio.create_task(self._send(), name="redis-sender"),
        ]
        self._poll_while_cut_off()

    async def close(self) -> None:
        self.stop_clock()
        await _cancel([*self._tasks, *([self._poller] if self._poller else [])])
        await self._redis.aclose()

    async def publish(self, updates: Sequence[Update]) -> None:
        self.deliver(updates)
        try:
            self._outbox.put_nowait(json.dumps({"o": self._origin, "u": [_pack(u) for u in updates]}))
        except asyncio.QueueFull:
            self._lost_some = True

    async def _send(self) -> None:
        while True:
            payload = await self._outbox.get()
            try:
                if self._lost_some:
                    await self._redis.publish(self._channel, json.dumps({"o": self._origin, "resync": True}))
                    self._lost_some = False
                await self._redis.publish(self._channel, payload)
            except (RedisError, OSError) as error:
                self.publish_failures += 1
                # Committed is committed: the other replicas re-read the database once we are back.
                if not self._lost_some:  # once an episode, not once a batch
                    logger.warning("redis publish failed ({}); replicas will catch up", error)
                self._lost_some = True

    @property
    def outbox_depth(self) -> int:
        return self._outbox.qsize()

    def known_head(self, log: str) -> int | None:
        # Cut off from the other replicas, this process cannot know their last commits.
        return super().known_head(log) if self.connected.is_set() else None

    def known_live(self, log: str) -> bool:
        return self.connected.is_set() and super().known_live(log)

    def learn_head(self, log: str, seq: int) -> None:
        # Cut off, the known heads are what reached the streams here, which is what the poller
        # reads after; a head from the database may be past events still on their way.
        if self.connected.is_set():
            super().learn_head(log, seq)

    async def ready(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._consume()
            except Exception as error:  # noqa: BLE001 - nothing may end cross-replica delivery for good
                self.connected.clear()
                self._poll_while_cut_off()
                self._report_lost(error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            else:
                delay = 0.1

    async def _consume(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(self._channel)
            async for message in pubsub.listen():
                if message["type"] == "subscribe":
                    self._on_subscribed()
                elif message["type"] == "message":
                    self._on_message(message["data"])

    def _report_lost(self, error: Exception) -> None:
        """Redis going away is one warning an outage; anything else is a bug, with its traceback."""
        if not isinstance(error, RedisError | OSError):
            logger.opt(exception=error).error("redis subscription failed ({}); retrying", error)
        elif self._lost_at is None:
            self._lost_at = time.monotonic()
            logger.warning(
                "redis subscription lost ({}); streams follow the database until it is back", error
            )

    def _on_subscribed(self) -> None:
        # Whatever was published while we were away is in the database: re-read it.
        was_connected = self.connected.is_set()
        self.connected.set()
        if not was_connected:
            lost_at, self._lost_at = self._lost_at, None
            self.reconnects += lost_at is not None
            outage = "" if lost_at is None else f" again after {time.monotonic() - lost_at:.1f}s"
            logger.info("redis subscription ready{}", outage)
            self.catch_up_all()

    def _on_message(self, raw: bytes) -> None:
        try:
            batch = json.loads(raw)
            if batch["o"] == self._origin:
                return
            updates = None if batch.get("resync") else [_unpack(item) for item in batch["u"]]
        except (ValueError, LookupError, TypeError, AttributeError) as error:
            # Not one of ours, or damaged: what it may have carried is in the database.
            logger.warning("unreadable message on {} ({!r}); streams re-read the logs", self._channel, error)
            updates = None
        if updates is None:
            self.catch_up_all()
        else:
            self.deliver(updates)

    def _poll_while_cut_off(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="redis-outage-poller")

    async def _poll(self) -> None:
        """Until Redis is back, feed the subscribers here from the database every POLL_SECONDS.

        The database may be away too: a failed round is said once, then retried quietly.
        """
        failing = False
        while not self.connected.is_set():
            try:
                await self._poll_once()
            except Exception as error:  # noqa: BLE001 - the next round tries again; nothing else would
                if not failing:
                    logger.warning("cannot read the logs while redis is away ({!r}); retrying", error)
                failing = True
            else:
                failing = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connected.wait(), POLL_SECONDS)

    async def _poll_once(self) -> None:
        if not self._by_log:
            return
        for log, head in (await read_heads(self._by_log.keys())).items():
            known = self._heads.get(log)
            fresh = await read_page(log, known, POLL_PAGE) if known is not None and head > known else []
            if self.connected.is_set():
                return  # back on Redis, which had every stream re-read: what was read may be stale
            if known is None:
                self._mark_unknown(log, head)
            else:
                self.deliver(fresh)

    def _mark_unknown(self, log: str, head: int) -> None:
        """Nothing delivered here since the last catch-up: what is missing cannot be told.

        The log's subscribers re-read it once, and from now on the poller delivers after `head`
        (set even at 0, or they would re-read every round).
        """
        subscribers = self._by_log.get(log, ())
        if subscribers:
            self._heads.set(log, head)
        for subscriber in subscribers:
            subscriber.catch_up()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel until done: redis-py can swallow a cancellation that lands inside a command."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


def _pack(update: Update) -> list[object]:
    return [update.log, update.seq, update.type, update.data, update.at]


def _unpack(item: list[object]) -> Update:
    log, seq, type_, data, at = item
    # Committed on another replica at about `at` (its transaction's start): for the delivery lag.
    committed = datetime.fromisoformat(str(at)).timestamp()
    return Update(str(log), int(str(seq)), str(type_), str(data), str(at), committed_at=committed)


def create_broker(redis_url: str, prefix: str, metrics: Metrics = NO_METRICS) -> Broker:
    return RedisBroker(redis_url, prefix, metrics) if redis_url else MemoryBroker(metrics)
