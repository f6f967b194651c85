"""Route plumbing: a direct route takes path parameters and the Request, and nothing else."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from deps import QueueName, direct
from models import QUEUE_NAME_PATTERN


def test_a_direct_route_refuses_an_endpoint_that_needs_dependency_solving() -> None:
    router = APIRouter()

    async def endpoint(request: Request, queue: QueueName, limit: int = 10) -> Response:
        return Response(f"{queue} {limit}")

    with pytest.raises(TypeError, match="path parameters and the Request only"):
        direct(router, "GET", "/{queue}")(endpoint)


def test_a_direct_route_is_documented_like_any_other() -> None:
    router = APIRouter()

    @direct(router, "GET", "/{queue}", summary="one queue")
    async def endpoint(request: Request, queue: QueueName) -> Response:
        return Response(queue)

    app = FastAPI()
    app.include_router(router)
    operation = app.openapi()["paths"]["/{queue}"]["get"]
    assert operation["summary"] == "one queue"
    [parameter] = operation["parameters"]
    assert (parameter["name"], parameter["in"]) == ("queue", "path")
    assert parameter["schema"]["pattern"] == QUEUE_NAME_PATTERN
