"""The OpenAPI document as the server really answers: every error in the envelope, with each
status an operation can meet derived here, in one place, from what its route takes.

FastAPI documents only 2xx and a 422 of its own shape (`{"detail": […]}`), which this server
never sends. Here an operation gets
- 401 and 429 when it takes a token (`security`), 403 too when its path names a queue or it
  changes something (the session cookie needs our own origin);
- 404 for each path id; 400, 408, 413 and 422 for a body (415 for a text body), 422 for parameters;
- 400 when it exports (`export_too_large`); 503 when its route reads or writes the database;
- whatever its route adds with `errors.answers(...)`: 409s and scope checks beyond queues.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from api_messages import BATCH_PATH, batch_body
from deps import reaches_database
from errors import ERROR_STATUSES, ErrorOut
from exports import CSV_TYPE
from sessions import SAFE_METHODS
from settings import Settings

_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 0}}
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}
# FastAPI's own 422 models, which no answer of this server has.
_FASTAPI_ERRORS = ("HTTPValidationError", "ValidationError")


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The whole document, as /openapi.json serves it."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    routes = {
        (r.path, m.lower()): r for r in app.state.routes if isinstance(r, APIRoute) for m in r.methods or ()
    }
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            for status in error_statuses(routes[path, method], operation):
                _document_error(operation, status)
    # The batch's cap is a setting.
    schema["paths"][BATCH_PATH]["post"]["requestBody"] = batch_body(settings.max_batch_items)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in _FASTAPI_ERRORS:
        components.pop(name, None)
    components.update(_envelope_schemas())
    return schema


def error_statuses(route: APIRoute, operation: dict[str, Any]) -> set[int]:
    """What this operation can answer besides its successes, from what its route takes."""
    statuses = {int(s) for s in operation.get("responses", {}) if int(s) >= 400}
    parameters = operation.get("parameters", [])
    body = operation.get("requestBody", {}).get("content", {})
    if operation.get("security"):
        statuses |= {401, 429}
        if not (route.methods or set()) <= SAFE_METHODS:
            statuses.add(403)  # signed in by the session cookie from a page not ours: `cross_origin`
    if "{queue}" in route.path:
        statuses.add(403)  # every scope but `notify` and `admin` names a queue
    if any(p["in"] == "path" for p in parameters):
        statuses.add(404)
    if parameters or body:
        statuses.add(422)
    if body:
        statuses |= {400, 408, 413}
    if any(media.startswith("text/") for media in body):
        statuses.add(415)
    if CSV_TYPE in operation.get("responses", {}).get("200", {}).get("content", {}):
        statuses.add(400)
    if reaches_database(route):
        statuses.add(503)
    return statuses


def _document_error(operation: dict[str, Any], status: int) -> None:
    """The envelope for `status`, unless the route documents a body of its own for it."""
    responses = operation.setdefault("responses", {})
    response = responses.setdefault(str(status), {})
    content = response.get("content", {}).get("application/json", {})
    if content and content.get("schema") != {"$ref": "#/components/schemas/HTTPValidationError"}:
        return
    response["description"] = ERROR_STATUSES[status]
    response["content"] = {"application/json": {"schema": _ENVELOPE_REF}}
    if status in _HEADERS:
        response["headers"] = _HEADERS[status]


_REFS, _ENVELOPE = models_json_schema(
    [(ErrorOut, "serialization")], ref_template="#/components/schemas/{model}"
)
_ENVELOPE_REF = _REFS[ErrorOut, "serialization"]


def _envelope_schemas() -> dict[str, Any]:
    definitions: dict[str, Any] = _ENVELOPE["$defs"]
    return definitions
