"""Routes about the service itself and the caller: health, readiness, identity."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from availability import PROBE_TIMEOUT, Availability
from broker import Broker
from deps import AuthFirst, AvailabilityDep, BrokerDep, CurrentPrincipal, HubDep
from errors import RETRY_AFTER_SECONDS
from hub import Hub
from schemas import Me, Readiness

router = APIRouter(tags=["system"], route_class=AuthFirst)

# A writer that committed this recently can commit: readiness probes only an idle one.
WRITER_FRESH_SECONDS = 5.0


@router.get("/healthz")
async def healthz(broker: BrokerDep) -> dict[str, str | int]:
    """The process is up; `streams` counts the SSE streams it holds open."""
    return {"status": "ok", "streams": broker.subscriber_count}


_READY = {"model": Readiness, "description": "`status` is `ready`, or `degraded` without the broker"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={200: _READY, 503: {"model": Readiness, "description": "a write cannot succeed now"}},
)
async def readyz(hub: HubDep, broker: BrokerDep, availability: AvailabilityDep) -> JSONResponse:
    """Whether this replica can serve writes now: the database answers and the writer commits.

    `checks` names each part `ok` or `down`. A broker that is down leaves the replica ready
    (`status` is then `degraded`): streams and claims fall back to the database.
    """
    # At once, so that /readyz answers within one probe's timeout even when all three hang.
    database, writer, broker_up = await asyncio.gather(
        availability.check("database"), _writer_ok(hub, availability), _broker_ok(broker)
    )
    checks = {"database": database, "writer": writer, "broker": broker_up}
    ready = database and writer
    status = "unavailable" if not ready else "ready" if checks["broker"] else "degraded"
    body = {"status": status, "checks": {name: "ok" if ok else "down" for name, ok in checks.items()}}
    if ready:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


@router.get("/api/v1/me")
async def me(principal: CurrentPrincipal) -> Me:
    return Me(subject=principal.subject, scopes=sorted(principal.scopes), expires_at=principal.expires_at)


async def _writer_ok(hub: Hub, availability: Availability) -> bool:
    """What the writer's recent commits say; a write of nothing when it has made none lately."""
    if availability.is_down("writer"):
        return False
    if time.monotonic() - hub.writer.committed_at < WRITER_FRESH_SECONDS:
        return True
    return await availability.check("writer")


async def _broker_ok(broker: Broker) -> bool:
    try:
        return await asyncio.wait_for(broker.ready(), PROBE_TIMEOUT)
    except TimeoutError:
        return False
