"""What travels: request and response bodies, and the update the broker carries."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import from_json, to_json

from event_log import Update
from models import (
    QUEUE_NAME_PATTERN,
    Message,
    MessageStatus,
    NewMessage,
    Notification,
    NotificationPriority,
    Priority,
    Queue,
    Token,
    utcnow,
)

PriorityName = Literal["low", "normal", "high", "urgent"]
TYPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$"
JSON = "application/json"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
T = TypeVar("T")
# PostgreSQL's text cannot hold U+0000 and SQLite's can: so that both take the same requests,
# every string the API takes refuses it, by this pattern or a stricter one of its own.
NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, Field(pattern=NO_NUL)]
# The largest integers both databases store: `IntField` is 32-bit on PostgreSQL, the rest 64-bit.
# In seconds INT32_MAX is 68 years, and now ± that is still a date Python computes with.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def _in_utc(moment: datetime) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:00-05:00 is in the year 10000 in UTC
        raise ValueError("out of range once in UTC") from None


# Times are stored and answered in UTC: SQLite compares them as text, where 03:00-05:00 would
# come before 07:00Z.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]


def parse_duration(text: str) -> float:
    """`90`, `30s`, `5m`, `2h`, `30d` → seconds; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 30s, 5m, 2h or 7d)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


# Ten years: any expiry past this is a mistake, and much further one is no date at all.
MAX_TOKEN_LIFETIME = timedelta(days=3650)


def token_lifetime(text: str) -> timedelta:
    """A token's `ttl` (`30d`, `12h`…): more than zero, at most ten years; ValueError otherwise."""
    seconds = parse_duration(text)
    if not 0 < seconds <= MAX_TOKEN_LIFETIME.total_seconds():
        raise ValueError(f"a token lifetime is more than zero and at most 3650d, not {text!r}")
    return timedelta(seconds=seconds)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueueSettings(Strict):
    description: Text = Field(default="", max_length=2000)
    alert_after: int | None = Field(
        default=None, gt=0, le=INT32_MAX, description="tell the owner when a backlog is older"
    )
    dead_letter_urgent: bool = Field(default=False, description="dead-letter notifications are urgent")
    visibility_timeout: float = Field(default=30.0, gt=0, le=12 * 3600)
    max_attempts: int = Field(default=5, ge=1, le=1000)
    backoff_base: float = Field(default=1.0, ge=0, le=3600)
    backoff_max: float = Field(default=300.0, ge=0, le=7 * 86400)
    retention_seconds: int = Field(default=14 * 86400, ge=0, le=INT32_MAX, description="0 keeps them forever")


class QueueCreate(QueueSettings):
    name: str = Field(pattern=QUEUE_NAME_PATTERN)


class QueueUpdate(Strict):
    description: Text | None = Field(default=None, max_length=2000)
    visibility_timeout: float | None = Field(default=None, gt=0, le=12 * 3600)
    max_attempts: int | None = Field(default=None, ge=1, le=1000)
    backoff_base: float | None = Field(default=None, ge=0, le=3600)
    backoff_max: float | None = Field(default=None, ge=0, le=7 * 86400)
    retention_seconds: int | None = Field(default=None, ge=0, le=INT32_MAX)
    alert_after: int | None = Field(default=None, gt=0, le=INT32_MAX)  # null turns the alert off
    dead_letter_urgent: bool | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any, field: ValidationInfo) -> Any:
        # Only called for fields the body gives: left out keeps the setting, null is a mistake.
        if value is None and field.field_name != "alert_after":
            raise ValueError("cannot be null; leave the field out to keep it")
        return value


class QueueOut(QueueSettings):
    model_config = ConfigDict(extra="forbid")
    name: str
    owner: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None
    messages: dict[str, int] = Field(default_factory=dict, description="message counts by status")

    @classmethod
    def of(cls, queue: Queue, counts: dict[str, int] | None = None) -> QueueOut:
        return cls(
            name=queue.name,
            owner=queue.owner,
            description=queue.description,
            visibility_timeout=queue.visibility_timeout,
            max_attempts=queue.max_attempts,
            backoff_base=queue.backoff_base,
            backoff_max=queue.backoff_max,
            retention_seconds=queue.retention_seconds,
            alert_after=queue.alert_after,
            dead_letter_urgent=queue.dead_letter_urgent,
            created_at=queue.created_at,
            updated_at=queue.updated_at,
            deleted_at=queue.deleted_at,
            messages={status.value: (counts or {}).get(status.value, 0) for status in MessageStatus},
        )


# A worker passes each header to its command as POMBO_HEADER_<NAME>: the name must make a
# variable name and neither may hold a NUL, or the command cannot be started at all.
HEADER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
HeaderName = Annotated[str, Field(pattern=HEADER_NAME_PATTERN)]
HeaderValue = Annotated[Text, Field(max_length=4096)]
IdempotencyKey = Annotated[Text, Field(min_length=1, max_length=255)]


class PublishIn(Strict):
    body: Any = Field(description="any JSON value, kept as JSON")
    type: str = Field(default="", pattern=r"^$|" + TYPE_PATTERN)
    priority: PriorityName = "normal"
    delay: float | None = Field(default=None, ge=0, le=365 * 86400)
    not_before: UtcDatetime | None = None
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict, max_length=64)
    idempotency_key: IdempotencyKey | None = None


@dataclass
class Draft:
    """A message validated at the edge, ready for the writer."""

    body: str
    content_type: str
    type: str = ""
    priority: Priority = Priority.normal
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    not_before: datetime | None = None
    idempotency_key: str | None = None

    @classmethod
    def from_json(cls, item: PublishIn) -> Draft:
        return cls(
            # Compact and UTF-8 like json.dumps(separators=(",", ":"), ensure_ascii=False), 7x faster.
            body=to_json(item.body).decode(),
            content_type=JSON,
            type=item.type,
            priority=Priority[item.priority],
            headers=item.headers,
            delay=item.delay or 0.0,
            not_before=item.not_before,
            idempotency_key=item.idempotency_key,
        )

    def available_at(self, now: datetime) -> datetime:
        if not self.delay and self.not_before is None:
            return now  # the very object: a batch's rows then convert it for storage once
        delayed = now + timedelta(seconds=self.delay)
        return max(delayed, self.not_before) if self.not_before else delayed

    def same_as(self, message: Message) -> bool:
        return (self.body, self.content_type, self.type) == (
            message.body,
            message.content_type,
            message.type,
        )


class MessageOut(BaseModel):
    id: str
    queue: str
    body: Any = Field(description="JSON as published, or the text as published")
    content_type: str
    type: str
    priority: PriorityName
    headers: dict[str, str]
    status: MessageStatus
    attempts: int
    idempotency_key: str | None
    available_at: datetime
    lease_expires_at: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    deleted_at: datetime | None = None

    @classmethod
    def of(cls, message: Message | NewMessage, queue: str, deleted_at: datetime | None = None) -> MessageOut:
        return cls(**_message_fields(message, queue, deleted_at))

    @staticmethod
    def json_of(message: Message | NewMessage, queue: str, deleted_at: datetime | None = None) -> str:
        """`of(…).model_dump_json()` without building the model: half the cost, same text."""
        return to_json(_message_fields(message, queue, deleted_at)).decode()


def _message_fields(message: Message | NewMessage, queue: str, deleted_at: datetime | None) -> dict[str, Any]:
    json_body = message.content_type == JSON
    return {
        "id": message.id,
        "queue": queue,
        "body": from_json(message.body) if json_body else message.body,
        "content_type": message.content_type,
        "type": message.type,
        "priority": Priority(message.priority).name,
        "headers": message.headers,
        "status": message.status,
        "attempts": message.attempts,
        "idempotency_key": message.idempotency_key,
        "available_at": message.available_at,
        "lease_expires_at": message.lease_expires_at,
        "last_error": message.last_error,
        "created_at": message.created_at,
        "updated_at": message.updated_at,
        "finished_at": message.finished_at,
        "deleted_at": deleted_at,
    }


class ClaimedMessage(MessageOut):
    lease_id: str = Field(description="send it with ack, nack and extend")


class ClaimIn(Strict):
    max: int = Field(default=1, ge=1, le=100)
    visibility_timeout: float | None = Field(
        default=None, gt=0, le=12 * 3600, description="default: the queue's"
    )
    wait: float = Field(default=0, ge=0, le=20, description="long-poll up to this many seconds")


Id = Annotated[Text, Field(min_length=1, max_length=64)]


class LeaseIn(Strict):
    lease_id: Id


class NackIn(LeaseIn):
    error: Text | None = Field(default=None, max_length=10_000)
    delay: float | None = Field(default=None, ge=0, le=7 * 86400, description="overrides the backoff")


class ExtendIn(LeaseIn):
    visibility_timeout: float | None = Field(default=None, gt=0, le=12 * 3600, description="counted from now")


class AckItem(LeaseIn):
    id: Id


class AckBatchIn(Strict):
    items: list[AckItem] = Field(min_length=1, max_length=1000)


class RedriveIn(Strict):
    ids: list[Id] | None = Field(default=None, max_length=1000, description="default: every dead message")


class Items(BaseModel, Generic[T]):
    items: list[T]


NotificationPriorityName = Literal["low", "medium", "high", "urgent"]
# A relative path or an http(s) URL: never `javascript:` in a link a person clicks.
# `//host` and `/\\host` are other hosts to a browser, so a relative path must not start so.
ACTION_URL_PATTERN = r"^(/([^/\\\s\x00][^\s\x00]*)?|(?i:https?)://[^\s\x00]+)$"
Subject = Annotated[Text, Field(min_length=1, max_length=255)]


class NotificationCreate(Strict):
    recipients: list[Subject] = Field(min_length=1, max_length=1000)
    type: str = Field(pattern=TYPE_PATTERN)
    priority: NotificationPriorityName = "medium"
    title: Text = Field(min_length=1, max_length=200)
    message: Text = Field(default="", max_length=10_000)
    action_url: str | None = Field(default=None, max_length=2000, pattern=ACTION_URL_PATTERN)
    expires_at: UtcDatetime | None = None
    queue: str | None = Field(default=None, pattern=QUEUE_NAME_PATTERN)
    message_id: Text | None = Field(default=None, max_length=36)

    @field_validator("expires_at")
    @classmethod
    def _ahead(cls, value: datetime | None) -> datetime | None:
        # One already past would be created expired: shown to nobody, then removed by the sweeper.
        if value is not None and value <= utcnow():
            raise ValueError("must be in the future")
        return value


_SUBJECT = TypeAdapter(Subject)


def token_subject(text: str) -> str:
    """A token's subject (`--sub`) as the API takes it; ValueError otherwise."""
    try:
        return _SUBJECT.validate_python(text)
    except ValidationError:
        raise ValueError(f"a token subject is 1 to 255 characters, none of them NUL, not {text!r}") from None


class NotificationPatch(Strict):
    is_read: bool


class NotificationOut(BaseModel):
    id: str
    recipient: str
    type: str
    priority: NotificationPriorityName
    title: str
    message: str
    queue: str | None
    message_id: str | None
    action_url: str | None
    is_read: bool
    read_at: datetime | None
    created_at: datetime
    expires_at: datetime | None
    deleted_at: datetime | None = None

    @classmethod
    def of(cls, row: Notification, deleted_at: datetime | None = None) -> NotificationOut:
        return cls(
            id=row.id,
            recipient=row.recipient,
            type=row.type,
            priority=NotificationPriority(row.priority).name,
            title=row.title,
            message=row.message,
            queue=row.queue,
            message_id=row.message_id,
            action_url=row.action_url,
            is_read=row.is_read,
            read_at=row.read_at,
            created_at=row.created_at,
            expires_at=row.expires_at,
            deleted_at=deleted_at,
        )


class NotificationStats(BaseModel):
    total: int
    unread: int
    urgent_count: int = Field(description="unread urgent notifications")
    by_type: dict[str, int]
    by_priority: dict[str, int]


class Changed(BaseModel):
    changed: int


class EventOut(BaseModel):
    seq: int
    type: str
    at: datetime
    data: Any

    @classmethod
    def of(cls, update: Update) -> EventOut:
        return cls(
            seq=update.seq,
            type=update.type,
            at=datetime.fromisoformat(update.at),
            data=json.loads(update.data),
        )


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
    has_more: bool

    @classmethod
    def of(cls, items: list[T], total: int, limit: int, offset: int, **more: Any) -> Self:
        more_rows = offset + len(items) < total
        return cls(items=items, total=total, limit=limit, offset=offset, has_more=more_rows, **more)


class NotificationPage(Page[NotificationOut]):
    unread_count: int


class TokenIn(Strict):
    sub: Subject = Field(description="who the token speaks for")
    scope: Text = Field(default="", max_length=2000, description='space-separated, e.g. "publish:builds.*"')
    ttl: Text = Field(default="30d", max_length=20, description="3600, 30m, 12h, 30d")


class TokenOut(BaseModel):
    id: str
    subject: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: Token) -> TokenOut:
        return cls(
            id=row.id,
            subject=row.subject,
            scopes=row.scopes.split(),
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
        )


class MintedTokenOut(TokenOut):
    token: str = Field(description="shown once: Pombo keeps only its id")


class Me(BaseModel):
    subject: str
    scopes: list[str]
    expires_at: datetime | None
