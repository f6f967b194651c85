"""Routes for queues and their logs: create, list, read, change, delete, restore, events, stream."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from deps import (
    STREAM_DOCS,
    AuthFirst,
    CurrentPrincipal,
    HubDep,
    QueueName,
    SettingsDep,
    WindowDep,
    broker_of,
    caller,
    direct,
    hub_of,
    settings_of,
    stream_cursor,
    stream_gate_of,
    stream_types,
)
from errors import answers
from event_log import count_after, queue_log, read_page
from exports import DOWNLOADS, Format, event_export, respond
from schemas import INT64_MAX, EventOut, Page, QueueCreate, QueueOut, QueueUpdate
from sse import documented_as_sse
from streams import live_queue_log, open_stream

router = APIRouter(prefix="/api/v1/queues", tags=["queues"], route_class=AuthFirst)
# What the list's `name` filter takes: a part of a queue name (its characters, at most its length).
NAME_PART = r"^[a-z0-9._-]{0,64}$"


@router.post("", status_code=201, responses=answers(403, 409))
async def create_queue(spec: QueueCreate, hub: HubDep, principal: CurrentPrincipal) -> QueueOut:
    principal.require("manage", spec.name)
    return await hub.create_queue(spec, owner=principal.subject)


@router.get("")
async def list_queues(
    hub: HubDep,
    principal: CurrentPrincipal,
    window: WindowDep,
    include_deleted: bool = False,
    name: Annotated[str, Query(pattern=NAME_PART, description="only queues whose name contains this")] = "",
) -> Page[QueueOut]:
    items, total = await hub.list_queues(principal, include_deleted, window, name)
    return Page.of(items, total, window.limit, window.offset)


@router.get("/{queue}")
async def get_queue(
    queue: QueueName, hub: HubDep, principal: CurrentPrincipal, include_deleted: bool = False
) -> QueueOut:
    principal.require("manage" if include_deleted else "subscribe", queue)
    return await hub.get_queue(queue, include_deleted)


@router.patch("/{queue}")
async def update_queue(
    queue: QueueName, patch: QueueUpdate, hub: HubDep, principal: CurrentPrincipal
) -> QueueOut:
    principal.require("manage", queue)
    return await hub.update_queue(queue, patch)


@router.delete("/{queue}")
async def delete_queue(queue: QueueName, hub: HubDep, principal: CurrentPrincipal) -> QueueOut:
    principal.require("manage", queue)
    return await hub.delete_queue(queue)


@router.post("/{queue}/restore")
async def restore_queue(queue: QueueName, hub: HubDep, principal: CurrentPrincipal) -> QueueOut:
    principal.require("manage", queue)
    return await hub.restore_queue(queue)


@router.get("/{queue}/events", response_model=Page[EventOut], responses=DOWNLOADS)
async def list_events(
    queue: QueueName,
    hub: HubDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    after: Annotated[int, Query(ge=0, le=INT64_MAX, description="the last sequence number you have")] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    format: Format = "json",
) -> Page[EventOut] | Response:
    principal.require("subscribe", queue)
    found = await hub.live_queue(queue)
    if format != "json":
        return await respond(await event_export(found, after, settings.export_max_rows), format)
    log = queue_log(queue)
    updates = await read_page(log, after, limit)
    total = await count_after(log, after)
    items = [EventOut.of(u) for u in updates]
    return Page(items=items, total=total, limit=limit, offset=0, has_more=len(items) < total)


_STREAM_DOCS = {
    **STREAM_DOCS,
    "parameters": [
        *STREAM_DOCS["parameters"],
        {
            "name": "types",
            "in": "query",
            "required": False,
            "schema": {"type": "array", "items": {"type": "string"}},
            "description": "only these event types (repeat or comma-separate)",
        },
    ],
}


@direct(
    router,
    "GET",
    "/{queue}/stream",
    openapi_extra=_STREAM_DOCS,
    **documented_as_sse("an SSE stream of the queue's events"),
)
async def stream_queue(request: Request, queue: QueueName) -> Response:
    # Every browser on a page opens one: no dependencies to solve, as for publish (see caller()).
    hub, broker, settings = hub_of(request), broker_of(request), settings_of(request)
    principal = caller(request)
    principal.require("subscribe", queue)
    cursor = stream_cursor(request)
    log = await live_queue_log(broker, queue, hub.live_queue)
    gate, accept = stream_gate_of(request), request.headers.get("accept", "")
    return open_stream(
        broker, settings, principal, {log: cursor}, stream_types(request), gate=gate, accept=accept
    )
