"""The baseline: the minimal FastAPI + sse-starlette + Redis pub/sub service a user might write instead.

    .venv/bin/python bench/baseline.py --port 8100 --redis redis://127.0.0.1:6379/0

No persistence, no auth, no ordering, no replay: a publish goes to Redis and on to whoever is
listening. It is written as a competent user would write it, not as a straw man: one Redis
subscription per process (a PubSub per stream would hold a Redis connection per browser) with
in-memory fan-out to a bounded queue per stream, sse-starlette and uvicorn with their defaults
(uvloop and httptools, as uvicorn[standard] picks them; one access-log line per request).
It answers the routes the load generator drives except claim and ack: there is nothing to lease.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse

CHANNEL = "pombo-baseline:"
# A subscriber this far behind loses messages rather than growing without bound.
INBOX_SIZE = 1000


class PublishIn(BaseModel):
    body: Any
    type: str = ""


class BatchIn(BaseModel):
    items: list[PublishIn] = Field(min_length=1, max_length=1000)


class QueueIn(BaseModel):
    name: str


class Fanout:
    """One Redis pattern subscription for the process, copied to every local stream of a queue."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.inboxes: dict[str, set[asyncio.Queue[bytes]]] = {}

    def subscribe(self, queue: str) -> asyncio.Queue[bytes]:
        inbox: asyncio.Queue[bytes] = asyncio.Queue(INBOX_SIZE)
        self.inboxes.setdefault(queue, set()).add(inbox)
        return inbox

    def unsubscribe(self, queue: str, inbox: asyncio.Queue[bytes]) -> None:
        self.inboxes.get(queue, set()).discard(inbox)

    async def listen(self) -> None:
        async with self.redis.pubsub() as pubsub:
            await pubsub.psubscribe(CHANNEL + "*")
            async for message in pubsub.listen():
                if message["type"] == "pmessage":
                    self._deliver(message["channel"].decode()[len(CHANNEL) :], message["data"])

    def _deliver(self, queue: str, data: bytes) -> None:
        for inbox in list(self.inboxes.get(queue, ())):
            with contextlib.suppress(asyncio.QueueFull):
                inbox.put_nowait(data)


def create_app(redis_url: str) -> FastAPI:
    redis = aioredis.Redis.from_url(redis_url)
    fanout = Fanout(redis)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        listener = asyncio.create_task(fanout.listen())
        yield
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await redis.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/v1/queues", status_code=201)
    async def create_queue(spec: QueueIn) -> dict[str, str]:
        return {"name": spec.name}

    @app.post("/api/v1/queues/{queue}/messages", status_code=201)
    async def publish(queue: str, item: PublishIn) -> dict[str, Any]:
        message = {"id": uuid.uuid4().hex, "queue": queue, "type": item.type, "body": item.body}
        await redis.publish(CHANNEL + queue, json.dumps(message))
        return message

    @app.post("/api/v1/queues/{queue}/messages/batch", status_code=201)
    async def publish_batch(queue: str, batch: BatchIn) -> dict[str, list[dict[str, Any]]]:
        messages = [
            {"id": uuid.uuid4().hex, "queue": queue, "type": i.type, "body": i.body} for i in batch.items
        ]
        async with redis.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.publish(CHANNEL + queue, json.dumps(message))
            await pipe.execute()
        return {"items": messages}

    @app.get("/api/v1/queues/{queue}/stream")
    async def stream(queue: str) -> EventSourceResponse:
        inbox = fanout.subscribe(queue)  # before the headers go out, so nothing after them is missed

        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                while True:
                    yield {"event": "message.created", "data": (await inbox.get()).decode()}
            finally:
                fanout.unsubscribe(queue, inbox)

        return EventSourceResponse(events())

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per stream
    uvicorn.run(create_app(args.redis), host=args.host, port=args.port, timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
