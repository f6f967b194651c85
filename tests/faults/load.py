"""A load kit that keeps going through faults and records everything it saw.

Every request goes through `Replicas.call`, which records a `Call` (kind, replica, times, status,
`Retry-After`, error code). Publishers retry the same Idempotency-Key on the other replica until a
2xx; subscribers resume with Last-Event-ID (alternating replicas); workers claim and ack; a poller
watches /readyz and /healthz. The checks live in `checks.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
from conftest import ADMIN, CONTROL_EVENTS, Server, unique
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse

RETRY_PAUSE = 0.05  # between a failed attempt and the retry on the other replica


@dataclass(frozen=True)
class Call:
    """One HTTP request and what came of it; `status` None means no response (refused, reset, timeout)."""

    kind: str
    replica: int
    started: float
    ended: float
    status: int | None
    retry_after: str | None = None
    code: str | None = None
    error: str = ""
    checks: dict[str, str] | None = None  # /readyz only
    state: str | None = None  # /readyz only: its "status"

    @property
    def latency(self) -> float:
        return self.ended - self.started

    def __str__(self) -> str:
        answer = self.status if self.status is not None else self.error
        extra = f" Retry-After={self.retry_after}" if self.retry_after else ""
        extra += f" code={self.code}" if self.code else ""
        extra += f" status={self.state} checks={self.checks}" if self.checks is not None else ""
        return f"<{self.kind} on replica {self.replica}: {answer} in {self.latency * 1000:.0f} ms{extra}>"


class Replicas:
    """One HTTP client per server; `call` makes and records a request."""

    def __init__(self, servers: list[Server], timeout: float = 5.0) -> None:
        self.servers = servers
        self.calls: list[Call] = []
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=20)
        self._clients = [
            httpx.AsyncClient(base_url=s.url, headers=ADMIN, timeout=timeout, limits=limits) for s in servers
        ]

    async def __aenter__(self) -> Replicas:
        return self

    async def __aexit__(self, *_: object) -> None:
        for client in self._clients:
            await client.aclose()

    def other(self, replica: int) -> int:
        return (replica + 1) % len(self.servers)

    async def call(
        self, kind: str, replica: int, method: str, path: str, **kwargs: Any
    ) -> httpx.Response | None:
        started = time.monotonic()
        try:
            response = await self._clients[replica].request(method, path, **kwargs)
        except httpx.TransportError as error:
            self.calls.append(
                Call(kind, replica, started, time.monotonic(), None, error=type(error).__name__)
            )
            return None
        body = _json(response)
        code = body.get("error", {}).get("code") if response.status_code >= 400 else None
        checks = body.get("checks") if kind == "readyz" else None
        state = body.get("status") if kind == "readyz" else None
        self.calls.append(
            Call(
                kind,
                replica,
                started,
                time.monotonic(),
                response.status_code,
                response.headers.get("retry-after"),
                code if isinstance(code, str) else None,
                checks=checks if isinstance(checks, dict) else None,
                state=state if isinstance(state, str) else None,
            )
        )
        return response


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class Crew:
    """Background tasks started together; `stop` ends them and re-raises the first real error."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, *coroutines: Coroutine[Any, Any, None]) -> None:
        self.tasks += [asyncio.create_task(c) for c in coroutines]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, asyncio.CancelledError):
                raise result


@dataclass(frozen=True)
class Published:
    key: str
    message_id: str
    status: int
    sent: float  # when the attempt that succeeded was sent
    answered: float
    replica: int


class Publisher:
    """Publishes `{"n", "by"}` bodies, each with a unique key; retries it on the other replica."""

    def __init__(
        self,
        replicas: Replicas,
        queue: str,
        name: str,
        prefer: int = 0,
        interval: float = 0.05,
        give_up_after: float = 30.0,
        pad: int = 0,
    ) -> None:
        self.replicas, self.queue, self.name, self.prefer = replicas, queue, name, prefer
        self.interval, self.give_up_after, self.pad = interval, give_up_after, "x" * pad
        self.published: dict[str, Published] = {}
        self.abandoned: list[str] = []  # keys that never got a 2xx
        self.rejected: list[tuple[str, int, str]] = []  # a 4xx: the harness or the server is wrong
        self.attempted: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            await self.publish(f"{self.name}-{n}", n)
            n += 1
            await asyncio.sleep(self.interval)

    async def publish(self, key: str, n: int) -> Published | None:
        self.attempted.append(key)
        body: dict[str, Any] = {"n": n, "by": self.name}
        if self.pad:
            body["pad"] = self.pad
        replica, deadline = self.prefer, time.monotonic() + self.give_up_after
        path = f"/api/v1/queues/{self.queue}/messages"
        while time.monotonic() < deadline:
            sent = time.monotonic()
            response = await self.replicas.call(
                "publish", replica, "POST", path, json={"body": body}, headers={"Idempotency-Key": key}
            )
            if response is not None and response.is_success:
                done = Published(
                    key, response.json()["id"], response.status_code, sent, time.monotonic(), replica
                )
                self.published[key] = done
                return done
            if response is not None and 400 <= response.status_code < 500 and response.status_code != 429:
                self.rejected.append((key, response.status_code, response.text[:300]))
                return None
            replica = self.replicas.other(replica)
            await asyncio.sleep(RETRY_PAUSE)
        self.abandoned.append(key)
        return None


class Subscriber:
    """An SSE client of one queue's log that resumes with Last-Event-ID on the other replica."""

    def __init__(
        self,
        replicas: Replicas,
        queue: str,
        prefer: int = 0,
        after: int = 0,
        read_timeout: float = 10.0,
        alternate: bool = True,
    ) -> None:
        self.replicas, self.queue, self.replica, self.after = replicas, queue, prefer, after
        self.read_timeout, self.alternate = read_timeout, alternate
        self.last = after
        self.seqs: list[int] = []
        self.arrival: dict[str, float] = {}  # message id -> when its message.created arrived
        self.duplicates_created: list[str] = []
        self.controls: list[tuple[float, str, str]] = []  # stream.reset and the like
        self.connects: list[tuple[float, int, int | None]] = []  # (time, replica, status)
        self.ends: list[tuple[float, int, str]] = []  # (time, replica, why the stream ended)
        self._moved = asyncio.Event()

    async def run(self) -> None:
        while True:
            await self._once(self.replica)
            if self.alternate:
                self.replica = self.replicas.other(self.replica)
            await asyncio.sleep(0.2)

    async def _once(self, replica: int) -> None:
        url = f"{self.replicas.servers[replica].url}/api/v1/queues/{self.queue}/stream"
        headers = {**ADMIN, "Last-Event-ID": str(self.last)}
        timeout = httpx.Timeout(5.0, read=self.read_timeout)
        why, connected = "ended", False
        try:
            async with (
                httpx.AsyncClient(timeout=timeout) as http,
                aconnect_sse(http, "GET", url, headers=headers) as source,
            ):
                status, connected = source.response.status_code, True
                self.connects.append((time.monotonic(), replica, status))
                if status != 200:
                    await source.response.aread()
                    why = f"status {status}"
                    return
                async for event in source.aiter_sse():
                    self._take(event)
        except (httpx.HTTPError, SSEError) as error:
            if not connected:
                self.connects.append((time.monotonic(), replica, None))
            why = type(error).__name__
        finally:
            self.ends.append((time.monotonic(), replica, why))

    def _take(self, event: ServerSentEvent) -> None:
        if not event.data:  # a heartbeat
            return
        if event.event in CONTROL_EVENTS:
            self.controls.append((time.monotonic(), event.event, event.data))
            return
        seq = int(event.id)
        self.seqs.append(seq)
        self.last = max(self.last, seq)
        if event.event == "message.created":
            message_id = json.loads(event.data)["id"]
            if message_id in self.arrival:
                self.duplicates_created.append(message_id)
            else:
                self.arrival[message_id] = time.monotonic()
        self._moved.set()

    async def reach(self, head: int, timeout: float) -> bool:
        """Wait until this subscriber has seen `head`; False if it did not within `timeout`."""
        deadline = time.monotonic() + timeout
        while self.last < head:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), min(remaining, 0.5))
        return True


@dataclass
class Worker:
    """Claims up to `batch` messages, acks them in one request (one by one after a 409)."""

    replicas: Replicas
    queue: str
    prefer: int = 0
    batch: int = 10
    visibility: float = 5.0
    wait: float = 1.0
    claimed: list[tuple[str, str, float]] = field(default_factory=list)  # (id, lease, when)
    acked: list[str] = field(default_factory=list)  # ids whose ack answered 2xx
    refused: list[tuple[str, str | None]] = field(default_factory=list)  # (id, code) of a 409 ack
    unanswered: int = 0  # leases whose ack never got an answer before they expired

    async def run(self, stop: asyncio.Event) -> None:
        replica = self.prefer
        body = {"max": self.batch, "visibility_timeout": self.visibility, "wait": self.wait}
        while not stop.is_set():
            response = await self.replicas.call("claim", replica, "POST", self._path("claim"), json=body)
            if response is None or not response.is_success:
                replica = self.replicas.other(replica)
                await asyncio.sleep(0.1)
                continue
            items = response.json()["items"]
            now = time.monotonic()
            self.claimed += [(item["id"], item["lease_id"], now) for item in items]
            if items:
                await self._ack(replica, items, now + self.visibility)

    def _path(self, tail: str) -> str:
        return f"/api/v1/queues/{self.queue}/{tail}"

    async def _ack(self, replica: int, items: list[dict[str, Any]], expires: float) -> None:
        pairs = [{"id": item["id"], "lease_id": item["lease_id"]} for item in items]
        while time.monotonic() < expires:
            response = await self.replicas.call(
                "ack", replica, "POST", self._path("ack"), json={"items": pairs}
            )
            if response is not None and response.is_success:
                self.acked += [pair["id"] for pair in pairs]
                return
            if response is not None and response.status_code in (404, 409):
                for pair in pairs:
                    await self._ack_one(replica, pair, expires)
                return
            replica = self.replicas.other(replica)
            await asyncio.sleep(RETRY_PAUSE)
        self.unanswered += len(pairs)

    async def _ack_one(self, replica: int, pair: dict[str, str], expires: float) -> None:
        path = self._path(f"messages/{pair['id']}/ack")
        while time.monotonic() < expires:
            response = await self.replicas.call(
                "ack", replica, "POST", path, json={"lease_id": pair["lease_id"]}
            )
            if response is not None and response.is_success:
                self.acked.append(pair["id"])
                return
            if response is not None and response.status_code in (404, 409):
                self.refused.append((pair["id"], _json(response).get("error", {}).get("code")))
                return
            replica = self.replicas.other(replica)
            await asyncio.sleep(RETRY_PAUSE)
        self.unanswered += 1


async def poll_health(replicas: Replicas, interval: float = 0.25) -> None:
    """/readyz and /healthz of every replica, every `interval`, recorded as calls (run as a task)."""
    while True:
        probes = []
        for replica in range(len(replicas.servers)):
            probes.append(replicas.call("readyz", replica, "GET", "/readyz", timeout=2.0))
            probes.append(replicas.call("healthz", replica, "GET", "/healthz", timeout=2.0))
        await asyncio.gather(*probes)
        await asyncio.sleep(interval)


async def queue_counts(replicas: Replicas, queue: str) -> dict[str, int] | None:
    """Message counts by status, from whichever replica answers."""
    for replica in range(len(replicas.servers)):
        response = await replicas.call("read", replica, "GET", f"/api/v1/queues/{queue}")
        if response is not None and response.status_code == 200:
            counts: dict[str, int] = response.json()["messages"]
            return counts
    return None


async def drained(replicas: Replicas, queue: str, timeout: float) -> dict[str, int] | None:
    """Wait until nothing is pending or processing; the last counts seen (None if none answered)."""
    deadline = time.monotonic() + timeout
    counts = None
    while time.monotonic() < deadline:
        counts = await queue_counts(replicas, queue)
        if counts is not None and counts.get("pending", 0) == 0 and counts.get("processing", 0) == 0:
            return counts
        await asyncio.sleep(0.3)
    return counts


async def create_queues(cluster: Replicas, *names: str) -> None:
    for name in names:
        response = await cluster.call("setup", 0, "POST", "/api/v1/queues", json={"name": name})
        assert response is not None and response.status_code == 201, response


async def probe_outage(cluster: Replicas, queue: str, until: float) -> None:
    """During the outage, each replica gets a publish and a read every 0.5 s (kind `probe`)."""
    n = 0
    while time.monotonic() < until - 0.3:
        calls = []
        for replica in range(len(cluster.servers)):
            n += 1
            headers = {"Idempotency-Key": unique("outage")}
            path = f"/api/v1/queues/{queue}/messages"
            calls.append(cluster.call("probe", replica, "POST", path, json={"body": n}, headers=headers))
            calls.append(cluster.call("probe", replica, "GET", "/api/v1/queues"))
        await asyncio.gather(*calls)
        await asyncio.sleep(0.5)
    await asyncio.sleep(max(0.0, until - time.monotonic()))


async def probe_recovery(
    cluster: Replicas, queue: str, started: float, recovery: float
) -> list[float | None]:
    """Seconds from PostgreSQL accepting connections to each replica's first 2xx publish probe."""
    firsts: list[float | None] = [None] * len(cluster.servers)
    while time.monotonic() < started + recovery + 2 and None in firsts:
        for replica, first in enumerate(firsts):
            if first is None:
                path = f"/api/v1/queues/{queue}/messages"
                response = await cluster.call(
                    "recovery", replica, "POST", path, json={"body": 1}, timeout=2.0
                )
                if response is not None and response.is_success:
                    firsts[replica] = time.monotonic() - started
        await asyncio.sleep(0.1)
    return firsts
