"""Every error Pombo answers with, in one place, and the handlers that shape them."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match


class ApiError(Exception):
    """An error the client can act on: `{"error": {"code", "message", "details"}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers


def not_found(thing: str, name: str) -> ApiError:
    return ApiError(404, f"{thing}_not_found", f"{thing.replace('_', ' ')} {name!r} not found")


def bad_request(code: str, message: str, **details: Any) -> ApiError:
    return ApiError(400, code, message, details)


def conflict(code: str, message: str, **details: Any) -> ApiError:
    return ApiError(409, code, message, details)


def validation_error(details: dict[str, Any], message: str = "request is invalid") -> ApiError:
    return ApiError(422, "validation_error", message, details)


def too_many_logs(logs: int, limit: int) -> ApiError:
    message = f"the stream would follow {logs} logs; POMBO_STREAM_MAX_LOGS allows {limit}"
    return ApiError(422, "too_many_logs", message, {"logs": logs, "limit": limit})


def too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"request body exceeds {limit} bytes", {"limit": limit})


class BodyTooLarge(HTTPException):
    """`too_large`, raised while a body is read: FastAPI lets only HTTPException through there."""

    def __init__(self, limit: int) -> None:
        super().__init__(413)
        self.limit = limit


class BodyTimeout(HTTPException):
    """`request_timeout`, raised while a body is read too slowly (see `BodyTooLarge`)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(408)
        self.timeout = timeout


def request_timeout(timeout: float) -> ApiError:
    message = f"the request body did not arrive within {timeout:g} s"
    # The rest of the body may still be on its way: the connection cannot carry another request.
    return ApiError(408, "request_timeout", message, {"timeout": timeout}, {"Connection": "close"})


def unauthorized(reason: str = "a valid token is required") -> ApiError:
    return ApiError(401, "unauthorized", reason)


def forbidden(scope: str) -> ApiError:
    return ApiError(403, "forbidden", f"this token lacks the scope {scope!r}", {"needed": scope})


def cross_origin(reason: str) -> ApiError:
    message = f"a request signed in by the session cookie must come from this server's own pages: {reason}"
    return ApiError(403, "cross_origin", message)


def forbidden_queues(action: str, queues: list[str]) -> ApiError:
    needed = [f"{action}:{queue}" for queue in queues]
    message = f"this token lacks the scope{'s' if len(needed) > 1 else ''} {', '.join(map(repr, needed))}"
    return ApiError(403, "forbidden", message, {"needed": needed, "queues": queues})


def rate_limited(message: str, retry_after: int, **details: Any) -> ApiError:
    return ApiError(429, "rate_limited", message, details, {"Retry-After": str(retry_after)})


def unsupported_charset(charset: str) -> ApiError:
    message = f"the body's charset {charset!r} is not one this server knows: send UTF-8"
    return ApiError(415, "unsupported_charset", message, {"charset": charset})


def invalid_encoding(charset: str) -> ApiError:
    if charset == "utf-8":
        return bad_request("invalid_utf8", "a text body must be UTF-8, or say its charset")
    return bad_request("invalid_encoding", f"the body is not valid {charset}", charset=charset)


def unavailable(message: str, **details: Any) -> ApiError:
    return ApiError(503, "unavailable", message, details)


# What a 503 tells a client to wait before it tries again: an outage's end is noticed within a second.
RETRY_AFTER_SECONDS = 1


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(description="what went wrong, for programs: `queue_not_found`, `validation_error`…")
    message: str = Field(description="the same, for people")
    details: dict[str, Any] = Field(description="what the code names: a field's problems, a limit…")


class ErrorOut(BaseModel):
    """The body of every error answer."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


# Each status an error answer can have, and the codes it carries (DECISIONS.md §11): the OpenAPI
# document's description of it (openapi.py).
ERROR_STATUSES: dict[int, str] = {
    400: "a request the schema cannot judge: `malformed_json`, `invalid_content_length`, `invalid_utf8`, "
    "`invalid_encoding`, `export_too_large`",
    401: "`unauthorized`: no valid token, as `Authorization: Bearer …`, `access_token` or the session cookie",
    403: "`forbidden`: the token lacks the scope `details.needed`",
    404: "`<thing>_not_found`: `queue_not_found`, `message_not_found`, `notification_not_found`, "
    "`token_not_found`",
    408: "`request_timeout`: the body did not arrive within the read deadline",
    409: "a conflict: `queue_exists`, `queue_deleted`, `lease_expired`, `lease_mismatch`, "
    "`idempotency_conflict`",
    413: "`too_large`: the body is over `details.limit` bytes",
    415: "`unsupported_charset`: a text body in a charset this server does not know",
    422: "`validation_error`: `details` names each field and its problems; `too_many_logs`: a stream"
    " over `details.limit` logs",
    429: "`rate_limited`: come back after `Retry-After` seconds",
    503: "`unavailable`: the database cannot serve now; come back after `Retry-After` seconds",
}


def answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """For a route's `responses=`: error statuses its own logic can answer, beyond those
    `openapi.py` derives from its parameters and dependencies."""
    return {status: {"description": ERROR_STATUSES[status]} for status in statuses}


def envelope(error: ApiError) -> JSONResponse:
    body = {"error": {"code": error.code, "message": error.message, "details": error.details}}
    headers = dict(error.headers or {})
    if error.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    elif error.status in (429, 503):  # RFC 9110 §10.2.3: when to come back, on every one
        headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
    return JSONResponse(body, status_code=error.status, headers=headers)


def field_errors(errors: Any) -> dict[str, list[str]]:
    """Pydantic errors as `{"body.priority": ["Input should be …"]}`."""
    fields: dict[str, list[str]] = {}
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ())) or "request"
        fields.setdefault(where, []).append(str(error.get("msg", "invalid")))
    return fields


async def _api_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return envelope(error)


async def _invalid_request(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    if any(e.get("type") == "json_invalid" for e in error.errors()):
        return envelope(bad_request("malformed_json", "the body is not valid JSON"))
    return envelope(validation_error(field_errors(error.errors())))


async def _body_too_large(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, BodyTooLarge)
    return envelope(too_large(error.limit))


async def _body_timeout(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, BodyTimeout)
    return envelope(request_timeout(error.timeout))


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    # FastAPI's own 400 is a JSON body it could not parse even as far as saying where (too deep).
    codes = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed"}
    code = codes.get(error.status_code, "http_error")
    headers, details = dict(error.headers or {}), {}
    if error.status_code == 405:
        allowed = allowed_methods(request)
        headers["Allow"], details = ", ".join(allowed), {"allowed": allowed}
    return envelope(ApiError(error.status_code, code, str(error.detail), details, headers))


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette's `Allow` names only the first
    route's), HEAD wherever GET is: `http_rules` answers it. `app.state.routes` lists them all
    (FastAPI keeps included routers' routes behind wrappers of its own)."""
    methods: set[str] = set()
    for route in request.app.state.routes:
        taken = getattr(route, "methods", None)
        if taken and isinstance(route, BaseRoute) and route.matches(request.scope)[0] != Match.NONE:
            methods.update(taken)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods, key=lambda m: _METHOD_ORDER.index(m) if m in _METHOD_ORDER else len(_METHOD_ORDER))


def internal_error() -> JSONResponse:
    """What a 500 says: nothing about the internals."""
    return envelope(ApiError(500, "internal_error", "internal error"))


def install_error_handlers(app: FastAPI) -> None:
    """Errors the routes raise; anything else is logged and answered by `RequestContext`."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(BodyTooLarge, _body_too_large)
    app.add_exception_handler(BodyTimeout, _body_timeout)
    app.add_exception_handler(HTTPException, _http_error)
