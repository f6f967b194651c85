"""Attacks a small team's Pombo on the internet will meet: bad tokens of every kind, revocation
(on an open stream, on a second replica), scopes that must not over-match, hostile path and
filter values on every route, oversized and slow requests. The log of the whole session is
checked for tokens and secrets at its end (tests/conftest.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest
import rsa
from conftest import (
    SECRET,
    Listener,
    Server,
    assert_error,
    auth,
    leaks,
    mint,
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
