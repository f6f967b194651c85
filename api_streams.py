"""The stream of several logs: queues by name or pattern and the caller's notifications, on one
connection (a browser holds at most six per origin over HTTP/1.1)."""

from __future__ import annotations

import re
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api_notifications import unread_count_side
from auth import Principal
from broker import Broker
from deps import (
    STREAM_DOCS,
    AuthFirst,
    broker_of,
    caller,
    direct,
    hub_of,
    notifications_of,
    settings_of,
    stream_gate_of,
    stream_positions,
    stream_types,
)
from errors import ApiError, forbidden_queues, too_many_logs, validation_error
from hub import Hub
from log_set import CURSOR_PATTERN, NOTIFICATIONS, PATTERN, QueuePatterns, is_pattern, label_of
from models import QUEUE_NAME_PATTERN
from sse import documented_as_sse
from streams import Several, live_queue_log, open_stream

router = APIRouter(prefix="/api/v1", tags=["streams"], route_class=AuthFirst)

_QUEUE = re.compile(QUEUE_NAME_PATTERN)
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
_CURSOR = "a vector of log:sequence pairs, e.g. `orders:41,billing:7,@notifications:3`"

_DOCS = {
    "security": STREAM_DOCS["security"],
    "parameters": [
        STREAM_DOCS["parameters"][0],  # access_token
        {
            "name": "queue",
            "in": "query",
            "required": False,
            "schema": {
                "type": "array",
                "items": {"type": "string", "pattern": f"{QUEUE_NAME_PATTERN}|{PATTERN}"},
            },
            "description": "a queue, or a pattern (`builds.*`): the queues matching it that you may"
            " subscribe to, created later included (a queue named that does not exist yet is followed"
            " from its creation); repeat or comma-separate",
        },
        {
            "name": "notifications",
            "in": "query",
            "required": False,
            "schema": {"type": "boolean", "default": False},
            "description": "the caller's notifications too (log `@notifications`, with `unread_count`)",
        },
        {
            "name": "types",
            "in": "query",
            "required": False,
            "schema": {"type": "array", "items": {"type": "string"}},
            "description": "only these event types (repeat or comma-separate)",
        },
        {
            "name": "last_event_id",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "pattern": CURSOR_PATTERN},
            "description": f"resume: {_CURSOR}; a followed log it leaves out starts at its beginning",
        },
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "set by EventSource (the last `id:`, the whole vector); wins over last_event_id",
        },
    ],
}


_SSE = documented_as_sse(
    "several logs as one SSE stream: each frame's `id:` is the cursor vector, its data carries `log`"
)
_SSE["responses"] |= {
    403: {"description": "a queue or pattern the token may not subscribe to (all named in `details.queues`)"},
    # A body of its own, so that this description is not replaced by the catalogue's (`openapi.py`).
    422: {
        "description": "`validation_error`: a bad queue name, cursor or `notifications`; `too_many_logs`:"
        " more logs than POMBO_STREAM_MAX_LOGS, with `details.logs` (how many) and `details.limit`",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
    },
}


@direct(router, "GET", "/stream", openapi_extra=_DOCS, **_SSE)
async def stream_logs(request: Request) -> Response:
    """Queues (by name or pattern) and the caller's notifications, multiplexed.

    Each event's data is its resource with `log` added (the queue's name, or `@notifications`);
    its `id:` is the position in every log, so `Last-Event-ID` resumes them all at once.
    """
    broker, settings = broker_of(request), settings_of(request)
    principal = caller(request)
    wanted, notifications = _followed(request)
    _require_subscribe(principal, wanted)
    positions = stream_positions(request)
    logs, following = await _queue_logs(request, principal, wanted)
    subject = principal.subject
    side = unread_count_side(notifications_of(request), subject, NOTIFICATIONS) if notifications else None
    logs += [side.log] if side else []
    _within_bound(len(logs), settings.stream_max_logs)
    # Resuming, a log the cursor leaves out is new to the client: all of it is news.
    cursors = {log: None if positions is None else positions.get(label_of(log), 0) for log in logs}
    several = Several(settings.stream_max_logs, positions, following)
    gate, accept, types = stream_gate_of(request), request.headers.get("accept", ""), stream_types(request)
    return open_stream(
        broker, settings, principal, cursors, types, gate=gate, accept=accept, side=side, several=several
    )


def _followed(request: Request) -> tuple[list[str], bool]:
    """The queues and patterns asked for, once each, and whether the caller's notifications come too."""
    given = [
        q.strip() for text in request.query_params.getlist("queue") for q in text.split(",") if q.strip()
    ]
    wanted = list(dict.fromkeys(given))
    bad = [q for q in wanted if _QUEUE.fullmatch(q) is None and not is_pattern(q)]
    notifications = _BOOLEANS.get(request.query_params.get("notifications", "false").strip().lower())
    problems: dict[str, list[str]] = {}
    if bad:
        problems["query.queue"] = [f"not a queue name or pattern: {', '.join(map(repr, bad))}"]
    if notifications is None:
        problems["query.notifications"] = ["true or false"]
    elif not wanted and not notifications:
        problems["query.queue"] = ["name at least one queue or pattern, or ask for notifications=true"]
    if problems:
        raise validation_error(problems)
    return wanted, bool(notifications)


async def _queue_logs(
    request: Request, principal: Principal, wanted: list[str]
) -> tuple[list[str], QueuePatterns | None]:
    """The logs of the queues asked for that the stream follows from the start, and what takes on
    more: the patterns, and the queues named that do not exist (yet), each a pattern of one name."""
    hub, broker = hub_of(request), broker_of(request)
    names, patterns = [q for q in wanted if not is_pattern(q)], [q for q in wanted if is_pattern(q)]
    logs, missing = await _live_and_missing(broker, hub, names)
    # One read of the live queues for every pattern stream opening at once.
    live_queues = partial(broker.reads.shared, ("live queues",), hub.live_queue_names)
    later = (*patterns, *missing)
    following = QueuePatterns(later, principal, live_queues) if later else None
    logs += [log for log in await following.matching() if log not in logs] if following else []
    return logs, following


async def _live_and_missing(broker: Broker, hub: Hub, names: list[str]) -> tuple[list[str], list[str]]:
    """The logs of the queues named that are live, and the names of those that are not (yet)."""
    logs: list[str] = []
    missing: list[str] = []
    for name in names:
        try:
            logs.append(await live_queue_log(broker, name, hub.live_queue))
        except ApiError as error:
            if error.status != 404:
                raise
            missing.append(name)
    return logs, missing


def _within_bound(logs: int, bound: int) -> None:
    if logs > bound:
        raise too_many_logs(logs, bound)


def _require_subscribe(principal: Principal, queues: list[str]) -> None:
    """Each queue and pattern asked for needs `subscribe` on it; one 403 names all refused."""
    refused = [queue for queue in queues if not principal.can("subscribe", queue)]
    if refused:
        raise forbidden_queues("subscribe", refused)
