"""Tortoise models: queues, their messages, the event logs and the tokens we minted."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum

from tortoise import fields
from tortoise.indexes import Index
from tortoise.models import Model

QUEUE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


def utcnow() -> datetime:
    return datetime.now(UTC)


_last_id = [0, 0]  # (milliseconds, counter) of the last id this process made


def new_id() -> str:
    """A UUIDv7 (RFC 9562) that also sorts in creation order within one millisecond."""
    millis = max(time.time_ns() // 1_000_000, _last_id[0])
    counter = _last_id[1] + 1 if millis == _last_id[0] else 0
    if counter > 0xFFF:  # 4,096 ids in one millisecond: borrow the next one
        millis, counter = millis + 1, 0
    _last_id[:] = [millis, counter]
    # Unique, not secret (scopes guard messages, not their ids); and os.urandom would hand the
    # GIL to the writer's thread on every call, a wait of up to 5 ms to get it back.
    random_bits = random.getrandbits(62)
    value = (millis << 80) | (0x7 << 76) | (counter << 64) | (0x2 << 62) | random_bits
    digits = f"{value:032x}"  # what str(uuid.UUID(int=value)) gives, at a fifth of the cost
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


class Priority(IntEnum):
    """Stored as a number so that claims take messages in index order: most urgent, then oldest."""

    urgent = 0
    high = 1
    normal = 2
    low = 3


class MessageStatus(StrEnum):
    pending = "pending"
    processing = "processing"
    done = "done"
    dead = "dead"


class Queue(Model):
    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=64, unique=True)
    description = fields.TextField(default="")
    owner = fields.CharField(max_length=255)
    visibility_timeout = fields.FloatField(default=30.0)
    max_attempts = fields.IntField(default=5)
    backoff_base = fields.FloatField(default=1.0)
    backoff_max = fields.FloatField(default=300.0)
    # Zero keeps messages forever.
    retention_seconds = fields.IntField(default=14 * 24 * 3600)
    # The owner is told when the oldest pending message is older than this (null: never),
    # once per episode: `alert_active` remembers that this backlog was already announced.
    alert_after = fields.IntField(null=True)
    alert_active = fields.BooleanField(default=False)
    dead_letter_urgent = fields.BooleanField(default=False)
    # Set by the hub to its transaction's time, so they match the event that tells of them.
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()
    deleted_at = fields.DatetimeField(null=True)

    class Meta:
        table = "queues"


@dataclass
class NewMessage:
    """A message row as plain attributes, no ORM machinery: one about to be inserted by a publish,
    or one a claim or an ack read back."""

    id: str
    queue_id: int
    body: str
    content_type: str
    type: str
    priority: Priority
    headers: dict[str, str]
    idempotency_key: str | None
    available_at: datetime
    created_at: datetime
    updated_at: datetime
    status: MessageStatus = MessageStatus.pending
    attempts: int = 0
    lease_id: str | None = None
    lease_expires_at: datetime | None = None
    last_error: str | None = None
    finished_at: datetime | None = None
    traceparent: str | None = None


class Message(Model):
    id = fields.CharField(max_length=36, primary_key=True)
    queue: fields.ForeignKeyRelation[Queue] = fields.ForeignKeyField(
        "pombo.Queue", related_name="messages", on_delete=fields.CASCADE
    )
    queue_id: int
    body = fields.TextField()
    # application/json keeps `body` as JSON text; anything else is text as sent.
    content_type = fields.CharField(max_length=255)
    type = fields.CharField(max_length=64, default="")
    priority = fields.IntEnumField(Priority, default=Priority.normal)
    headers: dict[str, str] = fields.JSONField(default=dict)
    status = fields.CharEnumField(MessageStatus, max_length=16, default=MessageStatus.pending)
    idempotency_key = fields.CharField(max_length=255, null=True)
    attempts = fields.IntField(default=0)
    available_at = fields.DatetimeField()
    lease_id = fields.CharField(max_length=36, null=True)
    lease_expires_at = fields.DatetimeField(null=True)
    last_error = fields.TextField(null=True)
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()
    finished_at = fields.DatetimeField(null=True)
    # The W3C traceparent of the publish (tracing.py), handed to the worker that claims it.
    traceparent = fields.CharField(max_length=55, null=True)

    class Meta:
        table = "messages"
        unique_together = (("queue", "idempotency_key"),)
        indexes = (
            # Claims walk this index in order: (priority, id) is "most urgent, then oldest".
            Index(fields=("queue_id", "status", "priority", "id")),
            Index(fields=("queue_id", "created_at")),
        )


# One row per ordered log: bumping last_seq inside a transaction orders its commits.
# (No docstrings on models: Tortoise turns them into SQL table comments.)
class EventLog(Model):
    name = fields.CharField(max_length=300, primary_key=True)
    last_seq = fields.BigIntField(default=0)

    class Meta:
        table = "event_logs"


class Event(Model):
    id = fields.BigIntField(primary_key=True)
    log = fields.CharField(max_length=300)
    seq = fields.BigIntField()
    type = fields.CharField(max_length=40)
    # Stored encoded: replay sends it as is, never re-encoding.
    data = fields.TextField()
    at = fields.DatetimeField()

    class Meta:
        table = "events"
        unique_together = (("log", "seq"),)
        indexes = (Index(fields=("at",)),)


class NotificationPriority(IntEnum):
    """Most urgent first, like message priorities, so lists sort by index order."""

    urgent = 0
    high = 1
    medium = 2
    low = 3


class Notification(Model):
    id = fields.CharField(max_length=36, primary_key=True)
    recipient = fields.CharField(max_length=255)
    type = fields.CharField(max_length=64)
    priority = fields.IntEnumField(NotificationPriority, default=NotificationPriority.medium)
    title = fields.CharField(max_length=200)
    message = fields.TextField(default="")
    queue = fields.CharField(max_length=64, null=True)
    message_id = fields.CharField(max_length=36, null=True)
    action_url = fields.CharField(max_length=2000, null=True)
    is_read = fields.BooleanField(default=False)
    read_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField()
    expires_at = fields.DatetimeField(null=True)

    class Meta:
        table = "notifications"
        indexes = (
            Index(fields=("recipient", "is_read", "id")),
            Index(fields=("recipient", "id")),
            Index(fields=("expires_at",)),
        )


class Token(Model):
    id = fields.CharField(max_length=36, primary_key=True)
    subject = fields.CharField(max_length=255)
    scopes = fields.TextField()
    created_at = fields.DatetimeField()
    expires_at = fields.DatetimeField()
    revoked_at = fields.DatetimeField(null=True)

    class Meta:
        table = "tokens"
