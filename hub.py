"""Pombo's domain operations. Each change runs through the writer: rows and events, one commit.

Reads go straight to the database. Nothing here knows about HTTP beyond the error catalog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from tortoise.functions import Count
from tortoise.queryset import QuerySet

import tracing
from auth import Principal
from count_cache import CountCache
from errors import conflict, not_found, validation_error
from event_log import queue_log, trim
from isolation import Failures, isolated
from models import EventLog, Message, MessageStatus, NewMessage, Priority, Queue, new_id, utcnow
from schemas import Draft, MessageOut, QueueCreate, QueueOut, QueueUpdate
from settings import Settings
from writer import Tx, Writer


@dataclass(frozen=True)
class Published:
    id: str
    json: str  # the message as MessageOut, encoded once: its event's data and the response body
    created: bool  # False when an idempotency key returned an earlier message


@dataclass(frozen=True)
class MessageFilter:
    status: MessageStatus | None = None
    type: str | None = None
    priority: Priority | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass(frozen=True)
class Window:
    limit: int
    offset: int


class Hub:
    def __init__(self, settings: Settings, writer: Writer, counts: CountCache) -> None:
        self.settings = settings
        self.writer = writer
        self.counts = counts
        self._expiry_failures = Failures()

    # Queues ------------------------------------------------------------------------------

    async def create_queue(self, spec: QueueCreate, owner: str) -> QueueOut:
        async def create(tx: Tx) -> QueueOut:
            existing = await queue_in(tx, spec.name)
            if existing is not None:
                code = "queue_deleted" if existing.deleted_at else "queue_exists"
                raise conflict(code, f"queue {spec.name!r} already exists", queue=spec.name)
            return QueueOut.of(await _create_queue(tx, spec, owner))

        return await self.writer.run(create)

    async def update_queue(self, name: str, patch: QueueUpdate) -> QueueOut:
        changes = patch.model_dump(exclude_unset=True)

        async def update(tx: Tx) -> QueueOut:
            queue = await live_queue_in(tx, name)
            queue.update_from_dict(changes)
            queue.updated_at = tx.now
            await queue.save(using_db=tx.conn, update_fields=[*changes, "updated_at"])
            return await _emit_queue(tx, queue, "queue.updated")

        return await self.writer.run(update)

    async def delete_queue(self, name: str) -> QueueOut:
        return await self._set_deleted(name, deleted=True)

    async def restore_queue(self, name: str) -> QueueOut:
        return await self._set_deleted(name, deleted=False)

    async def _set_deleted(self, name: str, deleted: bool) -> QueueOut:
        async def change(tx: Tx) -> QueueOut:
            queue = await queue_in(tx, name)
            if queue is None or (queue.deleted_at is None) != deleted:
                raise not_found("queue", name)
            queue.deleted_at = tx.now if deleted else None
            queue.updated_at = tx.now
            await queue.save(using_db=tx.conn, update_fields=["deleted_at", "updated_at"])
            return await _emit_queue(tx, queue, "queue.deleted" if deleted else "queue.restored")

        return await self.writer.run(change)

    async def get_queue(self, name: str, include_deleted: bool = False) -> QueueOut:
        queue = await Queue.filter(name=name).first()
        if queue is None or (queue.deleted_at is not None and not include_deleted):
            raise not_found("queue", name)
        counts = await self.counts.of({queue_log(name): queue}, _status_counts)
        return QueueOut.of(queue, counts.get(queue.id))

    async def list_queues(
        self, principal: Principal, include_deleted: bool, window: Window, name_contains: str = ""
    ) -> tuple[list[QueueOut], int]:
        query = Queue.all() if include_deleted else Queue.filter(deleted_at__isnull=True)
        # Matched here, not with LIKE, where `_` (which queue names may hold) is a wildcard.
        named = [q for q in await query.order_by("name") if name_contains in q.name]
        visible = [q for q in named if _may_see(principal, q)]
        page = visible[window.offset : window.offset + window.limit]
        counts = await self.counts.of({queue_log(q.name): q for q in page}, _status_counts)
        return [QueueOut.of(q, counts.get(q.id)) for q in page], len(visible)

    # Messages ----------------------------------------------------------------------------

    async def publish(self, name: str, drafts: Sequence[Draft], principal: Principal) -> list[Published]:
        """All or nothing. Creates the queue when the caller may manage that name."""
        owner = principal.subject if principal.can("manage", name) else None
        _reject_repeated_keys(drafts)
        # Built before the writer's turn, so that this work overlaps other groups' database
        # time instead of adding to it. A message's time is when it arrived.
        arrived, trace = utcnow(), tracing.current()  # each message keeps its publish's trace
        prepared: list[_Fresh] = []
        for start in range(0, len(drafts), _PREPARE_SLICE):
            if start:
                await asyncio.sleep(0)  # let the writer take its next step in between
            some = drafts[start : start + _PREPARE_SLICE]
            prepared += [_Fresh.of(draft, name, arrived, trace) for draft in some]

        async def publish(tx: Tx) -> list[Published]:
            queue = await live_queue_in(tx, name, create_for=owner)
            earlier = await _earlier_by_key(tx, queue, drafts, self.settings.idempotency_seconds)
            fresh = [p for p in prepared if p.row.idempotency_key not in earlier]
            await _release_stale_keys(tx, queue, [p.row for p in fresh])
            tx.insert_later(Message, [vars(p.row) | {"queue_id": queue.id} for p in fresh])
            for p in fresh:
                tx.emit(queue_log(name), "message.created", p.published.json)
            return [
                _republished(earlier[p.row.idempotency_key], name)
                if p.row.idempotency_key in earlier
                else p.published
                for p in prepared
            ]

        return await self.writer.run(publish)

    async def get_message(self, name: str, message_id: str) -> MessageOut:
        queue = await self.live_queue(name)
        message = await Message.filter(id=message_id, queue_id=queue.id).first()
        if message is None:
            raise not_found("message", message_id)
        return MessageOut.of(message, name)

    async def list_messages(
        self, name: str, where: MessageFilter, window: Window
    ) -> tuple[list[MessageOut], int]:
        queue = await self.live_queue(name)
        query = filtered_messages(Message.filter(queue_id=queue.id), where)
        total = await query.count()
        rows = await query.order_by("created_at", "id").offset(window.offset).limit(window.limit)
        return [MessageOut.of(m, name) for m in rows], total

    async def delete_message(self, name: str, message_id: str) -> MessageOut:
        async def delete(tx: Tx) -> MessageOut:
            queue = await live_queue_in(tx, name)
            message = await Message.filter(id=message_id, queue_id=queue.id).using_db(tx.conn).first()
            if message is None:
                raise not_found("message", message_id)
            await message.delete(using_db=tx.conn)
            return emit_message(tx, message, name, "message.deleted", deleted=True)

        return await self.writer.run(delete)

    async def expire_messages(self, limit: int) -> int:
        """Remove messages older than their queue's retention (zero keeps them forever)."""

        async def expire(tx: Tx) -> int:
            removed, failures = 0, self._expiry_failures
            for queue in await Queue.filter(retention_seconds__gt=0).using_db(tx.conn):
                part = partial(_expire_in, tx, queue, limit - removed)
                removed += await isolated(tx, failures, f"retention in queue {queue.name!r}", part) or 0
                if removed >= limit:
                    break
            return removed

        return await self.writer.run(expire)

    async def trim_logs(self, older_than: float, limit: int) -> int:
        """Drop events past the log retention; streams behind them get `stream.reset`."""

        async def trim_old(tx: Tx) -> int:
            return await trim(tx.conn, tx.now - timedelta(seconds=older_than), limit)

        return await self.writer.run(trim_old)

    # Logs --------------------------------------------------------------------------------

    async def live_queue(self, name: str) -> Queue:
        queue = await Queue.filter(name=name, deleted_at__isnull=True).first()
        if queue is None:
            raise not_found("queue", name)
        return queue

    async def live_queue_names(self) -> list[str]:
        names = await Queue.filter(deleted_at__isnull=True).values_list("name", flat=True)
        return [str(name) for name in names]


async def _expire_in(tx: Tx, queue: Queue, limit: int) -> int:
    cutoff = tx.now - timedelta(seconds=queue.retention_seconds)
    query = Message.filter(queue_id=queue.id, created_at__lt=cutoff).using_db(tx.conn)
    old = await query.order_by("created_at").limit(limit)
    await Message.filter(id__in=[m.id for m in old]).using_db(tx.conn).delete()
    for message in old:
        emit_message(tx, message, queue.name, "message.expired", deleted=True)
    return len(old)


async def _create_queue(tx: Tx, spec: QueueCreate, owner: str) -> Queue:
    fields = spec.model_dump()
    queue = await Queue.create(using_db=tx.conn, owner=owner, created_at=tx.now, updated_at=tx.now, **fields)
    await EventLog.create(using_db=tx.conn, name=queue_log(queue.name), last_seq=0)
    tx.queues[queue.name] = queue
    tx.emit(queue_log(queue.name), "queue.created", QueueOut.of(queue).model_dump_json())
    return queue


async def _emit_queue(tx: Tx, queue: Queue, event: str) -> QueueOut:
    counts = await _status_counts([queue.id], tx)
    resource = QueueOut.of(queue, counts.get(queue.id))
    tx.emit(queue_log(queue.name), event, resource.model_dump_json())
    return resource


async def queue_in(tx: Tx, name: str) -> Queue | None:
    """The queue row, read once per transaction, and once for all while the writer knows it.

    Operations change it in place and save only the fields they change, so the row the writer
    keeps stays the row stored (notifications change `alert_active` on rows of their own).
    """
    if name not in tx.queues:
        known = tx.known_queues.get(name) if tx.known_queues is not None else None
        queue = known or await Queue.filter(name=name).using_db(tx.conn).first()
        if queue is None:
            return None
        tx.queues[name] = queue
    return tx.queues[name]


async def live_queue_in(tx: Tx, name: str, create_for: str | None = None) -> Queue:
    queue = await queue_in(tx, name)
    if queue is not None and queue.deleted_at is None:
        return queue
    if queue is None and create_for is not None:
        return await _create_queue(tx, QueueCreate(name=name), create_for)
    raise not_found("queue", name)


def emit_message(
    tx: Tx, message: Message | NewMessage, queue: str, event: str, deleted: bool = False
) -> MessageOut:
    resource = MessageOut.of(message, queue, deleted_at=tx.now if deleted else None)
    tx.emit(queue_log(queue), event, resource.model_dump_json())
    return resource


def _republished(message: Message, queue: str) -> Published:
    return Published(message.id, MessageOut.json_of(message, queue), created=False)


_PREPARE_SLICE = 100


@dataclass
class _Fresh:
    """A message about to be published: its row, less the queue id, and its answer."""

    row: NewMessage
    published: Published

    @classmethod
    def of(cls, draft: Draft, queue: str, now: datetime, traceparent: str | None) -> _Fresh:
        row = NewMessage(
            id=new_id(),
            queue_id=0,  # known inside the transaction that finds or creates the queue
            body=draft.body,
            content_type=draft.content_type,
            type=draft.type,
            priority=draft.priority,
            headers=draft.headers,
            idempotency_key=draft.idempotency_key,
            available_at=draft.available_at(now),
            created_at=now,
            updated_at=now,
            traceparent=traceparent,
        )
        return cls(row, Published(row.id, MessageOut.json_of(row, queue), created=True))


async def _status_counts(queue_ids: list[int], tx: Tx | None = None) -> dict[int, dict[str, int]]:
    if not queue_ids:
        return {}
    query = Message.filter(queue_id__in=queue_ids)
    if tx is not None:
        query = query.using_db(tx.conn)
    rows = (
        await query.annotate(n=Count("id")).group_by("queue_id", "status").values("queue_id", "status", "n")
    )
    counts: dict[int, dict[str, int]] = {}
    for row in rows:
        status = row["status"].value if isinstance(row["status"], MessageStatus) else str(row["status"])
        counts.setdefault(row["queue_id"], {})[status] = row["n"]
    return counts


def _may_see(principal: Principal, queue: Queue) -> bool:
    """Deleted queues are shown to their managers only."""
    if queue.deleted_at is not None:
        return principal.can("manage", queue.name)
    return principal.can("subscribe", queue.name) or principal.can("manage", queue.name)


def _reject_repeated_keys(drafts: Sequence[Draft]) -> None:
    seen: dict[str, int] = {}
    for index, draft in enumerate(drafts):
        key = draft.idempotency_key
        if key is not None and key in seen:
            problem = [f"idempotency_key repeats item {seen[key]}"]
            raise validation_error({"items": {str(index): problem}}, "idempotency keys repeat in the batch")
        if key is not None:
            seen[key] = index


async def _earlier_by_key(
    tx: Tx, queue: Queue, drafts: Sequence[Draft], ttl: float
) -> dict[str | None, Message]:
    """Messages published earlier with the same keys, still within the idempotency window."""
    keys = [d.idempotency_key for d in drafts if d.idempotency_key is not None]
    if not keys:
        return {}
    since = tx.now - timedelta(seconds=ttl)
    rows = await Message.filter(queue_id=queue.id, idempotency_key__in=keys, created_at__gte=since).using_db(
        tx.conn
    )
    earlier: dict[str | None, Message] = {m.idempotency_key: m for m in rows}
    for draft in drafts:
        match = earlier.get(draft.idempotency_key)
        if match is not None and not draft.same_as(match):
            raise conflict(
                "idempotency_conflict",
                "this idempotency key was used for a different message",
                key=draft.idempotency_key,
                message_id=match.id,
            )
    return earlier


async def _release_stale_keys(tx: Tx, queue: Queue, fresh: Sequence[NewMessage]) -> None:
    """Keys older than the window may be used again: unset them on the old messages."""
    keys = [m.idempotency_key for m in fresh if m.idempotency_key is not None]
    if keys:
        await (
            Message.filter(queue_id=queue.id, idempotency_key__in=keys)
            .using_db(tx.conn)
            .update(idempotency_key=None)
        )


def filtered_messages(query: QuerySet[Message], where: MessageFilter) -> QuerySet[Message]:
    conditions: dict[str, Any] = {
        "status": where.status,
        "type": where.type,
        "priority": where.priority,
        # In UTC already (schemas.UtcDatetime): SQLite compares stored times as text.
        "created_at__gte": where.created_after,
        "created_at__lt": where.created_before,
    }
    given = {key: value for key, value in conditions.items() if value is not None}
    return query.filter(**given) if given else query
