"""No request body past the largest a route accepts is read: 413, the envelope, nothing changed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from conftest import Server, assert_error, snapshot

LIMIT = 64 * 1024  # POMBO_MAX_BATCH_BYTES here: the largest body any route takes


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"POMBO_MAX_BATCH_BYTES": str(LIMIT), "POMBO_MAX_BODY_BYTES": str(LIMIT // 2)}
    server = Server(tmp_path_factory.mktemp("capped"), env).start()
    yield server
    server.stop()


async def _chunks(size: int) -> AsyncIterator[bytes]:
    yield b'{"name": "'
    for _ in range(size // 4096):
        yield b"a" * 4096
    yield b'"}'


BODIES: dict[str, Callable[[], bytes | AsyncIterator[bytes]]] = {
    "declared": lambda: b'{"name": "' + b"a" * LIMIT + b'"}',
    "chunked": lambda: _chunks(LIMIT),  # no Content-Length: counted as it is read
}


@pytest.mark.parametrize("sent", list(BODIES))
@pytest.mark.parametrize("token", ["admin", "none"])
async def test_a_body_past_the_cap_is_413_and_changes_nothing(capped: Server, sent: str, token: str) -> None:
    before = await snapshot(capped)
    async with capped.client() as http:
        if token == "none":
            http.headers.pop("Authorization")
        json_type = {"Content-Type": "application/json"}
        response = await http.post("/api/v1/queues", headers=json_type, content=BODIES[sent]())
    if token == "none" and sent == "chunked":
        # No token is refused before a byte of the body is read; a declared length, before that.
        assert_error(response, 401, "unauthorized")
    else:
        error = assert_error(response, 413, "too_large")
        assert error["details"] == {"limit": LIMIT}
    assert "x-request-id" in response.headers
    assert await snapshot(capped) == before


async def test_bodies_within_the_cap_are_served(capped: Server) -> None:
    async with capped.client() as http:
        created = await http.post("/api/v1/queues", json={"name": "within", "description": "d" * 1000})
        assert created.status_code == 201, created.text
        batch = {"items": [{"body": "x" * 100} for _ in range(400)]}  # ~50 KiB: a batch may be large
        published = await http.post("/api/v1/queues/within/messages/batch", json=batch)
        assert published.status_code == 201, published.text
