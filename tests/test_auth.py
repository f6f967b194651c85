"""Who may do what: tokens, scopes, anonymous access, the token CLI, first start, and log hygiene."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ADMIN, ROOT, SECRET, Server, assert_error, auth, mint, unique
from jose import jwt

ME = "/api/v1/me"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a JWT, read without checking it (what any holder of the token can see)."""
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def admin_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "mallory", "scope": "admin", "iat": now, "exp": now + 3600, "jti": "x" * 32, **extra}


def unsigned_token(claims: dict[str, Any]) -> str:
    """`alg: none`, built by hand: header, claims and an empty signature."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def hs256_without_exp() -> str:
    """A correctly signed token that never expires: Pombo's tokens must."""
    return str(jwt.encode({k: v for k, v in admin_claims().items() if k != "exp"}, SECRET, algorithm="HS256"))


async def create_queue(http: httpx.AsyncClient, name: str | None = None) -> str:
    """Made by the conftest admin, so scoped tokens have something to publish to."""
    name = name or unique()
    response = await http.post("/api/v1/queues", json={"name": name}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return name


async def publish(
    http: httpx.AsyncClient, queue: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await http.post(f"/api/v1/queues/{queue}/messages", json={"body": {"n": 1}}, headers=headers)


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# Bad tokens -----------------------------------------------------------------------------------

BAD_TOKENS = {
    "missing": None,
    "expired": lambda: mint(ttl=-60),
    "forged": lambda: mint(secret="another-secret-" + "y" * 40),
    "alg none": lambda: unsigned_token(admin_claims()),
    "signature stripped": lambda: mint().rsplit(".", 1)[0] + ".",
    "never expires": hs256_without_exp,
    "garbage": lambda: "not-a-jwt",
    "garbage with dots": lambda: "a.b.c",
}


@pytest.mark.parametrize(
    ("kind", "via"),
    [
        (kind, via)
        for kind in BAD_TOKENS
        for via in ("header", "query")
        if kind != "missing" or via == "header"
    ],
)
async def test_a_bad_or_missing_token_is_401_with_the_envelope(
    sqlite_server: Server, kind: str, via: str
) -> None:
    make = BAD_TOKENS[kind]
    token = make() if make else None
    headers = auth(token) if token and via == "header" else {}
    params = {"access_token": token} if token and via == "query" else {}
    async with sqlite_server.client(headers=headers) as http:
        response = await http.get(ME, params=params)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("kind", ["forged", "alg none", "signature stripped", "never expires"])
async def test_a_bad_admin_token_changes_nothing(sqlite_server: Server, kind: str) -> None:
    make = BAD_TOKENS[kind]
    assert make is not None
    token = make()
    name = unique("forged")
    async with sqlite_server.client(headers=auth(token)) as http:
        assert_error(await http.post("/api/v1/queues", json={"name": name}), 401, "unauthorized")
        assert (await http.get(f"/api/v1/queues/{name}", headers=ADMIN)).status_code == 404


async def test_another_action_on_the_same_pattern_grants_nothing(sqlite_server: Server) -> None:
    async with sqlite_server.client(headers={}) as http:
        queue = await create_queue(http)
        reader = auth(mint("reader", f"subscribe:{queue} consume:{queue} manage:{queue}"))
        error = assert_error(await publish(http, queue, reader), 403, "forbidden")
        assert error["details"] == {"needed": f"publish:{queue}"}


# Scopes ---------------------------------------------------------------------------------------


async def test_a_missing_scope_is_403_not_404(sqlite_server: Server) -> None:
    async with sqlite_server.client(headers={}) as http:
        builds = await create_queue(http, unique("builds"))
        other = auth(mint("ci", "publish:other.*"))
        error = assert_error(await publish(http, builds, other), 403, "forbidden")
        assert error["details"] == {"needed": f"publish:{builds}"}
        assert builds in error["message"]
        # Queue names are not secrets: a queue that does not exist is still a scope failure.
        assert_error(await publish(http, unique("nowhere"), other), 403, "forbidden")
        listed = await http.get(f"/api/v1/queues/{builds}/messages", headers=ADMIN)
        assert listed.json()["total"] == 0


async def test_scope_patterns_are_globs_where_star_matches_dots(sqlite_server: Server) -> None:
    family = unique("b")
    async with sqlite_server.client(headers={}) as http:
        nightly = await create_queue(http, f"{family}.nightly")
        deep = await create_queue(http, f"{family}.nightly.arm64")
        bare = await create_queue(http, family)
        elsewhere = await create_queue(http)
        ci = auth(mint("ci", f"publish:{family}.*"))
        assert (await publish(http, nightly, ci)).status_code == 201
        assert (await publish(http, deep, ci)).status_code == 201
        assert_error(await publish(http, bare, ci), 403, "forbidden")  # `x.*` needs the dot
        assert_error(await publish(http, elsewhere, ci), 403, "forbidden")
        everything = auth(mint("ci", "publish:*"))
        assert (await publish(http, deep, everything)).status_code == 201
        assert (await publish(http, elsewhere, everything)).status_code == 201
        # Publishing does not imply reading.
        assert_error(await http.get(f"/api/v1/queues/{nightly}/messages", headers=ci), 403, "forbidden")
        reader = auth(mint("ci", "subscribe:*"))
        listed = await http.get(f"/api/v1/queues/{deep}/messages", headers=reader)
        assert listed.status_code == 200 and listed.json()["total"] == 2


# Where the token comes from, and what /me says ---------------------------------------------------


async def test_token_in_the_header_or_in_access_token(sqlite_server: Server) -> None:
    token = mint("dashboard", "subscribe:*")
    async with sqlite_server.client(headers={}) as http:
        by_header = await http.get(ME, headers=auth(token))
        by_query = await http.get(ME, params={"access_token": token})
    assert by_header.status_code == by_query.status_code == 200
    assert by_header.json() == by_query.json()
    assert by_header.json()["subject"] == "dashboard"


async def test_me_shows_subject_scopes_and_expiry(sqlite_server: Server) -> None:
    token = mint("ci", "subscribe:* publish:builds.* notify", ttl=600)
    async with sqlite_server.client(headers=auth(token)) as http:
        response = await http.get(ME)
    assert response.status_code == 200
    me = response.json()
    assert me["subject"] == "ci"
    assert sorted(me["scopes"]) == ["notify", "publish:builds.*", "subscribe:*"]
    assert me["expires_at"].endswith(("Z", "+00:00"))
    assert parse_time(me["expires_at"]) == datetime.fromtimestamp(claims_of(token)["exp"], UTC)


# Anonymous access --------------------------------------------------------------------------------


async def test_anonymous_scopes_let_a_tokenless_caller_read_but_not_publish(make_server: Any) -> None:
    server = make_server(POMBO_ANONYMOUS_SCOPES="subscribe:*").start()
    async with server.client(headers={}) as anonymous:
        queue = await create_queue(anonymous)
        assert (await publish(anonymous, queue, ADMIN)).status_code == 201

        me = await anonymous.get(ME)
        assert me.status_code == 200
        assert me.json() == {"subject": "anonymous", "scopes": ["subscribe:*"], "expires_at": None}
        listed = await anonymous.get(f"/api/v1/queues/{queue}/messages")
        assert listed.status_code == 200 and listed.json()["total"] == 1
        assert_error(await publish(anonymous, queue), 403, "forbidden")
        # A bad token is refused, never quietly downgraded to anonymous.
        assert_error(await anonymous.get(ME, headers=auth(mint(ttl=-60))), 401, "unauthorized")


async def test_without_anonymous_scopes_a_tokenless_read_is_401(sqlite_server: Server) -> None:
    async with sqlite_server.client(headers={}) as http:
        queue = await create_queue(http)
        assert_error(await http.get(f"/api/v1/queues/{queue}/messages"), 401, "unauthorized")
        assert_error(await publish(http, queue), 401, "unauthorized")


# The token CLI ----------------------------------------------------------------------------------


def token_cli_command(data_dir: Path, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POMBO_")}
    env.update(POMBO_DATA_DIR=str(data_dir), POMBO_JWT_SECRET=SECRET, POMBO_ENVIRONMENT="test")
    return {"args": [sys.executable, str(ROOT / "main.py"), "token", *args], "cwd": data_dir, "env": env}


def token_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(**token_cli_command(data_dir, *args), capture_output=True, text=True, timeout=60)


async def test_cli_prints_one_token_the_server_accepts(sqlite_server: Server) -> None:
    # Minted while the server runs, on its data dir, as an operator would.
    done = token_cli(sqlite_server.data_dir, "--sub", "ci", "--scope", "publish:builds.*", "--ttl", "1h")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n") and done.stdout.count("\n") == 1, done.stdout
    assert done.stderr == ""
    token = done.stdout.strip()

    async with sqlite_server.client(headers=auth(token)) as http:
        me = (await http.get(ME)).json()
        assert me["subject"] == "ci" and me["scopes"] == ["publish:builds.*"]
        lifetime = parse_time(me["expires_at"]) - datetime.now(UTC)
        assert 3500 < lifetime.total_seconds() <= 3600
        nightly = await create_queue(http, unique("builds.nightly"))
        assert (await publish(http, nightly, auth(token))).status_code == 201
        assert_error(await publish(http, await create_queue(http), auth(token)), 403, "forbidden")

    # Recorded, so it can be listed and revoked later.
    with sqlite3.connect(sqlite_server.data_dir / "pombo.sqlite3") as db:
        row = db.execute(
            "SELECT subject, scopes FROM tokens WHERE id = ?", (claims_of(token)["jti"],)
        ).fetchone()
    assert row == ("ci", "publish:builds.*")


BAD_CLI_ARGS = {
    "scope-without-pattern": ["--scope", "publish"],
    "unknown-action": ["--scope", "read:builds"],
    "ttl-unit": ["--ttl", "1y"],
    "ttl-negative": ["--ttl=-5m"],
    "ttl-zero": ["--ttl", "0"],
    "ttl-past-year-9999": ["--ttl", "3000000d"],
    "subject-empty": ["--sub", ""],
    "subject-longer-than-its-column": ["--sub", "s" * 256],
}


@pytest.fixture(scope="module")
def cli_refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """Every bad invocation at once (each one pays a second of imports): case → (status, out, err)."""
    running = {}
    for case, args in BAD_CLI_ARGS.items():
        command = token_cli_command(tmp_path_factory.mktemp(case), "--sub", "ci", *args)
        running[case] = subprocess.Popen(**command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for case, process in running.items():
        out, err = process.communicate(timeout=60)
        results[case] = (process.returncode, out, err)
    return results


@pytest.mark.parametrize(
    "case",
    list(BAD_CLI_ARGS),
)
def test_cli_refuses_a_bad_subject_scope_or_ttl_in_one_line(
    cli_refusals: dict[str, tuple[int, str, str]], case: str
) -> None:
    status, out, err = cli_refusals[case]
    assert status != 0, out
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    value = BAD_CLI_ARGS[case][-1].removeprefix("--ttl=")
    assert repr(value) in lines[0], lines[0]


# First start --------------------------------------------------------------------------------------


async def test_first_start_generates_a_secret_and_a_private_admin_token(make_server: Any) -> None:
    server = make_server(POMBO_JWT_SECRET="").start()
    secret_file, token_file = server.data_dir / "jwt-secret", server.data_dir / "admin-token"
    for path in (secret_file, token_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    secret, token = secret_file.read_text().strip(), token_file.read_text().strip()
    assert len(secret.encode()) >= 32

    log = server.log()
    assert str(token_file) in log
    assert token not in log and token.split(".")[2] not in log
    assert secret not in log

    async with server.client(headers=auth(token)) as http:
        me = (await http.get(ME)).json()
        assert me["subject"] == "admin" and me["scopes"] == ["admin"]
        queue = await http.post("/api/v1/queues", json={"name": unique()})
        assert queue.status_code == 201, queue.text
        # The test suite's secret is not this server's.
        assert_error(await http.get(ME, headers=ADMIN), 401, "unauthorized")

    # A restart keeps the secret and the token: nothing is generated twice.
    server.stop()
    server.start()
    assert secret_file.read_text().strip() == secret
    assert token_file.read_text().strip() == token
    assert server.log().count(str(token_file)) == 1
    async with server.client(headers=auth(token)) as http:
        assert (await http.get(ME)).status_code == 200


# Logs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("json_logs", ["false", "true"])
async def test_tokens_never_reach_the_log(make_server: Any, json_logs: str) -> None:
    server = make_server(POMBO_LOG_JSON=json_logs).start()
    good = mint("leaky", "subscribe:* publish:*")
    forged = mint("leaky", "admin", secret="another-secret-" + "y" * 40)
    async with server.client(headers={}) as http:
        queue = await create_queue(http)
        assert (await http.get(ME, headers=auth(good))).status_code == 200
        assert (await http.get(ME, params={"access_token": good})).status_code == 200
        sent = await http.post(
            f"/api/v1/queues/{queue}/messages", params={"access_token": good}, content="hi"
        )
        assert sent.status_code == 201
        async with http.stream(
            "GET", f"/api/v1/queues/{queue}/stream", params={"access_token": good}
        ) as stream:
            assert stream.status_code == 200
            await anext(stream.aiter_text())
        invalid = await http.get(
            f"/api/v1/queues/{queue}/messages", params={"access_token": good, "limit": "x"}
        )
        assert invalid.status_code == 422
        assert (await http.get(ME, params={"access_token": forged})).status_code == 401
        assert (await http.get(ME, headers=auth(forged))).status_code == 401
    server.stop()  # flush everything the server had to say

    log = server.log()
    assert f"/api/v1/queues/{queue}/stream" in log  # the requests were logged...
    for token in (good, forged):
        assert token not in log  # ...their tokens were not
        assert token.split(".")[2] not in log
        assert token.split(".")[1] not in log
