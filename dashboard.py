"""The dashboard: its page at `/`, its scripts and styles, and signing in and out by cookie.

Plain files: modules and stylesheets the browser loads as they are, no build step and nothing
from another host, so the page works on a closed network and under the strict policy that
`http_rules` sets (scripts and styles from our own origin, nothing inline).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import FileResponse
from pydantic import Field
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

from api_system import me
from deps import AuthFirst, caller, token_principal
from errors import ApiError, answers
from schemas import NO_NUL, Me, Strict
from sessions import forget, keep, require_same_origin, session_token

PAGE = "/"
FILES = Path(__file__).resolve().parent / "dashboard"
# Revalidated on every load (an ETag makes that a 304): a new release is never half cached.
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(tags=["dashboard"], route_class=AuthFirst)


class SignIn(Strict):
    token: str = Field(
        min_length=1, max_length=8192, pattern=NO_NUL, description="a token from `python main.py token`"
    )


@router.get(PAGE, include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(FILES / "index.html", headers=NO_CACHE)


class SessionOut(Strict):
    me: Me | None = Field(description="who the page is signed in as; null when it must sign in")
    ended: str | None = Field(default=None, description="why the session's token no longer works")


@router.get("/api/v1/session", responses=answers(429))
async def session(request: Request) -> SessionOut:
    """Who the session cookie (or a bearer token, or anonymous access) speaks for: a 200 either way,
    so that a page asking before it has signed in logs no failed request."""
    try:
        principal = caller(request)
    except ApiError as error:
        return SessionOut(me=None, ended=error.message if session_token(request) else None)
    return SessionOut(me=await me(principal))  # as GET /api/v1/me answers


@router.post("/api/v1/session", responses=answers(401, 403, 429))
async def sign_in(body: SignIn, request: Request, response: Response) -> Me:
    """Trade a token for an HttpOnly session cookie (for the dashboard, which then streams with it)."""
    require_same_origin(request)
    principal = token_principal(request, body.token)
    keep(response, request, body.token, principal.expires_at)
    return await me(principal)


@router.delete("/api/v1/session", status_code=204, responses=answers(403, 429))
async def sign_out(request: Request) -> Response:
    require_same_origin(request)
    response = Response(status_code=204)
    forget(response, request)
    return response


class _Files(StaticFiles):
    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(NO_CACHE)
        return response


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/dashboard", _Files(directory=FILES), name="dashboard")
