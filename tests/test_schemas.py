"""The API's shapes: MessageOut's fast JSON path says exactly what the model says; every string
refuses NUL and every integer is bounded, on both databases."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from conftest import Server, assert_error, snapshot

from models import MessageStatus, NewMessage, Priority
from schemas import JSON, MessageOut

NOW = datetime(2026, 11, 23, 23, 59, 1, 123456, tzinfo=UTC)


def message(**changes: object) -> NewMessage:
    fields: dict[str, object] = {
        "id": "01a20ad1-93b1-7000-a913-1539a846fa2f",
        "queue_id": 1,
        "body": '{"n":1,"text":"ação","big":100000000000000000000,"x":1.5e-7,"list":[null,true]}',
        "content_type": JSON,
        "type": "order.paid",
        "priority": Priority.high,
        "headers": {"trace": "abc"},
        "idempotency_key": None,
        "available_at": NOW,
        "created_at": NOW,
        "updated_at": NOW,
    }
    return NewMessage(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "row",
    [
        message(),
        message(body='plain text, "quoted" and ünïcode', content_type="text/plain; charset=utf-8"),
        message(available_at=NOW.astimezone(timezone(timedelta(hours=2))) + timedelta(days=1)),
        message(
            status=MessageStatus.dead,
            attempts=5,
            last_error="disk full",
            finished_at=NOW,
            lease_id="L",
            lease_expires_at=NOW,
            idempotency_key="k-1",
            priority=Priority.low,
        ),
    ],
    ids=["json", "text", "zoned-time", "dead"],
)
@pytest.mark.parametrize("deleted_at", [None, NOW], ids=["live", "deleted"])
def test_json_of_is_the_models_json(row: NewMessage, deleted_at: datetime | None) -> None:
    assert (
        MessageOut.json_of(row, "orders", deleted_at)
        == MessageOut.of(row, "orders", deleted_at).model_dump_json()
    )


# NUL and integer bounds, on a real server --------------------------------------------------------
# PostgreSQL's text refuses U+0000, SQLite's keeps it, and both refuse integers past their columns:
# every string the API takes refuses NUL and every integer has a maximum, on both databases alike.

NUL = "a\x00b"
INT64_MAX = 2**63 - 1  # what a BIGINT holds, on both databases
Q = "nul-checks"  # a queue the checks name; validation comes before any lookup
M = f"/api/v1/queues/{Q}/messages"
N = "/api/v1/notifications"
NOTE = {"recipients": ["someone"], "type": "note", "title": "Hello"}
TEXT = {"Content-Type": "text/plain"}
NUL_INPUTS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "message-id-read": ("GET", f"{M}/a%00b", {}, "path.message_id"),
    "message-id-delete": ("DELETE", f"{M}/a%00b", {}, "path.message_id"),
    "message-type-filter": ("GET", f"{M}?type=a%00b", {}, "query.type"),
    "message-type-filter-csv": ("GET", f"{M}?format=csv&type=a%00b", {}, "query.type"),
    "queue-description-new": (
        "POST",
        "/api/v1/queues",
        {"json": {"name": "n", "description": NUL}},
        "body.desc",
    ),
    "queue-description": ("PATCH", f"/api/v1/queues/{Q}", {"json": {"description": NUL}}, "body.description"),
    "idempotency-key": ("POST", M, {"json": {"body": 1, "idempotency_key": NUL}}, "idempotency_key"),
    "batch-idempotency-key": (
        "POST",
        f"{M}/batch",
        {"json": {"items": [{"body": 1, "idempotency_key": NUL}]}},
        "items",
    ),
    "text-body": ("POST", M, {"content": NUL.encode(), "headers": TEXT}, "body"),
    "ack-lease-id": ("POST", f"{M}/m/ack", {"json": {"lease_id": NUL}}, "body.lease_id"),
    "ack-message-id": ("POST", f"{M}/a%00b/ack", {"json": {"lease_id": "l"}}, "path.message_id"),
    "nack-error": ("POST", f"{M}/m/nack", {"json": {"lease_id": "l", "error": NUL}}, "body.error"),
    "extend-message-id": ("POST", f"{M}/a%00b/extend", {"json": {"lease_id": "l"}}, "path.message_id"),
    "batch-ack-id": (
        "POST",
        f"/api/v1/queues/{Q}/ack",
        {"json": {"items": [{"id": NUL, "lease_id": "l"}]}},
        "body.items.0.id",
    ),
    "redrive-id": ("POST", f"/api/v1/queues/{Q}/redrive", {"json": {"ids": [NUL]}}, "body.ids.0"),
    "notification-title": ("POST", N, {"json": {**NOTE, "title": NUL}}, "body.title"),
    "notification-message": ("POST", N, {"json": {**NOTE, "message": NUL}}, "body.message"),
    "notification-recipient": ("POST", N, {"json": {**NOTE, "recipients": [NUL]}}, "body.recipients.0"),
    "notification-action-url": ("POST", N, {"json": {**NOTE, "action_url": "/a\x00b"}}, "body.action_url"),
    "notification-message-id": ("POST", N, {"json": {**NOTE, "message_id": NUL}}, "body.message_id"),
    "notification-type-filter": ("GET", f"{N}?type=a%00b", {}, "query.type"),
    "notification-id-patch": ("PATCH", f"{N}/a%00b", {"json": {"is_read": True}}, "path.notification_id"),
    "notification-id-delete": ("DELETE", f"{N}/a%00b", {}, "path.notification_id"),
    "token-subject": ("POST", "/api/v1/tokens", {"json": {"sub": NUL}}, "body.sub"),
    "token-scope": ("POST", "/api/v1/tokens", {"json": {"sub": "s", "scope": "publish:a\x00"}}, "body.scope"),
    "token-id-revoke": ("DELETE", "/api/v1/tokens/a%00b", {}, "path.token_id"),
}


@pytest.mark.parametrize("case", NUL_INPUTS.values(), ids=NUL_INPUTS.keys())
async def test_nul_in_any_string_is_422_and_changes_nothing(
    server: Server, client: httpx.AsyncClient, case: tuple[str, str, dict[str, Any], str]
) -> None:
    method, path, options, field = case
    if (await client.get(f"/api/v1/queues/{Q}")).status_code == 404:
        assert (await client.post("/api/v1/queues", json={"name": Q})).status_code == 201
    before = await snapshot(server)
    error = assert_error(await client.request(method, path, **options), 422, "validation_error")
    assert any(key.startswith(field) for key in error["details"]), error
    assert await snapshot(server) == before


async def test_a_json_body_keeps_nul_as_published(client: httpx.AsyncClient) -> None:
    # JSON text escapes it ("\u0000"), so it is stored as it came on both databases.
    body = {"text": NUL, NUL: [NUL]}
    name = f"nul-{secrets.token_hex(4)}"
    published = await client.post(f"/api/v1/queues/{name}/messages", json={"body": body})
    assert published.status_code == 201, published.text
    read = await client.get(f"/api/v1/queues/{name}/messages/{published.json()['id']}")
    assert read.json()["body"] == body


async def test_every_string_refuses_nul_and_every_integer_is_bounded(client: httpx.AsyncClient) -> None:
    """Read from the OpenAPI document, so that a field or parameter added later is checked too."""
    document = (await client.get("/openapi.json")).json()
    found = [
        f"{where}: {problem}" for where, schema in _request_schemas(document) for problem in _loose(schema)
    ]
    assert found == []


# A credential that is not one we signed is refused with 401; Last-Event-ID is checked by
# deps.stream_cursor, and a stream's `types` only filter in memory.
_NOT_STORED = {"access_token", "Last-Event-ID", "types"}
Schema = dict[str, Any]


def _request_schemas(document: Schema) -> Iterator[tuple[str, Schema]]:
    components = document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            for parameter in operation.get("parameters", []):
                if parameter["name"] not in _NOT_STORED:
                    yield from _walk(f"{where} {parameter['name']}", parameter["schema"], components)
            for media, content in operation.get("requestBody", {}).get("content", {}).items():
                yield from _walk(f"{where} {media}", content["schema"], components)


def _walk(where: str, schema: Schema, components: Schema) -> Iterator[tuple[str, Schema]]:
    """`schema` and every schema within it, following references."""
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    yield where, schema
    for key, value in schema.get("properties", {}).items():
        yield from _walk(f"{where}.{key}", value, components)
    for key in ("items", "additionalProperties", "propertyNames"):
        if isinstance(schema.get(key), dict):
            yield from _walk(f"{where}[{key}]", schema[key], components)
    for option in schema.get("anyOf", []):
        yield from _walk(where, option, components)


def _loose(schema: Schema) -> list[str]:
    if schema.get("type") == "string" and not {"enum", "const", "format"} & set(schema):
        pattern = schema.get("pattern")
        if pattern is None or re.search(pattern, NUL):
            return [f"a string that takes NUL (pattern {pattern!r})"]
    # Seconds become datetime arithmetic, which overflows long before a float does.
    if schema.get("type") in ("integer", "number") and schema.get("maximum", INT64_MAX + 1) > INT64_MAX:
        return [f"a number up to {schema.get('maximum')}"]
    return []
