"""Consumption: a claim takes a lease; ack, nack and extend need it; expired leases come back.

Every transition runs through the writer and appends its event, so a stream shows work move.
Claims lock rows with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas never hand one message
to two live leases; on SQLite the single writer already serialises them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from tortoise.fields import DatetimeField

from broker import Broker, Subscriber
from errors import conflict, not_found, validation_error
from event_log import queue_log
from hub import emit_message, live_queue_in
from models import Message, MessageStatus, NewMessage, Queue, new_id
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
        if request.wait <= 0:  # no subscription: every event of the queue would visit it
            claimed, _ = await self.writer.run(partial(_claim, name, request))
            return claimed
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


# One statement per claim: pick the messages in index order and lease them. On PostgreSQL the
# pick skips rows another replica has locked, so two replicas never lease one message.
_CLAIM = (
    "UPDATE messages SET status = ?, lease_id = ?, lease_expires_at = ?, attempts = attempts + 1, "
    "updated_at = ? WHERE id IN (SELECT id FROM messages WHERE queue_id = ? AND status = ? "
    "AND available_at <= ? ORDER BY priority, id LIMIT ?{lock}) RETURNING {columns}"
)


async def _claim(name: str, request: Claim, tx: Tx) -> tuple[list[ClaimedMessage], datetime | None]:
    queue = await live_queue_in(tx, name)
    # Expired leases come back through the sweeper (every `sweep_seconds`), not on this hot path.
    lease, expires = (
        new_id(),
        tx.now + timedelta(seconds=request.visibility_timeout or queue.visibility_timeout),
    )
    values = [MessageStatus.processing, lease, _db("lease_expires_at", expires), _db("updated_at", tx.now)]
    values += [queue.id, MessageStatus.pending, _db("available_at", tx.now), request.max]
    lock = "" if tx.is_sqlite else " FOR UPDATE SKIP LOCKED"
    rows = await tx.conn.execute_query_dict(tx.sql(_CLAIM.format(lock=lock, columns=_columns())), values)
    if not rows:
        return [], await _next_available(tx, queue)
    # RETURNING keeps no order: put them back in claim order.
    messages = sorted(map(_message, rows), key=lambda m: (m.priority, m.id))
    claimed = []
    for message in messages:
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
    expires = message.lease_expires_at
    _check(outcome, Held(message.lease_id, message.status, expires is not None and expires > tx.now))
    return message


@dataclass(frozen=True)
class Held:
    """What decides whether a lease still holds its message."""

    lease_id: str | None
    status: str
    live: bool  # the lease has not expired


def _check(outcome: Outcome, held: Held | None) -> None:
    """Raise the 409 (or 404) that a call with this lease gets; before anything is written."""
    if held is None:
        raise not_found("message", outcome.message_id)
    if held.lease_id != outcome.lease_id or held.status == MessageStatus.done:
        raise conflict(
            "lease_mismatch", "this lease does not hold the message", message_id=outcome.message_id
        )
    if held.status != MessageStatus.processing or not held.live:
        raise conflict(
            "lease_expired",
            "the lease expired; the message may be claimed again",
            message_id=outcome.message_id,
        )


# Every pair must hold, or nothing is written: a batch ack is all or none in one statement.
_FINISH_HELD = (
    "WITH held AS MATERIALIZED (SELECT id FROM messages WHERE queue_id = ? AND status = ? "
    "AND lease_expires_at > ? AND id IN ({ids}) AND (id, lease_id) IN (VALUES {pairs}){lock}) "
    "UPDATE messages SET status = ?, finished_at = ?, updated_at = ? "
    "WHERE id IN (SELECT id FROM held) AND (SELECT count(*) FROM held) = ? RETURNING {columns}"
)
_HELD = (
    "SELECT id, lease_id, status, lease_expires_at > ? AS live FROM messages "
    "WHERE queue_id = ? AND id IN ({ids}){lock}"
)
_FINISH = (
    "UPDATE messages SET status = ?, finished_at = ?, updated_at = ? WHERE id IN ({ids}) RETURNING {columns}"
)


async def _ack(name: str, outcomes: Sequence[Outcome], tx: Tx) -> list[MessageOut]:
    queue = await live_queue_in(tx, name)
    pairs = list(dict.fromkeys((outcome.message_id, outcome.lease_id) for outcome in outcomes))
    ids = list(dict.fromkeys(message_id for message_id, _ in pairs))
    rows = await _finish_held(tx, queue, pairs, ids)
    if not rows:  # some lease does not hold: say which, or (it changed meanwhile) finish them now
        await _check_held(tx, queue, outcomes, ids)
        rows = await _finish(tx, ids)
    done = {message.id: message for message in map(_message, rows)}
    return [emit_message(tx, done[outcome.message_id], name, "message.acked") for outcome in outcomes]


async def _finish_held(
    tx: Tx, queue: Queue, pairs: list[tuple[str, str]], ids: list[str]
) -> list[dict[str, Any]]:
    now, processing, done = _db("updated_at", tx.now), MessageStatus.processing, MessageStatus.done
    sql = _FINISH_HELD.format(
        ids=_marks(len(ids)),
        pairs=", ".join(["(?, ?)"] * len(pairs)),
        lock="" if tx.is_sqlite else " FOR UPDATE",
        columns=_columns(),
    )
    values = [
        queue.id,
        processing,
        now,
        *ids,
        *(v for pair in pairs for v in pair),
        done,
        now,
        now,
        len(pairs),
    ]
    return await tx.conn.execute_query_dict(tx.sql(sql), values)


async def _check_held(tx: Tx, queue: Queue, outcomes: Sequence[Outcome], ids: list[str]) -> None:
    """Lock the messages and check every lease in order; the first that does not hold raises."""
    sql = _HELD.format(ids=_marks(len(ids)), lock="" if tx.is_sqlite else " FOR UPDATE")
    rows = await tx.conn.execute_query_dict(tx.sql(sql), [_db("lease_expires_at", tx.now), queue.id, *ids])
    held = {row["id"]: Held(row["lease_id"], row["status"], bool(row["live"])) for row in rows}
    for outcome in outcomes:
        _check(outcome, held.get(outcome.message_id))


async def _finish(tx: Tx, ids: list[str]) -> list[dict[str, Any]]:
    now = _db("updated_at", tx.now)
    sql = tx.sql(_FINISH.format(ids=_marks(len(ids)), columns=_columns()))
    return await tx.conn.execute_query_dict(sql, [MessageStatus.done, now, now, *ids])


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


def _columns() -> str:
    """Every column of a message row, for RETURNING (Tortoise knows them once it is initialised)."""
    return ", ".join(Message._meta.fields_db_projection.values())


def _db(field: str, value: Any) -> Any:
    """A value as Tortoise stores it in this field, so raw SQL compares and writes alike."""
    return Message._meta.fields_map[field].to_db_value(value, Message)


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _message(row: Mapping[str, Any]) -> NewMessage:
    """A message row from raw SQL, converted as Tortoise converts it, without a model object."""
    values = {}
    for name, column in Message._meta.fields_db_projection.items():
        field, value = Message._meta.fields_map[name], row[column]
        if isinstance(value, str) and isinstance(field, DatetimeField):
            # SQLite keeps ISO text: parsed in C here (Tortoise's parser was most of this
            # function's cost); Tortoise still applies its time zone.
            value = datetime.fromisoformat(value)
        values[name] = field.to_python_value(value)
    return NewMessage(**values)
