"""A small HTTP client for Pombo, used by the `publish`, `subscribe` and `work` commands."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse
from pydantic_core import to_json

from schemas import JSON, shell_text

RECONNECT_SECONDS = 1.0


class PomboError(Exception):
    """An error answer from the server, or no answer at all."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({status} {code})" if status else message)
        self.status = status
        self.code = code


class PomboClient:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    async def __aenter__(self) -> PomboClient:
        return self

    async def __aexit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self._http.aclose()

    async def publish(self, queue: str, body: str, headers: dict[str, str]) -> dict[str, Any]:
        """Publish `body` as text; `headers` may carry X-Type, X-Priority, X-Delay, Idempotency-Key."""
        text = {"Content-Type": "text/plain; charset=utf-8", **headers}
        return await self._call(
            "POST", f"/api/v1/queues/{queue}/messages", content=body.encode(), headers=text
        )

    async def publish_json(
        self, queue: str, envelope: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any]:
        """Publish the JSON envelope `{"body": …, "type"?, "priority"?, "delay"?}`."""
        return await self._call("POST", f"/api/v1/queues/{queue}/messages", json=envelope, headers=headers)

    async def claim(
        self, queue: str, wait: float, visibility_timeout: float | None, most: int = 1
    ) -> list[dict[str, Any]]:
        """Up to `most` messages, all under one lease; waits up to `wait` seconds for the first."""
        body = {"max": most, "wait": wait, "visibility_timeout": visibility_timeout}
        answer = await self._call("POST", f"/api/v1/queues/{queue}/claim", json=body, timeout=wait + 30)
        items: list[dict[str, Any]] = answer["items"]
        return items

    async def ack(self, queue: str, message_id: str, lease_id: str) -> None:
        await self._call(
            "POST", f"/api/v1/queues/{queue}/messages/{message_id}/ack", json={"lease_id": lease_id}
        )

    async def ack_many(self, queue: str, messages: list[dict[str, Any]]) -> None:
        """Ack them all in one request: all of them, or none when one lease no longer holds."""
        items = [{"id": message["id"], "lease_id": message["lease_id"]} for message in messages]
        await self._call("POST", f"/api/v1/queues/{queue}/ack", json={"items": items})

    async def nack(
        self, queue: str, message_id: str, lease_id: str, error: str, delay: float | None = None
    ) -> None:
        body = {"lease_id": lease_id, "error": error, "delay": delay}
        await self._call("POST", f"/api/v1/queues/{queue}/messages/{message_id}/nack", json=body)

    async def extend(
        self, queue: str, message_id: str, lease_id: str, visibility_timeout: float | None
    ) -> None:
        body = {"lease_id": lease_id, "visibility_timeout": visibility_timeout}
        await self._call("POST", f"/api/v1/queues/{queue}/messages/{message_id}/extend", json=body)

    async def events(self, queue: str, cursor: str | None) -> AsyncIterator[ServerSentEvent]:
        """The queue's events from after `cursor`, reconnecting and resuming for as long as asked."""
        while True:
            headers = {"Last-Event-ID": cursor} if cursor is not None else {}
            try:
                async for event in self._stream(queue, headers):
                    cursor = event.id or cursor
                    yield event
            except PomboError as error:
                if error.status in (401, 403, 404):
                    raise
            except httpx.TransportError:
                pass  # the server went away or restarted: resume from the cursor
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _stream(self, queue: str, headers: dict[str, str]) -> AsyncIterator[ServerSentEvent]:
        url = f"/api/v1/queues/{queue}/stream"
        async with aconnect_sse(
            self._http, "GET", url, headers=headers, timeout=httpx.Timeout(30, read=None)
        ) as source:
            if source.response.status_code != 200:
                await source.response.aread()
                raise _error(source.response)
            async for event in source.aiter_sse():
                if event.data:  # heartbeats carry no data
                    yield event

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise PomboError(0, "unreachable", f"cannot reach {self._http.base_url}: {error}") from None
        if response.status_code >= 400:
            raise _error(response)
        answer: dict[str, Any] = response.json()
        return answer


def _error(response: httpx.Response) -> PomboError:
    try:
        error = response.json()["error"]
        return PomboError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return PomboError(response.status_code, "http_error", response.text[:200])


def body_text(message: dict[str, Any]) -> str:
    """A claimed message's body as a command's stdin takes it (`schemas.shell_text`)."""
    body, content_type = message["body"], message["content_type"]
    # Encoded back as the server stored it: compact, UTF-8 (pydantic's encoder, as Draft uses).
    stored = to_json(body).decode() if content_type == JSON else str(body)
    return shell_text(stored, content_type)
