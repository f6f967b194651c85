"""`GET /metrics`: the Prometheus figures, for a token with the `metrics` scope (or `admin`),
or for anyone when `POMBO_METRICS_PUBLIC=true`.

Counted figures come from the recorder; what is a state rather than a count (readiness, the
broker, the database pool, each queue's backlog) is read here, once a scrape.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from tortoise import connections
from tortoise.backends.asyncpg.client import AsyncpgDBClient

from auth import Principal
from availability import PROBE_TIMEOUT, Availability, unavailable_cause
from broker import Broker
from deps import CALLER_DOCS, caller, hub_of, settings_of
from errors import answers
from hub import Hub, Window
from metrics import Recorder, Sample
from models import Queue, utcnow
from notifications import oldest_waiting

router = APIRouter(tags=["system"])

# Sees every queue, to count their messages; never a caller.
_EVERY_QUEUE = Principal("metrics", frozenset({"admin"}))
_ALL = Window(limit=1_000_000, offset=0)


@router.get(
    "/metrics",
    response_class=Response,
    openapi_extra={"security": CALLER_DOCS["security"]},
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        **answers(403),
    },
)
async def metrics(request: Request) -> Response:
    """The figures in Prometheus's text format; the metric list is in the README."""
    if not settings_of(request).metrics_public:
        caller(request).require_scope("metrics")
    recorder: Recorder = request.app.state.metrics
    sample = await _sample(hub_of(request), request.app.state.broker, request.app.state.availability)
    return Response(recorder.render(sample), media_type=CONTENT_TYPE_LATEST)


async def _sample(hub: Hub, broker: Broker, availability: Availability) -> Sample:
    connected = getattr(broker, "connected", None)  # only Redis can be cut off
    sample = Sample(
        ready=not (availability.is_down("database") or availability.is_down("writer")),
        broker_connected=connected is None or connected.is_set(),
        broker_reconnects=getattr(broker, "reconnects", 0),
        broker_publish_failures=getattr(broker, "publish_failures", 0),
        outbox=getattr(broker, "outbox_depth", 0),
        catch_ups=broker.reads.pending,
    )
    sample.pool_size, sample.pool_in_use = _pool()
    try:
        sample.backlog, sample.oldest_pending = await asyncio.wait_for(_queues(hub), PROBE_TIMEOUT)
    except Exception as error:
        # The database cannot answer now: the rest is what an operator needs to see meanwhile.
        if not isinstance(error, TimeoutError) and unavailable_cause(error) is None:
            raise
    return sample


async def _queues(hub: Hub) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """Each live queue's message counts by status (cached, as the queue list reads them), and
    how long its oldest claimable message has waited."""
    listed, _ = await hub.list_queues(_EVERY_QUEUE, include_deleted=False, window=_ALL)
    ids = dict(await Queue.filter(deleted_at__isnull=True).values_list("id", "name"))
    now = utcnow()
    oldest: dict[int, datetime] = await oldest_waiting(connections.get("default"), now, list(ids))
    ages = {ids[queue_id]: (now - since).total_seconds() for queue_id, since in oldest.items()}
    return {queue.name: queue.messages for queue in listed}, ages


def _pool() -> tuple[int, int]:
    """Connections in asyncpg's pool, and how many are taken (none on SQLite)."""
    client = connections.get("default")
    pool: Any = client._pool if isinstance(client, AsyncpgDBClient) else None  # as database.py reads it
    if pool is None:
        return 0, 0
    size: int = pool.get_size()
    return size, size - int(pool.get_idle_size())
