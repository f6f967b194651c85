"""Consumption: a claim takes a lease; ack, nack and extend need it; expired leases come back.

Every transition runs through the writer and appends its event, so a stream shows work move.
Claims lock rows with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas never hand one message
to two live leases; on SQLite the single writer already serialises them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from tortoise.expressions import F

from broker import Broker, Subscriber
from errors import conflict, not_found, validation_error
from hub import emit_message, live_queue_in, queue_log
from models import Message, MessageStatus, Queue, new_id
from notifications import dead_letter_alert, notify_owner
from schemas import ClaimedMessage, MessageOut
from writer import Tx, Writer

# A waiting claim re-checks at least this often, so a broker outage never strands it.
RECHECK_SECONDS = 2.0
# Events after which a waiting claim may find work.
WAKING_EVENTS = frozenset({"message.created", "message.released", "message.retrying", "message.redriven"})
REDRIVE_LIMIT = 1000


@dataclass(frozen=True)
class Claim:
    max: int
    visibility_timeout: float | None
    wait: float


@dataclass(frozen=True)
class Outcome:
    """A lease-holding call: which message, with which lease, and what to do."""

    message_id: str
    lease_id: str


class Leases:
    def __init__(self, writer: Writer, broker: Broker) -> None:
        self.writer = writer
        self.broker = broker

    async def claim(self, name: str, request: Claim) -> list[ClaimedMessage]:
        """Claim now; if nothing is there, wait up to `request.wait` for work to arrive."""
        deadline = time.monotonic() + request.wait
        # Subscribed before the first try, so a publish between try and wait still wakes us.
        subscriber = self.broker.subscribe([queue_log(name)], capacity=64)
        try:
            while True:
                claimed, next_at = await self.writer.run(partial(_claim, name, request))
                remaining = deadline - time.monotonic()
                if claimed or remaining <= 0:
                    return claimed
                pause = min(remaining, RECHECK_SECONDS, _seconds_until(next_at))
                await _wait_for_work(subscriber, pause)
        finally:
            self.broker.unsubscribe(subscriber)

    async def ack(self, name: str, outcomes: Sequence[Outcome]) -> list[MessageOut]:
        return await self.writer.run(partial(_ack, name, outcomes))

    async def nack(self, name: str, outcome: Outcome, error: str | None, delay: float | None) -> MessageOut:
        return await self.writer.run(partial(_nack, name, outcome, error, delay))

    async def extend(self, name: str, outcome: Outcome, visibility_timeout: float | None) -> MessageOut:
        return await self.writer.run(partial(_extend, name, outcome, visibility_timeout))

    async def redrive(self, name: str, ids: Sequence[str] | None) -> list[MessageOut]:
        return await self.writer.run(partial(_redrive, name, ids))

    async def release_expired(self, limit: int) -> int:
        """Expired leases, in any queue, go back to pending (or to dead after the last attempt)."""
        return await self.writer.run(partial(_release_expired, None, limit))


async def _wait_for_work(subscriber: Subscriber, pause: float) -> None:
    """Until an event that may bring work, or `pause` seconds."""
    end = time.monotonic() + pause
    while (left := end - time.monotonic()) > 0:
        subscriber.wakeup.clear()
        try:
            await asyncio.wait_for(subscriber.wakeup.wait(), left)
        except TimeoutError:
            return
        woken = subscriber.must_catch_up or any(u.type in WAKING_EVENTS for u in subscriber.inbox)
        subscriber.inbox.clear()
        subscriber.must_catch_up = False
        if woken:
            return


def _seconds_until(moment: datetime | None) -> float:
    if moment is None:
        return RECHECK_SECONDS
    return max(0.0, moment.timestamp() - time.time()) + 0.001


async def _claim(name: str, request: Claim, tx: Tx) -> tuple[list[ClaimedMessage], datetime | None]:
    queue = await live_queue_in(tx, name)
    # Expired leases come back through the sweeper (every `sweep_seconds`), not on this hot path.
    query = Message.filter(queue_id=queue.id, status=MessageStatus.pending, available_at__lte=tx.now)
    query = query.order_by("priority", "id").limit(request.max)
    rows = await (query if tx.is_sqlite else query.select_for_update(skip_locked=True)).using_db(tx.conn)
    if not rows:
        return [], await _next_available(tx, queue)
    lease, expires = (
        new_id(),
        tx.now + timedelta(seconds=request.visibility_timeout or queue.visibility_timeout),
    )
    await (
        Message.filter(id__in=[m.id for m in rows])
        .using_db(tx.conn)
        .update(
            status=MessageStatus.processing,
            lease_id=lease,
            lease_expires_at=expires,
            attempts=F("attempts") + 1,
            updated_at=tx.now,
        )
    )
    claimed = []
    for message in rows:
        message.status, message.lease_id, message.lease_expires_at = MessageStatus.processing, lease, expires
        message.attempts, message.updated_at = message.attempts + 1, tx.now
        resource = emit_message(tx, message, name, "message.claimed")
        claimed.append(ClaimedMessage(**resource.model_dump(), lease_id=lease))
    return claimed, None


async def _next_available(tx: Tx, queue: Queue) -> datetime | None:
    """When a delayed, backed-off or leased message will next be claimable.

    A lease that has already expired is left out: the sweeper releases it, and its
    `message.released` wakes the claim, which would otherwise spin until then.
    """
    pending = Message.filter(queue_id=queue.id, status=MessageStatus.pending).using_db(tx.conn)
    leased = Message.filter(queue_id=queue.id, status=MessageStatus.processing, lease_expires_at__gt=tx.now)
    leased = leased.using_db(tx.conn)
    soonest: list[datetime] = []
    for query, column in ((pending, "available_at"), (leased, "lease_expires_at")):
        row = await query.order_by(column).only("id", column).first()
        if row is not None:
            soonest.append(getattr(row, column))
    return min(soonest, default=None)


async def _leased(tx: Tx, queue: Queue, outcome: Outcome) -> Message:
    """The message this lease holds, or a 409 that changes nothing."""
    query = Message.filter(id=outcome.message_id, queue_id=queue.id).using_db(tx.conn)
    message = await (query if tx.is_sqlite else query.select_for_update()).first()
    if message is None:
        raise not_found("message", outcome.message_id)
    if message.lease_id != outcome.lease_id or message.status == MessageStatus.done:
        raise conflict("lease_mismatch", "this lease does not hold the message", message_id=message.id)
    expired = message.lease_expires_at is None or message.lease_expires_at <= tx.now
    if message.status != MessageStatus.processing or expired:
        raise conflict(
            "lease_expired", "the lease expired; the message may be claimed again", message_id=message.id
        )
    return message


async def _ack(name: str, outcomes: Sequence[Outcome], tx: Tx) -> list[MessageOut]:
    queue = await live_queue_in(tx, name)
    held = [await _leased(tx, queue, outcome) for outcome in outcomes]  # all checked before any write
    acked = []
    for message in held:
        message.status, message.finished_at, message.updated_at = MessageStatus.done, tx.now, tx.now
        await message.save(using_db=tx.conn, update_fields=["status", "finished_at", "updated_at"])
        acked.append(emit_message(tx, message, name, "message.acked"))
    return acked


async def _nack(name: str, outcome: Outcome, error: str | None, delay: float | None, tx: Tx) -> MessageOut:
    queue = await live_queue_in(tx, name)
    message = await _leased(tx, queue, outcome)
    message.last_error = error if error is not None else message.last_error
    if message.attempts >= queue.max_attempts:
        return await _bury(tx, queue, message)
    wait = delay if delay is not None else backoff(queue, message.attempts)
    return await _requeue(tx, queue, message, tx.now + timedelta(seconds=wait), "message.retrying")


def backoff(queue: Queue, attempts: int) -> float:
    """Exponential with equal jitter: between half and all of min(max, base * 2^(attempts-1))."""
    ceiling = min(float(queue.backoff_max), float(queue.backoff_base) * 2.0 ** max(attempts - 1, 0))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


async def _requeue(tx: Tx, queue: Queue, message: Message, available_at: datetime, event: str) -> MessageOut:
    message.status, message.available_at, message.updated_at = MessageStatus.pending, available_at, tx.now
    fields = ["status", "available_at", "updated_at", "last_error", "attempts"]
    await message.save(using_db=tx.conn, update_fields=fields)
    return emit_message(tx, message, queue.name, event)


async def _bury(tx: Tx, queue: Queue, message: Message) -> MessageOut:
    message.status, message.finished_at, message.updated_at = MessageStatus.dead, tx.now, tx.now
    await message.save(using_db=tx.conn, update_fields=["status", "finished_at", "updated_at", "last_error"])
    await notify_owner(tx, queue, dead_letter_alert(queue, message))
    return emit_message(tx, message, queue.name, "message.dead")


async def _extend(name: str, outcome: Outcome, visibility_timeout: float | None, tx: Tx) -> MessageOut:
    queue = await live_queue_in(tx, name)
    message = await _leased(tx, queue, outcome)
    seconds = visibility_timeout or queue.visibility_timeout
    message.lease_expires_at, message.updated_at = tx.now + timedelta(seconds=seconds), tx.now
    await message.save(using_db=tx.conn, update_fields=["lease_expires_at", "updated_at"])
    return emit_message(tx, message, name, "message.extended")


async def _redrive(name: str, ids: Sequence[str] | None, tx: Tx) -> list[MessageOut]:
    queue = await live_queue_in(tx, name)
    query = Message.filter(queue_id=queue.id, status=MessageStatus.dead)
    if ids is not None:
        query = query.filter(id__in=list(ids))
    dead = await query.order_by("created_at", "id").limit(REDRIVE_LIMIT).using_db(tx.conn)
    if ids is not None and len(dead) != len(set(ids)):
        missing = sorted(set(ids) - {m.id for m in dead})
        raise validation_error(
            {"ids": [f"not dead in {name!r}: {', '.join(missing)}"]}, "some ids are not dead"
        )
    redriven = []
    for message in dead:
        message.attempts, message.finished_at = 0, None
        redriven.append(await _requeue(tx, queue, message, tx.now, "message.redriven"))
    return redriven


async def _release_expired(queue: Queue | None, limit: int, tx: Tx) -> int:
    query = Message.filter(status=MessageStatus.processing, lease_expires_at__lte=tx.now)
    if queue is not None:
        query = query.filter(queue_id=queue.id)
    query = query.order_by("lease_expires_at").limit(limit).using_db(tx.conn)
    expired = await (query if tx.is_sqlite else query.select_for_update(skip_locked=True))
    queues = {queue.id: queue} if queue else await _queues_of(tx, expired)
    for message in expired:
        owner = queues[message.queue_id]
        message.last_error = message.last_error or "lease expired"
        if message.attempts >= owner.max_attempts:
            await _bury(tx, owner, message)
        else:
            await _requeue(tx, owner, message, tx.now, "message.released")
    return len(expired)


async def _queues_of(tx: Tx, messages: Sequence[Message]) -> dict[int, Queue]:
    ids = {m.queue_id for m in messages}
    return {q.id: q for q in await Queue.filter(id__in=ids).using_db(tx.conn)} if ids else {}
