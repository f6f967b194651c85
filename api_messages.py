"""Routes for messages: publish (JSON or any text), batch publish, list, read, delete."""

from __future__ import annotations

import codecs
import json
from typing import Any, get_args

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from deps import (
    CALLER_DOCS,
    AuthFirst,
    CurrentPrincipal,
    HubDep,
    QueueName,
    ResourceId,
    SettingsDep,
    TypeFilter,
    WindowDep,
    caller,
    direct,
    hub_of,
    settings_of,
)
from errors import (
    answers,
    bad_request,
    field_errors,
    invalid_encoding,
    too_large,
    unsupported_charset,
    validation_error,
)
from exports import DOWNLOADS, Format, message_export, respond
from hub import MessageFilter
from models import MessageStatus, Priority
from schemas import (
    DURATION_PATTERN,
    JSON,
    NO_NUL,
    Draft,
    IdempotencyKey,
    MessageOut,
    Page,
    PriorityName,
    PublishIn,
    UtcDatetime,
    parse_duration,
)
from settings import Settings

router = APIRouter(prefix="/api/v1/queues/{queue}/messages", tags=["messages"], route_class=AuthFirst)


def _header(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": schema, "description": description}


_TEXT_ONLY = "for a text body (a JSON body says it in its own fields)"
_PUBLISH_DOCS = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {"schema": PublishIn.model_json_schema()},
            "text/plain": {"schema": {"type": "string", "pattern": NO_NUL}, "example": "backup done"},
        },
    },
    **CALLER_DOCS,
    "parameters": [
        _header("Idempotency-Key", TypeAdapter(IdempotencyKey).json_schema(), "de-duplicates, per queue"),
        _header("X-Type", PublishIn.model_json_schema()["properties"]["type"], _TEXT_ONLY),
        _header("X-Priority", {"type": "string", "enum": list(get_args(PriorityName))}, _TEXT_ONLY),
        _header("X-Delay", {"type": "string", "pattern": DURATION_PATTERN}, f"30, 30s, 5m, 2h; {_TEXT_ONLY}"),
    ],
}

BATCH_PATH = "/api/v1/queues/{queue}/messages/batch"


def batch_body(max_items: int) -> dict[str, Any]:
    """The batch's request body in OpenAPI: `{"items": [...]}` of 1 to `max_items` (a setting)."""
    items = {"type": "array", "items": PublishIn.model_json_schema(), "minItems": 1, "maxItems": max_items}
    schema = {
        "type": "object",
        "required": ["items"],
        "additionalProperties": False,
        "properties": {"items": items},
    }
    return {"required": True, "content": {JSON: {"schema": schema}}}


class PublishedItems(BaseModel):
    items: list[MessageOut]


@direct(
    router,
    "POST",
    "",
    status_code=201,
    response_model=MessageOut,
    openapi_extra=_PUBLISH_DOCS,
    responses={
        200: {"description": "an earlier message with the same Idempotency-Key", "model": MessageOut},
        **answers(409),
    },
)
async def publish(request: Request, queue: QueueName) -> Response:
    """A JSON envelope (`Content-Type: application/json`) or any text body, as `curl -d` sends it."""
    # The hottest route takes no dependencies and returns encoded JSON: FastAPI's dependency
    # solving and response validation were about a third of a publish's CPU (see NOTES.md).
    hub, settings = hub_of(request), settings_of(request)
    principal = caller(request)
    principal.require("publish", queue)
    key = _idempotency_key(request)
    raw = await read_body(request, settings.max_body_bytes)
    draft = _json_draft(raw) if _is_json(request) else _text_draft(raw, request)
    draft.idempotency_key = draft.idempotency_key or key
    [result] = await hub.publish(queue, [draft], principal)
    location = f"/api/v1/queues/{queue}/messages/{result.id}"
    return Response(result.json, 201 if result.created else 200, {"Location": location}, JSON)


@router.post(
    "/batch",
    status_code=201,
    response_model=PublishedItems,
    openapi_extra={"requestBody": batch_body(Settings.model_fields["max_batch_items"].default)},
    responses={
        200: {"description": "every item an earlier message", "model": PublishedItems},
        **answers(409),
    },
)
async def publish_batch(
    queue: QueueName, request: Request, hub: HubDep, settings: SettingsDep, principal: CurrentPrincipal
) -> Response:
    """Up to 1,000 messages in one transaction: all are stored, or none."""
    principal.require("publish", queue)
    raw = await read_body(request, settings.max_batch_bytes)
    drafts = _batch_drafts(_parse_json(raw), settings.max_batch_items, settings.max_body_bytes)
    results = await hub.publish(queue, drafts, principal)
    # PublishedItems, joined from the messages' JSON: encoding 1,000 of them again cost 6 ms.
    body = '{"items":[' + ",".join(r.json for r in results) + "]}"
    return Response(body, 201 if any(r.created for r in results) else 200, media_type=JSON)


@router.get("", response_model=Page[MessageOut], responses=DOWNLOADS)
async def list_messages(
    queue: QueueName,
    hub: HubDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    window: WindowDep,
    status: MessageStatus | None = None,
    type: TypeFilter = None,
    priority: PriorityName | None = None,
    created_after: UtcDatetime | None = None,
    created_before: UtcDatetime | None = None,
    format: Format = "json",
) -> Page[MessageOut] | Response:
    principal.require("subscribe", queue)
    where = MessageFilter(
        status, type, Priority[priority] if priority else None, created_after, created_before
    )
    if format != "json":
        export = await message_export(await hub.live_queue(queue), where, settings.export_max_rows)
        return await respond(export, format)
    items, total = await hub.list_messages(queue, where, window)
    return Page.of(items, total, window.limit, window.offset)


@router.get("/{message_id}")
async def get_message(
    queue: QueueName, message_id: ResourceId, hub: HubDep, principal: CurrentPrincipal
) -> MessageOut:
    principal.require("subscribe", queue)
    return await hub.get_message(queue, message_id)


@router.delete("/{message_id}")
async def delete_message(
    queue: QueueName, message_id: ResourceId, hub: HubDep, principal: CurrentPrincipal
) -> MessageOut:
    principal.require("manage", queue)
    return await hub.delete_message(queue, message_id)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit`: never read unbounded into memory."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit()):
        raise bad_request("invalid_content_length", "Content-Length is not a number")
    if declared is not None and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == JSON


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_not_json)
    except ValueError as error:
        raise bad_request("malformed_json", f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise bad_request("malformed_json", "the body's JSON is nested too deeply") from None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")  # Python's json reads NaN and Infinity


def _json_draft(raw: bytes) -> Draft:
    try:
        return Draft.from_json(PublishIn.model_validate(_parse_json(raw)))
    except ValidationError as error:
        raise validation_error(field_errors(error.errors())) from None
    except PydanticSerializationError:
        raise validation_error({"body": [_NOT_UNICODE]}) from None


# JSON's escapes can spell half of a UTF-16 pair ("\ud800"): no text can be stored or sent as that.
_NOT_UNICODE = "a lone surrogate (such as \\ud800) is not Unicode text"


# PostgreSQL's text cannot store it; a JSON string keeps it, escaped in the stored JSON text.
_TEXT_NUL = 'a text body cannot hold NUL (U+0000); a JSON body can, as "\\u0000"'


def _text_draft(raw: bytes, request: Request) -> Draft:
    declared = request.headers.get("content-type", "")
    text = _decoded(raw, _charset(declared))
    if "\x00" in text:  # refused as in every other string (NO_NUL)
        raise validation_error({"body": [_TEXT_NUL]})
    headers = request.headers
    meta: dict[str, Any] = {
        "body": text,
        "type": headers.get("x-type", ""),
        "priority": headers.get("x-priority", "normal"),
    }
    try:
        if "x-delay" in headers:
            meta["delay"] = parse_duration(headers["x-delay"])
        draft = Draft.from_json(PublishIn.model_validate(meta))
    except (ValidationError, ValueError) as error:
        details = (
            field_errors(error.errors())
            if isinstance(error, ValidationError)
            else {"header.X-Delay": [str(error)]}
        )
        raise validation_error(details) from None
    draft.body, draft.content_type = text, _text_type(declared)
    return draft


def _charset(content_type: str) -> str:
    """The `charset` parameter of a Content-Type (RFC 9110 §8.3.1), UTF-8 when it names none."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower() or "utf-8"
    return "utf-8"


def _decoded(raw: bytes, charset: str) -> str:
    """The text, decoded by its declared charset: 415 for a charset unknown here, 400 for bytes
    that are not in it."""
    try:
        codec = codecs.lookup(charset)
    except LookupError:
        raise unsupported_charset(charset) from None
    if not getattr(codec, "_is_text_encoding", True):  # base64, rot13, zlib: not charsets
        raise unsupported_charset(charset)
    try:
        return raw.decode(codec.name)
    except UnicodeDecodeError:
        raise invalid_encoding("utf-8" if codec.name == "utf-8" else charset) from None


def _text_type(declared: str) -> str:
    """What the stored text is: the declared type, its charset (if it named one) now UTF-8."""
    # curl -d sends form encoding by default; what it carries is text as typed.
    media_type, *parameters = (part.strip() for part in declared.split(";"))
    if not media_type or media_type.lower() == "application/x-www-form-urlencoded":
        return "text/plain; charset=utf-8"
    if _charset(declared) == "utf-8":
        return declared[:255]
    kept = [p for p in parameters if p.partition("=")[0].strip().lower() != "charset"]
    return "; ".join([media_type, *kept, "charset=utf-8"])[:255]


def _batch_drafts(payload: Any, max_items: int, max_body: int) -> list[Draft]:
    if not isinstance(payload, dict) or set(payload) != {"items"} or not isinstance(payload["items"], list):
        raise validation_error({"body": ['expected {"items": [...]}']})
    items = payload["items"]
    if not 1 <= len(items) <= max_items:
        raise validation_error({"body.items": [f"between 1 and {max_items} items"]})
    drafts, problems = [], {}
    for index, item in enumerate(items):
        try:
            drafts.append(Draft.from_json(PublishIn.model_validate(item)))
        except ValidationError as error:
            problems[str(index)] = [
                f"{'.'.join(map(str, e['loc'])) or 'item'}: {e['msg']}" for e in error.errors()
            ]
            continue
        except PydanticSerializationError:
            problems[str(index)] = [f"body: {_NOT_UNICODE}"]
            continue
        # A message published alone could not be this large either.
        if len(drafts[-1].body.encode()) > max_body:
            problems[str(index)] = [f"body: more than {max_body} bytes"]
    if problems:
        raise validation_error({"items": problems}, f"{len(problems)} of {len(items)} items are invalid")
    return drafts


_IDEMPOTENCY_KEY = TypeAdapter(IdempotencyKey)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    try:
        return None if key is None else _IDEMPOTENCY_KEY.validate_python(key)
    except ValidationError as error:
        raise validation_error({"header.idempotency-key": [e["msg"] for e in error.errors()]}) from None
