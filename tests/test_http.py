"""HTTP details on a real server: methods, headers, limits, encodings, CORS, file modes."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ADMIN, ROOT, Listener, Server, assert_error, auth, mint, need_tool, snapshot, unique

from settings import SettingsError, load_settings

SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": (
        "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
}
EVENTSOURCE = ROOT / "tests" / "eventsource"


@pytest.fixture
async def http(sqlite_server: Server) -> Any:
    async with sqlite_server.client() as client:
        yield client


async def create_queue(http: httpx.AsyncClient) -> str:
    name = unique()
    assert (await http.post("/api/v1/queues", json={"name": name})).status_code == 201
    return name


def raw(server: Server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request as bytes on a socket of its own: status, headers, body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before it read it all
            sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


# 405 and HEAD ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/api/v1/queues", "GET, HEAD, POST"),
        ("PUT", "/healthz", "GET, HEAD"),
        ("POST", "/api/v1/queues/q/messages/m", "GET, HEAD, DELETE"),
        ("GET", "/api/v1/queues/q/claim", "POST"),
    ],
)
async def test_a_405_says_which_methods_the_path_takes(
    http: httpx.AsyncClient, method: str, path: str, allowed: str
) -> None:
    response = await http.request(method, path)
    error = assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allowed
    assert error["details"] == {"allowed": allowed.split(", ")}


async def test_head_is_answered_wherever_get_is(sqlite_server: Server, http: httpx.AsyncClient) -> None:
    queue = await create_queue(http)
    await http.post(f"/api/v1/queues/{queue}/messages", content="hello")
    for path in ("/healthz", "/readyz", "/api/v1/me", f"/api/v1/queues/{queue}/messages", "/openapi.json"):
        got, head = await http.get(path), await http.head(path)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b""
        for name in ("content-type", "content-length", "content-encoding"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)
    # a stream answers its headers and ends, holding no place
    head = await http.head(f"/api/v1/queues/{queue}/stream")
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
    assert head.content == b""
    assert (await http.get("/healthz")).json()["streams"] == 0
    assert (await http.head("/api/v1/nothing")).status_code == 404
    assert (await http.head("/api/v1/queues/q/claim")).status_code == 405


# Security headers --------------------------------------------------------------------------------


async def test_every_response_carries_the_security_headers(
    sqlite_server: Server, http: httpx.AsyncClient
) -> None:
    queue = await create_queue(http)
    answers = [
        await http.get("/healthz"),
        await http.get("/api/v1/nothing"),  # 404
        await http.put("/healthz"),  # 405
        await http.get("/api/v1/me", headers={}),  # 401
        await http.get("/api/v1/queues", params={"limit": 0}),  # 422
        await http.post(f"/api/v1/queues/{queue}/messages", content="x"),  # 201, the direct route
    ]
    async with http.stream("GET", f"/api/v1/queues/{queue}/stream") as stream:
        answers.append(stream)
    for response in answers:
        for name, value in SECURITY.items():
            assert response.headers.get(name) == value, (response.request.url, name)
        assert "strict-transport-security" not in response.headers
    status, headers, _ = raw(sqlite_server, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414 and all(headers[name] == value for name, value in SECURITY.items())


async def test_hsts_when_asked(make_server: Any) -> None:
    server = make_server(hsts="true").start()
    async with server.client() as http:
        for response in (await http.get("/healthz"), await http.get("/nothing"), await http.get("/docs")):
            assert response.headers["strict-transport-security"] == "max-age=31536000"
    _, headers, _ = raw(server, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert headers["strict-transport-security"] == "max-age=31536000"


async def test_the_docs_pages_allow_only_their_own_inline_code(http: httpx.AsyncClient) -> None:
    swagger = (await http.get("/docs")).headers["content-security-policy"]
    assert swagger.startswith("default-src 'self'; script-src 'self' 'sha256-")
    assert "unsafe-inline" not in swagger and "unsafe-eval" not in swagger
    redoc = (await http.get("/redoc")).headers["content-security-policy"]
    assert "script-src 'self';" in redoc and "style-src 'self' 'unsafe-inline';" in redoc
    assert (await http.get("/openapi.json")).headers["content-security-policy"] == SECURITY[
        "content-security-policy"
    ]


async def test_the_docs_render_in_chromium_under_their_policy(sqlite_server: Server) -> None:
    need_tool("chromium")
    playwright = pytest.importorskip("playwright.async_api")
    async with playwright.async_playwright() as driver:
        chromium = shutil.which("chromium")
        browser = await driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for path, rendered in (("/docs", ".opblock"), ("/redoc", "h1")):
                page, said = await browser.new_page(), []
                page.on("console", lambda message, said=said: said.append(message.text))
                await page.goto(sqlite_server.url + path)
                await page.wait_for_selector(rendered, timeout=20_000)
                # ReDoc's logo from its CDN is refused, as it should be: own origin only.
                blocked = [m for m in said if "Content Security Policy" in m and "cdn.redoc.ly" not in m]
                assert blocked == [], (path, blocked)
        finally:
            await browser.close()


# 429, 503 and the stream cap ---------------------------------------------------------------------


async def test_a_429_says_when_to_come_back(make_server: Any) -> None:
    server = make_server(streams_per_subject="1").start()
    viewer = auth(mint("viewer", "subscribe:*"))
    async with server.client() as http:
        queue = await create_queue(http)
        url = f"{server.url}/api/v1/queues/{queue}/stream"
        async with Listener(url, {**viewer}):  # httpx-sse adds its Accept to the dict it is given
            refused = await http.get(url, headers=viewer)
            assert assert_error(refused, 429, "rate_limited")["details"] == {"limit": 1}
            assert refused.headers["retry-after"] == "10"


async def test_an_eventsource_over_its_cap_is_told_to_wait_and_comes_back(make_server: Any) -> None:
    """A real EventSource, which gives up for good on any status but 200."""
    need_tool("node")
    need_tool("eventsource (npm ci --prefix tests/eventsource)", (EVENTSOURCE / "node_modules").is_dir())
    server = make_server(streams_per_subject="1").start()
    token = mint("viewer", "subscribe:*")
    async with server.client() as http:
        queue = await create_queue(http)
        url = f"{server.url}/api/v1/queues/{queue}/stream?access_token={token}"
        holder = Listener(url, {})
        await holder.__aenter__()  # the viewer's one place
        node = await asyncio.create_subprocess_exec(
            "node",
            str(EVENTSOURCE / "listen.mjs"),
            url,
            "stream.busy",
            "message.created",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            seen: list[dict[str, Any]] = []

            async def until(check: Any, timeout: float) -> dict[str, Any]:
                assert node.stdout is not None
                async with asyncio.timeout(timeout):
                    while True:
                        seen.append(json.loads(await node.stdout.readline()))
                        if check(seen[-1]):
                            return seen[-1]

            busy = await until(lambda line: line["kind"] == "event", 10)
            assert busy["type"] == "stream.busy" and busy["id"] == ""
            assert json.loads(busy["data"]) == {
                "reason": "too_many_streams",
                "message": "'viewer' already holds 1 streams here",
                "limit": 1,
                "retry_after": 10,
            }
            error = await until(lambda line: line["kind"] == "error", 5)
            assert error["readyState"] == 0  # CONNECTING: it will try again, not CLOSED (2)
            await holder.__aexit__(None, None, None)  # the place comes free
            opened = await until(lambda line: line["kind"] == "open", 15)
            assert 9 <= opened["at"] - busy["at"] <= 13  # after `retry:`, 10 s
            await http.post(f"/api/v1/queues/{queue}/messages", content="back")
            created = await until(lambda line: line["kind"] == "event", 10)
            assert created["type"] == "message.created" and json.loads(created["data"])["body"] == "back"
        finally:
            if not holder.finished:
                await holder.__aexit__(None, None, None)
            assert node.stdin is not None
            node.stdin.close()
            await node.wait()


# Cursors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cursor", ["abc", "-5", "1.5", "", "²", str(2**63)])
async def test_a_cursor_that_cannot_be_read_is_422_in_the_header_as_in_the_query(
    http: httpx.AsyncClient, cursor: str
) -> None:
    queue = await create_queue(http)
    for url in (f"/api/v1/queues/{queue}/stream", "/api/v1/notifications/stream"):
        headers = [(b"last-event-id", cursor.encode("latin-1" if cursor == "²" else "utf-8"))]
        response = await http.get(url, headers=headers)
        error = assert_error(response, 422, "validation_error")
        assert error["details"] == {"header.Last-Event-ID": ["a whole number from 0 to 9223372036854775807"]}
        response = await http.get(url, params={"last_event_id": cursor})
        assert assert_error(response, 422, "validation_error")["details"].keys() == {"query.last_event_id"}
    assert (await http.get("/healthz")).json()["streams"] == 0


# Authentication first ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/queues", b"{not json"),
        ("/api/v1/queues", b'{"name": "UPPER CASE"}'),
        ("/api/v1/tokens", b"{not json"),
        ("/api/v1/notifications", b'{"recipients": 5}'),
        ("/api/v1/queues/q/claim", b"[[["),
        ("/api/v1/queues/q/messages/batch", b"{not json"),
        ("/api/v1/queues/q/messages", b"{not json"),
    ],
)
async def test_without_a_token_a_bad_body_is_401_first(
    sqlite_server: Server, http: httpx.AsyncClient, path: str, body: bytes
) -> None:
    before = await snapshot(sqlite_server)
    headers = {"Content-Type": "application/json"}
    for credentials in ({"Authorization": ""}, {"Authorization": "Bearer not-a-token"}):
        response = await http.post(path, content=body, headers={**headers, **credentials})
        assert_error(response, 401, "unauthorized")
    with_token = await http.post(path, content=body, headers={**ADMIN, **headers})
    assert with_token.status_code in (400, 404, 422), with_token.text
    assert await snapshot(sqlite_server) == before


# Oversized requests -----------------------------------------------------------------------------

_GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code", "limit"),
    [
        (b"GET /healthz?x=" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "too_large", 16384),
        (_GET + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431, "too_large", 32768),
        (_GET + b"".join(b"X-%d: a\r\n" % i for i in range(5000)) + b"\r\n", 431, "too_large", 32768),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed_request", None),
    ],
)
async def test_a_request_the_server_refuses_itself_gets_the_envelope(
    sqlite_server: Server, request_bytes: bytes, status: int, code: str, limit: int | None
) -> None:
    answered, headers, body = await asyncio.to_thread(raw, sqlite_server, request_bytes)
    assert answered == status
    assert headers["content-type"] == "application/json" and headers["x-request-id"]
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"]
    assert error["details"] == ({"limit": limit} if limit else {})


async def test_a_10_mb_header_is_refused_before_it_is_held(sqlite_server: Server) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000_000 + b"\r\n\r\n"
    status, _, _ = await asyncio.to_thread(raw, sqlite_server, request)
    assert status == 431


# Text bodies and their charsets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "raw_body", "stored_type"),
    [
        (
            "text/plain; charset=iso-8859-1",
            "café €".encode("iso-8859-1", "replace"),
            "text/plain; charset=utf-8",
        ),
        ('text/plain; charset="UTF-16"', "café ☕".encode("utf-16"), "text/plain; charset=utf-8"),
        ("text/csv; header=present; charset=windows-1252", "a;b\r\n€;é".encode("cp1252"), None),
        ("text/plain", "café".encode(), "text/plain"),
    ],
)
async def test_a_text_body_is_decoded_by_its_declared_charset(
    http: httpx.AsyncClient, content_type: str, raw_body: bytes, stored_type: str | None
) -> None:
    queue = await create_queue(http)
    response = await http.post(
        f"/api/v1/queues/{queue}/messages", content=raw_body, headers={"Content-Type": content_type}
    )
    assert response.status_code == 201, response.text
    message = response.json()
    charset = content_type.split("charset=")[-1].strip('"') if "charset" in content_type else "utf-8"
    assert message["body"] == raw_body.decode(charset)
    expected = stored_type or "text/csv; header=present; charset=utf-8"
    assert message["content_type"] == expected
    stored = (await http.get(f"/api/v1/queues/{queue}/messages/{message['id']}")).json()
    assert stored["body"] == message["body"]


@pytest.mark.parametrize(
    ("content_type", "raw_body", "status", "code"),
    [
        ("text/plain; charset=klingon", b"qapla'", 415, "unsupported_charset"),
        ("text/plain; charset=base64", b"aGk=", 415, "unsupported_charset"),
        ("text/plain; charset=us-ascii", b"caf\xe9", 400, "invalid_encoding"),
        ("text/plain; charset=utf-8", b"caf\xe9", 400, "invalid_utf8"),
    ],
)
async def test_a_charset_that_does_not_fit_changes_nothing(
    sqlite_server: Server,
    http: httpx.AsyncClient,
    content_type: str,
    raw_body: bytes,
    status: int,
    code: str,
) -> None:
    queue = await create_queue(http)
    before = await snapshot(sqlite_server)
    response = await http.post(
        f"/api/v1/queues/{queue}/messages", content=raw_body, headers={"Content-Type": content_type}
    )
    error = assert_error(response, status, code)
    if status == 415:
        assert error["details"] == {"charset": content_type.split("=")[1]}
    assert await snapshot(sqlite_server) == before


# gzip -------------------------------------------------------------------------------------------


async def test_large_answers_are_gzipped_and_small_ones_and_streams_are_not(
    http: httpx.AsyncClient,
) -> None:
    queue = await create_queue(http)
    items = [{"body": {"n": n, "text": "the same words again " * 20}} for n in range(200)]
    url = f"/api/v1/queues/{queue}/messages"
    assert (await http.post(f"{url}/batch", json={"items": items})).status_code == 201
    gz = {"Accept-Encoding": "gzip"}
    for params in ({"limit": 200}, {"format": "csv"}, {"format": "xlsx"}):
        async with http.stream("GET", url, params=params, headers=gz) as response:
            compressed = b"".join([chunk async for chunk in response.aiter_raw()])
        assert response.status_code == 200
        assert response.headers["content-encoding"] == "gzip", params
        assert "accept-encoding" in response.headers["vary"].lower()
        plain = await http.get(url, params=params, headers={"Accept-Encoding": ""})
        assert "content-encoding" not in plain.headers
        assert gzip.decompress(compressed) == plain.content or params.get("format") == "xlsx"
        if "format" not in params:
            assert len(compressed) < len(plain.content) / 10, (len(compressed), len(plain.content))
    small = await http.get("/healthz", headers=gz)
    assert "content-encoding" not in small.headers
    async with http.stream("GET", f"/api/v1/queues/{queue}/stream", headers=gz) as stream:
        assert "content-encoding" not in stream.headers
        async with asyncio.timeout(5):  # not held back in a compressor's buffer
            assert (await anext(stream.aiter_raw())).startswith(b"retry: ")


# CORS -------------------------------------------------------------------------------------------


async def test_without_cors_origins_no_page_elsewhere_may_read(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz", headers={"Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in response.headers
    asked = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    preflight = await http.options("/api/v1/queues", headers=asked)
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


async def test_cors_for_the_named_origins_streams_and_errors_included(make_server: Any) -> None:
    page = "https://app.example.com"
    server = make_server(cors_origins=f"{page}, http://localhost:5173", cors_credentials="true").start()
    async with server.client() as http:
        queue = await create_queue(http)
        preflight = await http.options(
            f"/api/v1/queues/{queue}/stream",
            headers={
                "Origin": page,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization, last-event-id",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == page
        assert preflight.headers["access-control-allow-credentials"] == "true"
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "last-event-id" in allowed
        assert preflight.headers["x-frame-options"] == "DENY"
        origin = {"Origin": page}
        for response in (await http.get("/healthz", headers=origin), await http.get("/nope", headers=origin)):
            assert response.headers["access-control-allow-origin"] == page
            exposed = response.headers["access-control-expose-headers"]
            assert "X-Request-ID" in exposed and "Retry-After" in exposed
        async with http.stream("GET", f"/api/v1/queues/{queue}/stream", headers=origin) as stream:
            assert stream.headers["access-control-allow-origin"] == page
        other = await http.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_any_origin_is_refused_with_credentials_and_origins_are_checked() -> None:
    with pytest.raises(SettingsError, match=re.escape("POMBO_CORS_ORIGINS=* cannot go with POMBO_CORS_")):
        load_settings(cors_origins="*", cors_credentials=True)
    with pytest.raises(SettingsError, match=re.escape("POMBO_CORS_ORIGINS: 'https://a.example/app' is")):
        load_settings(cors_origins="https://a.example/app")
    assert load_settings(cors_origins="*").allowed_origins == ("*",)


async def test_any_origin_without_credentials(make_server: Any) -> None:
    server = make_server(cors_origins="*").start()
    async with server.client() as http:
        response = await http.get("/healthz", headers={"Origin": "https://anywhere.example"})
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


# File modes -------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_data_dir_and_the_database_are_private(make_server: Any, tmp_path: Path) -> None:
    fresh = make_server(tmp_path / "fresh").start()
    async with fresh.client() as http:
        await create_queue(http)
    data = fresh.data_dir
    assert mode(data) == 0o700
    for name in ("pombo.sqlite3", "pombo.sqlite3-wal", "pombo.sqlite3-shm"):
        assert mode(data / name) == 0o600, name
    fresh.stop()
    # a data dir left open by an older version is narrowed at start
    data.chmod(0o755)
    for name in ("pombo.sqlite3", "pombo.sqlite3-wal", "pombo.sqlite3-shm"):
        if (data / name).exists():
            (data / name).chmod(0o644)
    again = make_server(data).start()
    assert mode(data) == 0o700
    for name in ("pombo.sqlite3", "pombo.sqlite3-wal", "pombo.sqlite3-shm"):
        assert mode(data / name) == 0o600, name
    again.stop()
