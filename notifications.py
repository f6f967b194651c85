"""Notifications: what needs a person, in their own ordered log, pushed live to their browser.

Each recipient's notifications form the log `user:<subject>`, streamed like a queue's log.
Every operation is scoped to one recipient: nobody reaches another person's notifications.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from tortoise.expressions import Q
from tortoise.functions import Count, Min
from tortoise.queryset import QuerySet

from errors import not_found
from event_log import user_log
from isolation import Failures, isolated
from models import Message, MessageStatus, Notification, NotificationPriority, Queue, new_id, utcnow
from schemas import NotificationCreate, NotificationOut, NotificationStats
from writer import Tx, Writer


@dataclass(frozen=True)
class NotificationFilter:
    unread_only: bool = False
    priority: NotificationPriority | None = None
    type: str | None = None


@dataclass(frozen=True)
class Alert:
    """A notification the hub raises by itself (dead letters, backlogs)."""

    type: str
    priority: NotificationPriority
    title: str
    message: str
    queue: str | None = None
    message_id: str | None = None
    action_url: str | None = None


class Notifications:
    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self._backlog_failures = Failures()

    async def create(self, spec: NotificationCreate) -> list[NotificationOut]:
        alert = Alert(
            spec.type,
            NotificationPriority[spec.priority],
            spec.title,
            spec.message,
            spec.queue,
            spec.message_id,
            spec.action_url,
        )
        recipients = list(dict.fromkeys(spec.recipients))  # each person once, in the order given
        return await self.writer.run(partial(_create_many, recipients, alert, spec.expires_at))

    async def list(
        self, subject: str, where: NotificationFilter, limit: int, offset: int
    ) -> tuple[list[NotificationOut], int]:
        query = filtered_notifications(subject, where)
        total = await query.count()
        rows = await query.order_by("-id").offset(offset).limit(limit)
        return [NotificationOut.of(row) for row in rows], total

    async def unread_count(self, subject: str) -> int:
        return await _visible(subject).filter(is_read=False).count()

    async def stats(self, subject: str) -> NotificationStats:
        rows = await (
            _visible(subject)
            .annotate(n=Count("id"))
            .group_by("type", "priority", "is_read")
            .values("type", "priority", "is_read", "n")
        )
        return _stats(rows)

    async def set_read(self, subject: str, notification_id: str, is_read: bool) -> NotificationOut:
        return await self.writer.run(partial(_set_read, subject, notification_id, is_read))

    async def mark_all_read(self, subject: str) -> int:
        return await self.writer.run(partial(_mark_all_read, subject))

    async def delete(self, subject: str, notification_id: str) -> NotificationOut:
        return await self.writer.run(partial(_delete, subject, notification_id))

    async def remove_expired(self, limit: int) -> int:
        return await self.writer.run(partial(_remove_expired, limit))

    async def check_backlogs(self) -> int:
        """Tell owners about backlogs older than their queue's `alert_after`, once per episode."""
        return await self.writer.run(partial(_check_backlogs, self._backlog_failures))


async def notify(tx: Tx, recipient: str, alert: Alert, expires_at: datetime | None = None) -> NotificationOut:
    """Create one notification inside an operation already running in the writer."""
    row = Notification(
        id=new_id(),
        recipient=recipient,
        type=alert.type,
        priority=alert.priority,
        title=alert.title,
        message=alert.message,
        queue=alert.queue,
        message_id=alert.message_id,
        action_url=alert.action_url,
        created_at=tx.now,
        expires_at=expires_at,
    )
    await row.save(using_db=tx.conn, force_create=True)
    return _emit(tx, row, "notification.created")


async def notify_owner(tx: Tx, queue: Queue, alert: Alert) -> NotificationOut:
    return await notify(tx, queue.owner, alert)


def _emit(tx: Tx, row: Notification, event: str, deleted: bool = False) -> NotificationOut:
    resource = NotificationOut.of(row, deleted_at=tx.now if deleted else None)
    tx.emit(user_log(row.recipient), event, resource.model_dump_json())
    return resource


async def _create_many(
    recipients: Sequence[str], alert: Alert, expires_at: datetime | None, tx: Tx
) -> list[NotificationOut]:
    return [await notify(tx, recipient, alert, expires_at) for recipient in recipients]


async def _owned(tx: Tx, subject: str, notification_id: str) -> Notification:
    row = await Notification.filter(id=notification_id, recipient=subject).using_db(tx.conn).first()
    if row is None:
        # Someone else's notification is, to this caller, no notification at all.
        raise not_found("notification", notification_id)
    return row


async def _set_read(subject: str, notification_id: str, is_read: bool, tx: Tx) -> NotificationOut:
    row = await _owned(tx, subject, notification_id)
    if row.is_read == is_read:
        return NotificationOut.of(row)
    row.is_read, row.read_at = is_read, tx.now if is_read else None
    await row.save(using_db=tx.conn, update_fields=["is_read", "read_at"])
    return _emit(tx, row, "notification.read")


async def _mark_all_read(subject: str, tx: Tx) -> int:
    unread = await Notification.filter(recipient=subject, is_read=False).order_by("id").using_db(tx.conn)
    if unread:
        await (
            Notification.filter(id__in=[row.id for row in unread])
            .using_db(tx.conn)
            .update(is_read=True, read_at=tx.now)
        )
    for row in unread:
        row.is_read, row.read_at = True, tx.now
        _emit(tx, row, "notification.read")
    return len(unread)


async def _delete(subject: str, notification_id: str, tx: Tx) -> NotificationOut:
    row = await _owned(tx, subject, notification_id)
    await row.delete(using_db=tx.conn)
    return _emit(tx, row, "notification.deleted", deleted=True)


async def _remove_expired(limit: int, tx: Tx) -> int:
    query = Notification.filter(expires_at__lt=tx.now).order_by("expires_at").limit(limit)
    expired = await query.using_db(tx.conn)
    if expired:
        await Notification.filter(id__in=[row.id for row in expired]).using_db(tx.conn).delete()
    for row in expired:
        _emit(tx, row, "notification.deleted", deleted=True)
    return len(expired)


async def _check_backlogs(failures: Failures, tx: Tx) -> int:
    watched = await Queue.filter(alert_after__isnull=False, deleted_at__isnull=True).using_db(tx.conn)
    oldest = await _oldest_waiting(tx, [queue.id for queue in watched])
    raised = 0
    for queue in watched:
        check = partial(_check_backlog, tx, queue, oldest.get(queue.id))
        raised += await isolated(tx, failures, f"the backlog check of queue {queue.name!r}", check) or 0
    return raised


async def _oldest_waiting(tx: Tx, queue_ids: list[int]) -> dict[int, datetime]:
    """When the oldest available pending message of each queue became available."""
    if not queue_ids:
        return {}
    waiting = Message.filter(queue_id__in=queue_ids, status=MessageStatus.pending, available_at__lte=tx.now)
    per_queue = waiting.using_db(tx.conn).annotate(oldest=Min("available_at")).group_by("queue_id")
    return {row["queue_id"]: row["oldest"] for row in await per_queue.values("queue_id", "oldest")}


async def _check_backlog(tx: Tx, queue: Queue, oldest: datetime | None) -> int:
    late = oldest is not None and tx.now - oldest > timedelta(seconds=queue.alert_after or 0)
    if late == queue.alert_active:
        return 0  # no change: still calm, or this episode was already announced
    queue.alert_active = late
    await queue.save(using_db=tx.conn, update_fields=["alert_active"])
    if not late:
        return 0
    await notify_owner(tx, queue, _backlog_alert(queue))
    return 1


def _backlog_alert(queue: Queue) -> Alert:
    return Alert(
        type="queue.backlog",
        priority=NotificationPriority.high,
        title=f"Backlog in {queue.name}",
        message=f"The oldest pending message has waited more than {queue.alert_after} s.",
        queue=queue.name,
        action_url=f"/api/v1/queues/{queue.name}",
    )


def dead_letter_alert(queue: Queue, message: Message) -> Alert:
    return Alert(
        type="message.dead",
        priority=NotificationPriority.urgent if queue.dead_letter_urgent else NotificationPriority.high,
        title=f"A message in {queue.name} is dead",
        message=f"After {message.attempts} attempts: {message.last_error or 'no error given'}",
        queue=queue.name,
        message_id=message.id,
        action_url=f"/api/v1/queues/{queue.name}/messages/{message.id}",
    )


def _visible(subject: str) -> QuerySet[Notification]:
    """A person's notifications, less those past `expires_at` that the sweeper has not removed yet."""
    return Notification.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=utcnow()), recipient=subject)


def filtered_notifications(subject: str, where: NotificationFilter) -> QuerySet[Notification]:
    query = _visible(subject)
    if where.unread_only:
        query = query.filter(is_read=False)
    if where.priority is not None:
        query = query.filter(priority=where.priority)
    if where.type is not None:
        query = query.filter(type=where.type)
    return query


def _stats(rows: Sequence[dict[str, object]]) -> NotificationStats:
    by_type: dict[str, int] = {}
    by_priority = {p.name: 0 for p in NotificationPriority}
    total = unread = urgent = 0
    for row in rows:
        n, priority = int(str(row["n"])), NotificationPriority(int(str(row["priority"]))).name
        total += n
        by_type[str(row["type"])] = by_type.get(str(row["type"]), 0) + n
        by_priority[priority] += n
        if not row["is_read"]:
            unread += n
            urgent += n if priority == "urgent" else 0
    return NotificationStats(
        total=total, unread=unread, urgent_count=urgent, by_type=by_type, by_priority=by_priority
    )
