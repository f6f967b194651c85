"""Routes about the service itself and the caller: health, readiness, identity."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from tortoise import connections

from deps import CurrentPrincipal, HubDep
from schemas import Me

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def healthz(hub: HubDep) -> dict[str, str | int]:
    """The process is up; `streams` counts the SSE streams it holds open."""
    return {"status": "ok", "streams": hub.broker.subscriber_count}


@router.get("/readyz", responses={503: {"description": "the database or the broker is unreachable"}})
async def readyz(hub: HubDep) -> JSONResponse:
    """The database and the broker answer."""
    checks = {"database": await _database_ok(), "broker": await hub.broker.ready()}
    ready = all(checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/api/v1/me")
async def me(principal: CurrentPrincipal) -> Me:
    return Me(subject=principal.subject, scopes=sorted(principal.scopes), expires_at=principal.expires_at)


async def _database_ok() -> bool:
    try:
        await connections.get("default").execute_query("SELECT 1")
    except Exception:  # noqa: BLE001 - any failure means not ready
        return False
    return True
