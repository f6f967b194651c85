"""The error envelope for failures nobody planned: a 500 says `internal_error` and nothing more."""

from __future__ import annotations

import httpx

from errors import ApiError
from main import create_app
from settings import load_settings


async def test_an_unexpected_error_is_a_plain_500_envelope() -> None:
    app = create_app(load_settings(environment="test", jwt_secret="s" * 32))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://pombo") as http:
        response = await http.get("/boom", headers={"X-Request-ID": "trace-me"})
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal error", "details": {}}
    }
    assert "hunter2" not in response.text
    assert response.headers["X-Request-ID"] == "trace-me"


async def test_unknown_routes_and_methods_use_the_envelope() -> None:
    app = create_app(load_settings(environment="test", jwt_secret="s" * 32))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pombo") as http:
        missing = await http.get("/nowhere")
        wrong = await http.put("/healthz")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_api_errors_carry_status_code_and_details() -> None:
    error = ApiError(409, "queue_exists", "queue 'a' already exists", {"queue": "a"})
    assert (error.status, error.code, error.details) == (409, "queue_exists", {"queue": "a"})
