"""Routes for a person's notifications: read, count, mark, delete, stream; create for services."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deps import (
    STREAM_DOCS,
    AuthFirst,
    CurrentPrincipal,
    NotificationsDep,
    ResourceId,
    SettingsDep,
    TypeFilter,
    WindowDep,
    broker_of,
    caller,
    direct,
    notifications_of,
    settings_of,
    stream_cursor,
    stream_gate_of,
)
from errors import answers
from event_log import user_log
from exports import DOWNLOADS, Format, notification_export, respond
from models import NotificationPriority
from notifications import NotificationFilter, Notifications
from schemas import (
    Changed,
    Items,
    NotificationCreate,
    NotificationOut,
    NotificationPage,
    NotificationPatch,
    NotificationPriorityName,
    NotificationStats,
)
from sse import control_frame, documented_as_sse
from streams import Side, open_stream

router = APIRouter(prefix="/api/v1/notifications", tags=["notifications"], route_class=AuthFirst)


@router.get("", response_model=NotificationPage, responses=DOWNLOADS)
async def list_notifications(
    notifications: NotificationsDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    window: WindowDep,
    unread_only: bool = False,
    priority: NotificationPriorityName | None = None,
    type: TypeFilter = None,
    format: Format = "json",
) -> NotificationPage | Response:
    """The caller's own notifications, newest first (`format=csv|xlsx` downloads them all)."""
    where = NotificationFilter(unread_only, NotificationPriority[priority] if priority else None, type)
    if format != "json":
        export = await notification_export(principal.subject, where, settings.export_max_rows)
        return await respond(export, format)
    items, total = await notifications.list(principal.subject, where, window.limit, window.offset)
    unread = await notifications.unread_count(principal.subject)
    return NotificationPage.of(items, total, window.limit, window.offset, unread_count=unread)


@router.get("/unread-count")
async def unread_count(notifications: NotificationsDep, principal: CurrentPrincipal) -> dict[str, int]:
    return {"unread_count": await notifications.unread_count(principal.subject)}


@router.get("/stats")
async def stats(notifications: NotificationsDep, principal: CurrentPrincipal) -> NotificationStats:
    return await notifications.stats(principal.subject)


@router.post("/mark-all-read")
async def mark_all_read(notifications: NotificationsDep, principal: CurrentPrincipal) -> Changed:
    return Changed(changed=await notifications.mark_all_read(principal.subject))


@router.post("", status_code=201, responses=answers(403, 404))
async def create_notifications(
    spec: NotificationCreate, notifications: NotificationsDep, principal: CurrentPrincipal
) -> Items[NotificationOut]:
    """For admins and services (scope `notify`): one notification per recipient."""
    principal.require_scope("notify")
    return Items(items=await notifications.create(spec))


@direct(
    router,
    "GET",
    "/stream",
    openapi_extra=STREAM_DOCS,
    **documented_as_sse("the caller's notifications as SSE"),
)
async def stream_notifications(request: Request) -> Response:
    """`notification.created|read|deleted` with ids, and `unread_count` on connect and after changes."""
    # Every browser opens one: no dependencies to solve, as for publish (see caller()).
    broker, settings = broker_of(request), settings_of(request)
    notifications = notifications_of(request)
    principal = caller(request)
    cursor = stream_cursor(request)
    side, gate = unread_count_side(notifications, principal.subject), stream_gate_of(request)
    accept = request.headers.get("accept", "")
    return open_stream(broker, settings, principal, {side.log: cursor}, gate=gate, accept=accept, side=side)


def unread_count_side(notifications: Notifications, subject: str, label: str | None = None) -> Side:
    """`unread_count` on connect and after each change to the person's notifications; in a stream
    of several logs, naming its log (`label`)."""
    named = {} if label is None else {"log": label}

    async def unread() -> bytes:
        count = await notifications.unread_count(subject)
        return control_frame("unread_count", {"unread_count": count, **named})

    return Side(user_log(subject), unread)


@router.patch("/{notification_id}")
async def mark(
    notification_id: ResourceId,
    patch: NotificationPatch,
    notifications: NotificationsDep,
    principal: CurrentPrincipal,
) -> NotificationOut:
    return await notifications.set_read(principal.subject, notification_id, patch.is_read)


@router.delete("/{notification_id}")
async def delete(
    notification_id: ResourceId, notifications: NotificationsDep, principal: CurrentPrincipal
) -> NotificationOut:
    return await notifications.delete(principal.subject, notification_id)
