"""Attacks a small team's Pombo on the internet will meet: bad tokens of every kind, revocation
(on an open stream, on a second replica), scopes that must not over-match, hostile path and
filter values on every route, oversized and slow requests. The log of the whole session is
checked for tokens and secrets at its end (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import rsa
from conftest import (
    ADMIN,
    ROOT,
    SECRET,
    Listener,
    Server,
    assert_error,
    auth,
    leaks,
    mint,
    need_tool,
    never_logged,
    unique,
)
from jose import jwt

ME = "/api/v1/me"
OTHER_SECRET = never_logged("another-secret-" + "y" * 40)
NEW_SECRET = never_logged("the-new-secret-" + "z" * 40)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    """An admin token's claims, as Pombo mints them, with `changes` (None removes a claim)."""
    now = int(time.time())
    base = {"sub": "mallory", "scope": "admin", "iat": now, "exp": now + 3600, "jti": unique("jti")}
    merged = {**base, **changes}
    return {k: v for k, v in merged.items() if v is not None}


def signed(payload: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return never_logged(str(jwt.encode(payload, key, algorithm=algorithm)))


def hand_made(header: dict[str, Any], payload: dict[str, Any], key: bytes | None = None) -> str:
    """A JWT built byte by byte: HMAC-SHA256 over it with `key`, or no signature at all."""
    head = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = b64url(hmac.new(key, head.encode(), hashlib.sha256).digest()) if key else ""
    return never_logged(f"{head}.{signature}")


def rs256(payload: dict[str, Any]) -> tuple[str, bytes]:
    """A token signed RS256 with a fresh key pair, and that pair's public key (PEM)."""
    public, private = rsa.newkeys(1024)
    return signed(payload, private.save_pkcs1().decode(), "RS256"), public.save_pkcs1()


async def status_of(server: Server, token: str | None, via: str = "header") -> httpx.Response:
    headers = auth(token) if token and via == "header" else {}
    params = {"access_token": token} if token and via == "query" else {}
    async with server.client(headers=headers) as http:
        return await http.get(ME, params=params)


# Bad tokens: each one 401 with the envelope, by header and by access_token -----------------------

NOW = int(time.time())
_PUBLIC_KEY: list[bytes] = []


def _rs256_token() -> str:
    token, public = rs256(claims())
    _PUBLIC_KEY.append(public)
    return token


def _public_key_as_hmac_secret() -> str:
    """Key confusion: HS256 keyed with an RSA public key (what a verifier that takes the
    algorithm from the token would check an RS256 token against)."""
    if not _PUBLIC_KEY:
        _rs256_token()
    return hand_made({"alg": "HS256", "typ": "JWT"}, claims(), _PUBLIC_KEY[0])


BAD_TOKENS = {
    "expired": lambda: mint(ttl=-60),
    "not yet valid (nbf)": lambda: signed(claims(nbf=int(time.time()) + 600)),
    "forged (wrong secret)": lambda: mint(secret=OTHER_SECRET),
    "alg none": lambda: hand_made({"alg": "none", "typ": "JWT"}, claims()),
    "alg None": lambda: hand_made({"alg": "None"}, claims()),
    "alg none, signed anyway": lambda: hand_made({"alg": "none"}, claims(), SECRET.encode()),
    "no alg": lambda: hand_made({"typ": "JWT"}, claims(), SECRET.encode()),
    "RS256": _rs256_token,
    "RS256 header, HMAC signature": lambda: hand_made({"alg": "RS256"}, claims(), SECRET.encode()),
    "HS256 keyed with a public key": _public_key_as_hmac_secret,
    "HS512 with the right secret": lambda: signed(claims(), SECRET, "HS512"),
    "no exp": lambda: signed(claims(exp=None)),
    "no sub": lambda: signed(claims(sub=None)),
    "exp beyond any date": lambda: signed(claims(exp=10**20)),
    "exp not a number": lambda: signed(claims(exp=[1])),
    "sub not a string": lambda: signed(claims(sub={"a": 1})),
    "sub with a NUL": lambda: signed(claims(sub="a\x00b")),
    "jti not a string": lambda: signed(claims(jti=["x"])),
    "unknown scope": lambda: signed(claims(scope="root")),
    "an audience this server does not expect": lambda: signed(claims(aud="someone-else")),
    "payload not JSON": lambda: hand_made({"alg": "HS256"}, claims(), SECRET.encode()).replace(
        ".", ".bm90IGpzb24.", 1
    ),
}


@pytest.mark.parametrize("via", ["header", "query"])
@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_a_bad_token_is_401_never_a_grant_nor_a_500(sqlite_server: Server, kind: str, via: str) -> None:
    response = await status_of(sqlite_server, BAD_TOKENS[kind](), via)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_missing_token_is_401_and_the_controls_pass(sqlite_server: Server) -> None:
    assert_error(await status_of(sqlite_server, None), 401, "unauthorized")
    # The same hand-made construction with the right key and claims is accepted: the refusals
    # above are for what each case changes, not for how the tokens were built.
    for token in (
        hand_made({"alg": "HS256", "typ": "JWT"}, claims()),  # unsigned: refused
        hand_made({"alg": "HS256", "typ": "JWT"}, claims(), SECRET.encode()),
        signed(claims(nbf=int(time.time()) - 5)),
    ):
        response = await status_of(sqlite_server, token)
        expected = 401 if token.endswith(".") else 200
        assert response.status_code == expected, (token[:20], response.text)


# Rotation, issuer, audience --------------------------------------------------------------------


async def test_a_rotated_secret_keeps_old_tokens_until_it_is_dropped(make_server: Any) -> None:
    # SECRET (which signed the suite's ADMIN) was the secret; NEW_SECRET replaces it.
    rotated = make_server(jwt_secret=NEW_SECRET, jwt_previous_secrets=f"{OTHER_SECRET}, {SECRET}").start()
    async with rotated.client() as http:
        assert (await http.get(ME)).status_code == 200  # signed with a previous secret
        minted = await http.post("/api/v1/tokens", json={"sub": "after", "scope": "subscribe:*"})
        assert minted.status_code == 201, minted.text
        token = minted.json()["token"]
        # New tokens are signed with the current secret alone.
        assert jwt.decode(token, NEW_SECRET, algorithms=["HS256"])["sub"] == "after"
        for previous in (SECRET, OTHER_SECRET):
            with pytest.raises(jwt.JWTError):
                jwt.decode(token, previous, algorithms=["HS256"])
        assert_error(
            await http.get(ME, headers=auth(mint(secret="never-was-ours-" + "w" * 40))), 401, "unauthorized"
        )

    rotated.stop()
    rotated.env.pop("POMBO_JWT_PREVIOUS_SECRETS")  # the old secret is dropped
    rotated.start()
    async with rotated.client() as http:
        assert_error(await http.get(ME), 401, "unauthorized")  # rotated out
        assert (await http.get(ME, headers=auth(token))).status_code == 200


ISSUER, AUDIENCE = "https://pombo.example", "pombo-api"


async def test_with_an_issuer_and_audience_tokens_carry_them_and_others_are_refused(make_server: Any) -> None:
    server = make_server(jwt_issuer=ISSUER, jwt_audience=AUDIENCE).start()
    admin = auth(signed(claims(iss=ISSUER, aud=AUDIENCE)))
    async with server.client(headers=admin) as http:
        assert (await http.get(ME)).status_code == 200
        minted = await http.post("/api/v1/tokens", json={"sub": "svc", "scope": "subscribe:*"})
        assert minted.status_code == 201, minted.text
        token = minted.json()["token"]
        carried = jwt.get_unverified_claims(token)
        assert (carried["iss"], carried["aud"]) == (ISSUER, AUDIENCE)
        assert (await http.get(ME, headers=auth(token))).status_code == 200
        # An audience among several is the token's audience too (RFC 7519 §4.1.3).
        several = signed(claims(iss=ISSUER, aud=["other", AUDIENCE]))
        assert (await http.get(ME, headers=auth(several))).status_code == 200
        for wrong in (
            {},  # the suite's usual token: neither claim
            {"iss": ISSUER},
            {"aud": AUDIENCE},
            {"iss": "https://evil.example", "aud": AUDIENCE},
            {"iss": ISSUER, "aud": "pombo-api-2"},
            {"iss": ISSUER.upper(), "aud": AUDIENCE},
        ):
            refused = await http.get(ME, headers=auth(signed(claims(**wrong))))
            assert_error(refused, 401, "unauthorized")


# Revocation, on an open stream and on a second replica -------------------------------------------


async def test_a_revoked_token_is_refused_on_a_second_replica_and_its_stream_there_ends(
    make_server: Any, pg_url: str, redis_url: str
) -> None:
    prefix = unique("test")
    shared = {"database_url": pg_url, "redis_url": redis_url, "redis_prefix": prefix}
    one = make_server(**shared).start()
    two = make_server(heartbeat_seconds="0.3", **shared).start()
    async with one.client() as http:
        queue = unique()
        assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
        minted = await http.post("/api/v1/tokens", json={"sub": unique("viewer"), "scope": "subscribe:*"})
        token_id, viewer = minted.json()["id"], auth(minted.json()["token"])
        url = f"{two.url}/api/v1/queues/{queue}/stream"
        async with Listener(url, viewer) as stream, two.client(headers=viewer) as on_two:
            assert (await on_two.get(ME)).status_code == 200
            assert (await http.delete(f"/api/v1/tokens/{token_id}")).status_code == 200
            [ended] = await stream.wait_for(1, timeout=8, event="stream.expired")
            assert json.loads(ended.data) == {"reason": "token_revoked"}
            await stream.wait_for(len(stream.events) + 1, timeout=3)
            assert stream.finished  # the replica closed it
            assert_error(await on_two.get(ME), 401, "unauthorized")
            new_stream = await on_two.get(f"/api/v1/queues/{queue}/stream")
            assert_error(new_stream, 401, "unauthorized")
        async with two.client(headers={}) as anonymous:
            by_query = await anonymous.get(ME, params={"access_token": minted.json()["token"]})
            assert_error(by_query, 401, "unauthorized")


# Log hygiene -------------------------------------------------------------------------------------


def test_the_session_log_check_finds_tokens_secrets_and_access_token_values() -> None:
    token = mint("leak")
    assert leaks("GET /api/v1/me 200 1.0ms", "log") == []
    assert leaks(f"Bearer {token}", "log")  # registered
    assert leaks(f"saw {SECRET}", "log")
    unregistered = hand_made({"alg": "HS256"}, claims(), b"k" * 32)
    assert any("a JWT" in found for found in leaks(unregistered, "log"))  # by its shape
    assert leaks("GET /api/v1/queues/q/stream?access_token=abc", "log")
    assert leaks("the query parameter access_token is for EventSource", "log") == []


# Scopes: globs that must not over-match ------------------------------------------------------------


async def publish(http: httpx.AsyncClient, queue: str, headers: dict[str, str]) -> int:
    return (await http.post(f"/api/v1/queues/{queue}/messages", content="x", headers=headers)).status_code


async def test_scope_globs_match_what_they_say_and_nothing_more(sqlite_server: Server) -> None:
    p = unique("a")  # a-1a2b3c4d: a family of queues of this test's own
    family = {"p": p, "pb": f"{p}b", "p.b": f"{p}.b", "p.b.c": f"{p}.b.c", "pxb": f"{p}xb", "b": unique("b")}
    async with sqlite_server.client() as http:
        for name in family.values():
            assert (await http.post("/api/v1/queues", json={"name": name})).status_code == 201
        # pattern -> the family members it grants, per DECISIONS.md §19 (`*` also matches dots)
        grants = {
            "a*": {"p", "pb", "p.b", "p.b.c", "pxb"},  # `publish:a*` against `b-…`: refused
            "{p}": {"p"},
            "{p}*": {"p", "pb", "p.b", "p.b.c", "pxb"},
            "{p}.*": {"p.b", "p.b.c"},  # a regex reading would take `pb` too
            "{p}.b": {"p.b"},  # the dot is a dot, not any character: never `pxb`
            "{p}?": {"pb"},
            "{p}.b.*": {"p.b.c"},
        }
        for pattern, granted in grants.items():
            token = auth(mint("globber", "publish:" + pattern.format(p=p)))
            for member, name in family.items():
                expected = 201 if member in granted else 403
                assert await publish(http, name, token) == expected, (pattern, name)
        # One action never grants another, whatever the pattern.
        reader = auth(mint("globber", f"subscribe:{p}* consume:* manage:*"))
        assert await publish(http, p, reader) == 403
        writer = auth(mint("globber", "publish:*"))
        for path in ("messages", "events"):
            assert_error(await http.get(f"/api/v1/queues/{p}/{path}", headers=writer), 403, "forbidden")


# Hostile values in every path parameter and filter, walked from the OpenAPI -----------------------


def _openapi() -> dict[str, Any]:
    from main import create_app
    from settings import load_settings

    document: dict[str, Any] = create_app(load_settings(environment="test", jwt_secret=SECRET)).openapi()
    return document


# As they are written into the request line: encoded where a client would encode them, and
# `../` as it is (httpx would resolve it away, so the requests go out through a raw socket).
HOSTILE = {
    "dot-dot-slash": "../",
    "dot-dot-encoded-slash": "..%2f",
    "encoded dot": "%2e",
    "encoded dot-dot": "%2e%2e",
    "encoded traversal": "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "double-encoded dot-dot": "%252e%252e",
    "NUL": "a%00b",
    "NUL alone": "%00",
    "invalid UTF-8": "%ff%fe",
    "very long": "a" * 6000,
    "quote OR": "x%27%20OR%201%3D1%20--",
    "double quote drop": "x%22%3B%20DROP%20TABLE%20messages%3B%20--",
    "percent": "%25",
    "underscore": "_",
    "backslash": "%5C",
    "star": "*",
}
# A header cannot carry an encoded value: these go as they are (a NUL makes it malformed HTTP).
HOSTILE_HEADERS = {
    "dot-dot-slash": "../",
    "quote OR": "x' OR 1=1 --",
    "percent": "%",
    "very long": "a" * 6000,
    "NUL": "a\x00b",
}
# A body each route accepts, so that only the hostile value decides the answer.
BODIES: dict[tuple[str, str], Any] = {
    ("post", "/api/v1/queues/{queue}/messages"): {"body": "x"},
    ("post", "/api/v1/queues/{queue}/messages/batch"): {"items": [{"body": "x"}]},
    ("post", "/api/v1/queues/{queue}/claim"): {"max": 1, "wait": 0},
    ("post", "/api/v1/queues/{queue}/ack"): {"items": [{"id": "nope", "lease_id": "nope"}]},
    ("post", "/api/v1/queues"): {"name": "fuzz"},
    ("patch", "/api/v1/queues/{queue}"): {"description": "d"},
    ("post", "/api/v1/notifications"): {"recipients": ["tester"], "type": "x", "title": "t"},
    ("patch", "/api/v1/notifications/{notification_id}"): {"is_read": True},
    ("post", "/api/v1/tokens"): {"sub": "fuzz", "scope": "subscribe:fuzz"},
}
LEASED = {"lease_id": "nope"}


def _cases() -> list[tuple[str, str, str, str]]:
    """(method, path, where, name) for every parameter of every operation."""
    cases = []
    for path, operations in _openapi()["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["name"] != "access_token":
                    cases.append((method, path, parameter["in"], parameter["name"]))
    return cases


CASES = _cases()


async def raw_request(
    server: Server,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes = b"",
    length: int | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request through a socket of its own, exactly as written; the answer's status,
    headers and body (a stream's body is not waited for). `length` declares more than `body`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        head = [f"{method} {target} HTTP/1.1", "Host: pombo.test", "Connection: close"]
        head += [
            f"{name}: {value}"
            for name, value in {
                **headers,
                "Content-Length": str(len(body) if length is None else length),
            }.items()
        ]
        writer.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        answer = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines if line)}
        if answer.get("content-type", "").startswith("text/event-stream"):
            return int(status_line.split()[1]), answer, b""
        rest = await asyncio.wait_for(reader.read(), 30)
        return int(status_line.split()[1]), answer, _dechunked(rest) if "chunked" in str(answer) else rest
    finally:
        writer.close()


def _dechunked(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        out, data = out + data[: int(size, 16)], data[int(size, 16) + 2 :]
    return out


@pytest.fixture(scope="module")
async def seeded(server: Server) -> dict[str, str]:
    """A queue with messages of types `x` and `t1`, a notification of type `x`, and the ids a
    path needs when another of its parameters is the hostile one."""
    queue = unique("seeded")
    async with server.client() as http:
        assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
        batch = {
            "items": [{"body": "b", "type": "x"}, {"body": "b", "type": "t1"}, {"body": "b", "type": "x"}]
        }
        published = await http.post(f"/api/v1/queues/{queue}/messages/batch", json=batch)
        assert published.status_code == 201, published.text
        body = {"recipients": ["tester"], "type": "x", "title": "seed"}
        notified = await http.post("/api/v1/notifications", json=body)
        assert notified.status_code == 201, notified.text
        tokens = await http.get("/api/v1/tokens")
    return {
        "queue": queue,
        "message_id": published.json()["items"][0]["id"],
        "notification_id": notified.json()["items"][0]["id"],
        "token_id": tokens.json()["items"][0]["id"] if tokens.json()["items"] else "none",
    }


def _target(path: str, fill: dict[str, str], query: str = "") -> str:
    for name, value in fill.items():
        path = path.replace("{" + name + "}", value)
    return path + (f"?{query}" if query else "")


def _assert_refused_or_empty(status: int, headers: dict[str, str], body: bytes, where: str) -> None:
    """Never a 5xx; a 4xx in the envelope; a list answered despite the value lists nothing."""
    assert status < 500, (where, status, body[:300])
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == {"code", "message", "details"}, (where, body[:300])
    elif headers.get("content-type", "").startswith("application/json") and body:
        answer = json.loads(body)
        if isinstance(answer, dict) and "total" in answer and "items" in answer:
            assert answer["total"] == 0 and answer["items"] == [], (where, body[:300])


@pytest.mark.parametrize(("method", "path", "where", "name"), CASES, ids=[" ".join(c) for c in CASES])
async def test_hostile_values_in_every_parameter_are_refused_or_match_nothing(
    server: Server, seeded: dict[str, str], method: str, path: str, where: str, name: str
) -> None:
    body = json.dumps(BODIES.get((method, path), LEASED)).encode() if method in ("post", "patch") else b""
    headers = {**ADMIN, "Content-Type": "application/json"}
    values = HOSTILE_HEADERS if where == "header" else HOSTILE
    for label, value in values.items():
        fill, query, extra = dict(seeded), "", {}
        if where == "path":
            fill[name] = value
        elif where == "query":
            query = f"{name}={value}"
        else:
            extra = {name: value}
        target = _target(path, fill, query)
        status, answer, content = await raw_request(
            server, method.upper(), target, {**headers, **extra}, body
        )
        _assert_refused_or_empty(status, answer, content, f"{method} {target[:120]} ({label})")


async def test_filters_match_exactly_sql_and_like_metacharacters_match_nothing(
    server: Server, seeded: dict[str, str]
) -> None:
    messages = f"/api/v1/queues/{seeded['queue']}/messages"
    async with server.client() as http:
        # The control: the filter works, so an empty answer below is the filter's, not a failure.
        assert (await http.get(messages, params={"type": "x"})).json()["total"] == 2
        before = (await http.get(messages)).json()["total"]
        assert (await http.get("/api/v1/notifications", params={"type": "x"})).json()["total"] >= 1
        for value in ("' OR 1=1 --", "x' OR '1'='1", "%", "_", "x%", "\\", "x\\", "*", "x' --", '"x"'):
            for url in (messages, "/api/v1/notifications"):
                response = await http.get(url, params={"type": value})
                assert response.status_code == 200, (url, value, response.text)
                assert response.json()["total"] == 0, (url, value)
        # And nothing was dropped or changed by them.
        assert (await http.get(messages)).json()["total"] == before


# Oversized requests: refused in the envelope, with the status that names the problem -------------


OVERSIZED = {
    "a 20 KiB URL": (414, lambda q: f"/api/v1/queues/{q}/messages?type={'a' * 20_000}", {}, b""),
    "a 40 KiB header": (431, lambda q: "/healthz", {"X-Big": "a" * 40_000}, b""),
    "1,000 small headers": (431, lambda q: "/healthz", {f"X-H{i}": "a" * 40 for i in range(1000)}, b""),
    # Declared, and answered before a byte of it is sent.
    "a body over the cap": (413, lambda q: f"/api/v1/queues/{q}/messages", {}, 300 * 1024),
    "a batch over the cap": (413, lambda q: f"/api/v1/queues/{q}/messages/batch", {}, 9 * 2**20),
    "any body over the ceiling": (413, lambda q: "/api/v1/queues", {}, 9 * 2**20),
}


@pytest.mark.parametrize("case", list(OVERSIZED))
async def test_oversized_requests_are_refused_in_the_envelope(sqlite_server: Server, case: str) -> None:
    status, target, headers, length = OVERSIZED[case]
    method = "POST" if length else "GET"
    answer = await raw_request(sqlite_server, method, target(unique()), {**ADMIN, **headers}, length=length)
    assert answer[0] == status, answer
    assert json.loads(answer[2])["error"]["code"] == "too_large"


async def test_a_deeply_nested_json_body_is_a_4xx(sqlite_server: Server) -> None:
    body = b'{"body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    queue = unique()
    status, _, content = await raw_request(
        sqlite_server,
        "POST",
        f"/api/v1/queues/{queue}/messages",
        {**ADMIN, "Content-Type": "application/json"},
        body,
    )
    assert 400 <= status < 500, content[:300]


# Slow clients: a body or a head sent byte by byte is cut off, and what it held is freed ----------

READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = Server(tmp_path_factory.mktemp("impatient"), {"POMBO_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT)})
    server.start()
    yield server
    server.stop()


class SlowClient:
    """A request whose head goes out at once and whose body then trickles, a byte at a time."""

    def __init__(self, server: Server, target: str, length: int, first: bytes = b"") -> None:
        self.server, self.target, self.length, self.first = server, target, length, first
        self.writer: asyncio.StreamWriter | None = None
        self._trickle: asyncio.Task[None] | None = None

    async def open(self, content_type: str = "application/json") -> asyncio.StreamReader:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        head = (
            f"POST {self.target} HTTP/1.1\r\nHost: pombo.test\r\nAuthorization: {ADMIN['Authorization']}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {self.length}\r\n\r\n"
        )
        self.writer.write(head.encode() + self.first)
        self._trickle = asyncio.create_task(self._send_slowly())
        return reader

    async def _send_slowly(self) -> None:
        assert self.writer is not None
        try:
            for _ in range(self.length - len(self.first)):
                self.writer.write(b" ")
                await self.writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            return  # the server hung up: what the test waits for

    async def close(self) -> None:
        if self._trickle is not None:
            self._trickle.cancel()
        if self.writer is not None:
            self.writer.close()


async def answer_of(reader: asyncio.StreamReader, within: float) -> tuple[int, dict[str, Any], float]:
    """Read until the server closes: its status, its error, and how long that took.

    A server that closes with bytes of ours still unread makes the kernel reset the connection,
    which may drop its answer on our side (nginx lingers to avoid it): status 0 then.
    """
    began = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), within)  # returns at EOF: the server closed
    except ConnectionResetError:
        return 0, {}, time.monotonic() - began
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"], time.monotonic() - began


@pytest.mark.parametrize(
    ("route", "content_type"),
    [("messages", "text/plain"), ("messages", "application/json"), ("messages/batch", "application/json")],
)
async def test_a_body_sent_byte_by_byte_is_cut_with_408_and_nothing_is_stored(
    impatient: Server, route: str, content_type: str
) -> None:
    queue = unique()
    async with impatient.client() as http:
        assert (await http.post("/api/v1/queues", json={"name": queue})).status_code == 201
        slow = SlowClient(impatient, f"/api/v1/queues/{queue}/{route}", 400, b'{"body": "')
        try:
            status, error, took = await answer_of(await slow.open(content_type), 10)
        finally:
            await slow.close()
        assert (status, error["code"]) == (408, "request_timeout"), error
        assert error["details"] == {"timeout": READ_TIMEOUT}
        assert READ_TIMEOUT * 0.9 < took < READ_TIMEOUT + 2  # 400 bytes at 20/s would take 20 s
        assert (await http.get(f"/api/v1/queues/{queue}/messages")).json()["total"] == 0
        # A body that comes at once is not affected.
        assert (await http.post(f"/api/v1/queues/{queue}/messages", content="ok")).status_code == 201


async def test_a_head_sent_byte_by_byte_is_cut_with_408_and_a_silent_connection_is_closed(
    impatient: Server,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    silent, quiet = await asyncio.open_connection("127.0.0.1", impatient.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: pombo.test\r\n")

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in b"X-Slow: " + b"a" * 200:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    sending = asyncio.create_task(trickle())
    try:
        status, error, took = await answer_of(reader, 10)
        assert (status, error["code"]) == (408, "request_timeout")
        assert took < READ_TIMEOUT + 2
        assert await asyncio.wait_for(silent.read(), READ_TIMEOUT + 2) == b""  # closed, nothing said
    finally:
        sending.cancel()
        writer.close()
        quiet.close()


def _fds_and_rss(server: Server) -> tuple[int, int]:
    assert server.process is not None
    pid = server.process.pid
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(line for line in status if line.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), int(rss.split()[1]) * 1024


async def test_many_slow_clients_are_all_cut_and_what_they_held_is_freed(impatient: Server) -> None:
    """40 clients each declare 4 MiB, send 256 KiB at once, then a byte now and then."""
    target = f"/api/v1/queues/{unique()}/messages/batch"
    first = b'{"items": [{"body": "' + b"a" * (256 * 1024)
    rounds, (baseline, _) = [], _fds_and_rss(impatient)
    for _ in range(3):
        clients = [SlowClient(impatient, target, 4 * 2**20, first) for _ in range(40)]
        readers = [await client.open() for client in clients]
        async with impatient.client() as http:  # the server still serves others meanwhile
            assert (await http.get("/healthz")).status_code == 200
        await asyncio.sleep(0.2)
        fds_open, rss_open = _fds_and_rss(impatient)
        answers = await asyncio.gather(*(answer_of(reader, 10) for reader in readers))
        for client in clients:
            await client.close()
        assert {(status, error.get("code")) for status, error, _ in answers} <= {
            (408, "request_timeout"),
            (0, None),
        }
        assert max(took for _, _, took in answers) < READ_TIMEOUT + 3
        await asyncio.sleep(0.5)
        fds_after, rss_after = _fds_and_rss(impatient)
        rounds.append((fds_open, fds_after, rss_open, rss_after))
    for fds_open, fds_after, _, _ in rounds:
        assert fds_open >= baseline + 40  # the 40 sockets were held...
        assert fds_after <= baseline + 2  # ...and are closed again
    # Round after round the process does not grow by what a round sent (10 MiB; measured
    # 104 -> 104-109 MB after rounds 1-3): what each round held was freed.
    sent = 40 * len(first)
    assert rounds[2][3] - rounds[0][3] < sent, rounds


# The README's proxy example is a configuration nginx accepts --------------------------------------


def test_the_readme_tls_proxy_example_is_valid_nginx(tmp_path: Path) -> None:
    need_tool("nginx")
    need_tool("openssl")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Behind a TLS proxy") :]
    example = section[section.index("```nginx\n") + len("```nginx\n") : section.index("```\n")]
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    self_signed = [
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=pombo.example.com",
        "-days",
        "1",
    ]
    made = subprocess.run(
        ["openssl", *self_signed, "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    example = example.replace("/etc/letsencrypt/live/pombo.example.com/fullchain.pem", str(cert))
    example = example.replace("/etc/letsencrypt/live/pombo.example.com/privkey.pem", str(key))
    example = example.replace("/var/log/nginx/pombo.log", str(tmp_path / "access.log"))
    conf, pid = tmp_path / "nginx.conf", tmp_path / "nginx.pid"
    conf.write_text(f"events {{}}\nhttp {{\n{example}\n}}\n")
    files = ["-p", f"{tmp_path}/", "-c", str(conf), "-e", str(tmp_path / "error.log"), "-g", f"pid {pid};"]
    checked = subprocess.run(
        ["nginx", "-t", *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert "proxy_buffering off;" in example and "$request " not in example


def test_a_weak_previous_secret_stops_the_start_in_one_line_without_showing_it() -> None:
    from settings import SettingsError, load_settings

    weak = "old-but-short"
    with pytest.raises(SettingsError) as refused:
        load_settings(environment="test", jwt_secret=SECRET, jwt_previous_secrets=f"{NEW_SECRET} {weak}")
    message = str(refused.value)
    assert "POMBO_JWT_PREVIOUS_SECRETS" in message and "32 bytes" in message
    assert weak not in message and NEW_SECRET not in message and "\n" not in message
    rotated = load_settings(
        environment="test", jwt_secret=SECRET, jwt_previous_secrets=f"{NEW_SECRET},{OTHER_SECRET}"
    )
    assert rotated.previous_secrets == (NEW_SECRET, OTHER_SECRET)
    assert NEW_SECRET not in repr(rotated)
