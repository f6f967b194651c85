"""/openapi.json is the API: every error status an operation can answer, in the envelope it is
really sent in, request schemas that accept what the server accepts, and its security schemes.

The walk at the end triggers each documented error status on a real server and checks the body
against the schema the document gives for that status.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from conftest import ADMIN, Listener, Server, auth, mint, need_tool, unique

from main import create_app
from sessions import COOKIE
from settings import load_settings

ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}
METHODS = ("get", "post", "patch", "delete")
PROBES = ("/healthz", "/readyz")
# Signing in takes the token in its body; asking who is signed in and signing out take none.
SESSION = "/api/v1/session"


def build(**settings: Any) -> dict[str, Any]:
    document: dict[str, Any] = create_app(
        load_settings(environment="test", jwt_secret="s" * 32, **settings)
    ).openapi()
    return document


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build()


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def statuses(document: dict[str, Any], path: str, method: str) -> set[int]:
    return {int(status) for status in document["paths"][path][method]["responses"]}


def valid(document: dict[str, Any], schema: dict[str, Any], value: Any) -> bool:
    """Whether `value` matches `schema`, its `$ref`s resolved in the document."""
    rooted = {**schema, "components": document["components"]}
    return bool(jsonschema_rs.validator_for(rooted).is_valid(value))


def body_schema(document: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    schema: dict[str, Any] = document["paths"][path][method]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    return schema


# The document -----------------------------------------------------------------------------


def test_every_error_answer_is_the_envelope(document: dict[str, Any]) -> None:
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) < 400 or path == "/readyz":
                continue
            assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (path, method, status)
            assert response["description"], (path, method, status)
    envelope = document["components"]["schemas"]["ErrorOut"]
    assert envelope["required"] == ["error"] and envelope["additionalProperties"] is False
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"code", "message", "details"}


def test_fastapis_own_422_shape_is_gone(document: dict[str, Any]) -> None:
    text = str(document)
    assert "HTTPValidationError" not in text and "'detail'" not in text
    for *_, operation in operations(document):
        if "422" in operation["responses"]:
            assert operation["responses"]["422"]["content"]["application/json"]["schema"] == ERROR_REF


@pytest.mark.parametrize(
    ("path", "method", "expected"),
    [
        # A body, a queue in the path, a conflict of its own, the database: everything.
        ("/api/v1/queues/{queue}/messages", "post", {400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 503}),
        (
            "/api/v1/queues/{queue}/messages/{message_id}/ack",
            "post",
            {400, 401, 403, 404, 408, 409, 413, 422, 429, 503},
        ),
        ("/api/v1/queues/{queue}/messages/{message_id}", "get", {401, 403, 404, 422, 429, 503}),
        ("/api/v1/queues", "post", {400, 401, 403, 408, 409, 413, 422, 429, 503}),
        ("/api/v1/queues/{queue}/events", "get", {400, 401, 403, 404, 422, 429, 503}),
        ("/api/v1/queues/{queue}/stream", "get", {401, 403, 404, 422, 429, 503}),
        # Nothing to validate, no scope to lack: only the token, the limits and the database.
        ("/api/v1/notifications/unread-count", "get", {401, 429, 503}),
        ("/api/v1/tokens/{token_id}", "delete", {401, 403, 404, 422, 429, 503}),
        # Reads only the token: no database, so no 503.
        ("/api/v1/me", "get", {401, 429}),
        ("/healthz", "get", set()),
        ("/readyz", "get", {503}),
    ],
)
def test_each_operation_lists_the_errors_it_can_answer(
    document: dict[str, Any], path: str, method: str, expected: set[int]
) -> None:
    assert {s for s in statuses(document, path, method) if s >= 400} == expected


def test_rate_limited_and_unavailable_say_when_to_come_back(document: dict[str, Any]) -> None:
    for path, method, operation in operations(document):
        for status in ("429", "503"):
            if status in operation["responses"] and path != "/readyz":
                assert "Retry-After" in operation["responses"][status]["headers"], (path, method)


def test_security_schemes_are_the_bearer_header_the_access_token_query_and_the_session_cookie(
    document: dict[str, Any],
) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["access_token"] == {**schemes["access_token"], "type": "apiKey", "in": "query"}
    assert schemes["access_token"]["name"] == "access_token"
    assert schemes["session"] == {**schemes["session"], "type": "apiKey", "in": "cookie", "name": COOKIE}
    for path, method, operation in operations(document):
        if path in (*PROBES, SESSION):
            assert "security" not in operation, path
            continue
        schemes_taken = [{"bearer": []}, {"access_token": []}, {"session": []}]
        assert operation["security"] == schemes_taken, (path, method)
        if method != "get":  # the cookie from another site's page: 403 `cross_origin`
            assert "403" in operation["responses"], (path, method)
        # The token is a security scheme, not a parameter a client would fill by hand.
        assert all(p["name"] != "access_token" for p in operation.get("parameters", [])), (path, method)
    assert "security" not in document  # not on the docs pages, nor on the probes


def test_a_queue_patch_may_leave_fields_out_but_null_only_alert_after(document: dict[str, Any]) -> None:
    schema = body_schema(document, "/api/v1/queues/{queue}", "patch")
    assert valid(document, schema, {"alert_after": None})
    assert valid(document, schema, {"dead_letter_urgent": True, "description": "x"})
    for field in ("dead_letter_urgent", "description", "max_attempts", "retention_seconds"):
        assert not valid(document, schema, {field: None}), field


def test_the_batch_body_needs_one_to_the_configured_number_of_items() -> None:
    document = build(max_batch_items=5)
    schema = body_schema(document, "/api/v1/queues/{queue}/messages/batch", "post")
    one = {"body": "x"}
    assert valid(document, schema, {"items": [one]})
    assert valid(document, schema, {"items": [one] * 5})
    for refused in ({}, {"items": []}, {"items": [one] * 6}, {"items": [one], "more": 1}):
        assert not valid(document, schema, refused), refused


def test_header_names_and_ids_have_their_rules_in_the_schema(document: dict[str, Any]) -> None:
    publish = body_schema(document, "/api/v1/queues/{queue}/messages", "post")
    assert valid(document, publish, {"body": 1, "headers": {"Build-Id": "7"}})
    assert not valid(document, publish, {"body": 1, "headers": {"bad name": "7"}})
    assert not valid(document, publish, {"body": 1, "headers": {"-x": "7"}})
    get = document["paths"]["/api/v1/queues/{queue}/messages/{message_id}"]["get"]
    [message_id] = [p for p in get["parameters"] if p["name"] == "message_id"]
    assert message_id["schema"]["maxLength"] == 36


def test_publishing_headers_and_the_resume_header_are_documented(document: dict[str, Any]) -> None:
    publish = document["paths"]["/api/v1/queues/{queue}/messages"]["post"]
    headers = {p["name"]: p["schema"] for p in publish["parameters"] if p["in"] == "header"}
    assert set(headers) == {"Idempotency-Key", "X-Type", "X-Priority", "X-Delay"}
    assert headers["X-Priority"]["enum"] == ["low", "normal", "high", "urgent"]
    stream = document["paths"]["/api/v1/queues/{queue}/stream"]["get"]
    [resume] = [p for p in stream["parameters"] if p["name"] == "Last-Event-ID"]
    assert resume["schema"]["pattern"] == "^[0-9]{1,19}$"


def patterns(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from [inner] if key == "pattern" else patterns(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from patterns(inner)


# Compiles each pattern as JSON Schema's dialect, ECMAScript, with the Unicode flag; prints the
# ones that fail.
COMPILE = (
    "for (const p of JSON.parse(process.argv[1])) { try { new RegExp(p, 'u') } catch { console.log(p) } }"
)


def test_every_pattern_is_an_ecmascript_regex(document: dict[str, Any]) -> None:
    need_tool("node")
    found = sorted(set(patterns(document)))
    assert len(found) >= 5
    refused = subprocess.run(
        ["node", "-e", COMPILE, json.dumps(found)], capture_output=True, text=True, check=True
    )
    assert refused.stdout == "", refused.stdout


# The schema and the server agree ----------------------------------------------------------

PATCHES = [
    {"alert_after": None},
    {"dead_letter_urgent": None},
    {"description": None},
    {"max_attempts": 0},
    {"retention_seconds": 2**31},
    {"description": "ok", "dead_letter_urgent": True},
]
BATCHES = [
    {},
    {"items": []},
    {"items": [{"body": 1}]},
    {"items": [{"body": 1}] * 1001},
    {"items": [{"body": 1}], "x": 1},
]
PUBLISHES = [{"body": 1, "headers": {"bad name": "x"}}, {"body": 1, "headers": {"ok-name": "x"}}]
TOKENS = [{"sub": "svc", "ttl": "soon"}, {"sub": "svc", "ttl": "1h"}, {"sub": "svc", "ttl": " 90 "}]


async def test_the_server_takes_exactly_what_the_schema_allows(
    sqlite_server: Server, document: dict[str, Any]
) -> None:
    queue = unique()
    cases = [
        *(("patch", "/api/v1/queues/{queue}", f"/api/v1/queues/{queue}", body) for body in PATCHES),
        *(
            ("post", "/api/v1/queues/{queue}/messages/batch", f"/api/v1/queues/{queue}/messages/batch", b)
            for b in BATCHES
        ),
        *(
            ("post", "/api/v1/queues/{queue}/messages", f"/api/v1/queues/{queue}/messages", b)
            for b in PUBLISHES
        ),
        *(("post", "/api/v1/tokens", "/api/v1/tokens", body) for body in TOKENS),
    ]
    async with sqlite_server.client() as http:
        assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
        for method, path, url, body in cases:
            answer = await http.request(method.upper(), url, json=body)
            accepted = valid(document, body_schema(document, path, method), body)
            assert (answer.status_code < 300) == accepted, (path, body, answer.text)
            if not accepted:
                assert answer.status_code == 422, answer.text


async def test_an_id_longer_than_any_the_server_gives_is_refused_not_a_500(sqlite_server: Server) -> None:
    queue, long_id = unique(), "0" * 63
    async with sqlite_server.client() as http:
        await http.post("/api/v1/queues", json={"name": queue})
        answers = [
            await http.get(f"/api/v1/queues/{queue}/messages/{long_id}"),
            await http.delete(f"/api/v1/tokens/{long_id}"),
            await http.patch(f"/api/v1/notifications/{long_id}", json={"is_read": True}),
            await http.post(f"/api/v1/queues/{queue}/redrive", json={"ids": [long_id]}),
            await http.post(f"/api/v1/queues/{queue}/messages/{'0' * 36}/nack", json={"lease_id": long_id}),
        ]
    assert [a.status_code for a in answers] == [422] * len(answers), [a.text for a in answers]


# Every documented error status, triggered and checked against its documented schema ---------


def answered_as_documented(document: dict[str, Any], path: str, method: str, answer: httpx.Response) -> None:
    response = document["paths"][path][method]["responses"][str(answer.status_code)]
    media = answer.headers["content-type"].split(";")[0]
    schema = response["content"][media]["schema"]
    assert valid(document, schema, answer.json()), answer.text
    for header in response.get("headers", {}):
        assert header in answer.headers, (header, answer.headers)


async def test_each_error_status_is_answered_as_documented(
    sqlite_server: Server, document: dict[str, Any]
) -> None:
    queue = unique()
    narrow = auth(mint("reader", "subscribe:other"))
    messages = "/api/v1/queues/{queue}/messages"
    async with sqlite_server.client() as http:
        assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
        walk = [
            (
                "/api/v1/queues",
                "get",
                401,
                lambda: http.get("/api/v1/queues", headers={"Authorization": "Bearer nope"}),
            ),
            (
                "/api/v1/queues/{queue}",
                "get",
                403,
                lambda: http.get(f"/api/v1/queues/{queue}", headers=narrow),
            ),
            ("/api/v1/queues/{queue}", "get", 404, lambda: http.get(f"/api/v1/queues/{unique()}")),
            ("/api/v1/queues", "post", 409, lambda: http.post("/api/v1/queues", json={"name": queue})),
            (
                "/api/v1/queues",
                "post",
                400,
                lambda: http.post("/api/v1/queues", content=b"{", headers=json_type()),
            ),
            (
                messages,
                "post",
                413,
                lambda: http.post(f"/api/v1/queues/{queue}/messages", content=b"x" * 300_000),
            ),
            (
                messages,
                "post",
                415,
                lambda: http.post(f"/api/v1/queues/{queue}/messages", content=b"x", headers=text("x-nope")),
            ),
            (
                "/api/v1/queues/{queue}/claim",
                "post",
                422,
                lambda: http.post(f"/api/v1/queues/{queue}/claim", json={"max": 0}),
            ),
            ("/api/v1/tokens", "get", 403, lambda: http.get("/api/v1/tokens", headers=narrow)),
        ]
        for path, method, status, request in walk:
            answer = await request()
            assert answer.status_code == status, (path, answer.text)
            assert status in statuses(document, path, method)
            answered_as_documented(document, path, method, answer)


def json_type() -> dict[str, str]:
    return {"Content-Type": "application/json"}


def text(charset: str) -> dict[str, str]:
    return {"Content-Type": f"text/plain; charset={charset}"}


async def test_a_stream_past_its_cap_is_429_as_documented(make_server: Any, document: dict[str, Any]) -> None:
    server: Server = make_server(streams_per_subject="1").start()
    reader = auth(mint("reader", "subscribe:*"))
    path = "/api/v1/notifications/stream"
    async with Listener(f"{server.url}{path}", reader), server.client(reader) as http:
        answer = await http.get(path)
    assert answer.status_code == 429, answer.text
    answered_as_documented(document, path, "get", answer)


async def test_a_locked_database_is_503_as_documented(
    tmp_path: Path, make_server: Any, document: dict[str, Any]
) -> None:
    server: Server = make_server().start()
    holder = sqlite3.connect(server.data_dir / "pombo.sqlite3", isolation_level=None, timeout=10)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another writer holds the file past the busy timeout
        async with server.client(ADMIN) as http:
            answer = await http.post("/api/v1/queues", json={"name": unique()})
    finally:
        holder.close()
    assert answer.status_code == 503, answer.text
    answered_as_documented(document, "/api/v1/queues", "post", answer)
