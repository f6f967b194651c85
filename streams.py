"""Following logs as Server-Sent Events: subscribe, replay from the database, then go live.

The subscription is taken before the response starts, so nothing committed after the client
connected can slip between replay and live. Live updates at or below what was sent are dropped;
a jump in sequence numbers, a broker reconnect or an overflowing buffer is filled from the
database. The stream ends at its lifetime (the client resumes) or when its token expires.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Container, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, cast

from loguru import logger
from starlette.responses import Response
from starlette.types import Receive, Send

from auth import Principal
from availability import unavailable_cause
from broker import DECLINED, SKIPPED, WRITTEN, Broker, Direct, Subscriber
from errors import rate_limited
from event_log import Update, queue_log, queue_of, read_heads
from log_pages import Page
from log_set import QueuePatterns, cursor_text, label_of
from metrics import Metrics
from settings import Settings
from sse import (
    HEARTBEAT,
    SSE_HEADERS,
    StreamResponse,
    control_frame,
    frame,
    joined_chunks,
    labelled_frame,
    more_body,
    page_chunks,
)

REPLAY_PAGE = 500
# How long a client over its stream cap waits before it tries again: long enough that a
# runaway one costs little, short enough that a browser tab whose place came free soon resumes.
BUSY_RETRY_SECONDS = 10


def resume_cursor(header: int | None, query: int | None) -> int | None:
    """`Last-Event-ID` wins over `last_event_id`; neither means live from now."""
    return header if header is not None else query


# A frame outside the logs, sent on connect and after events of one log (e.g. `unread_count`).
SideFrame = Callable[[], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Side:
    log: str
    frame: SideFrame


@dataclass(frozen=True, slots=True)
class Several:
    """What a stream of several logs (`GET /api/v1/stream`) adds to a stream of one.

    Its `id:` is the whole cursor vector and its data names each event's log (`log_set`).
    """

    max_logs: int
    # The cursor the client resumed with (labels to sequences), for logs taken on later.
    resumed: Mapping[str, int] | None = None
    patterns: QueuePatterns | None = None


@dataclass(frozen=True, slots=True)
class StreamSpec:
    # Each log followed, and where it resumes: after that sequence, or (None) live from now.
    cursors: Mapping[str, int | None]
    types: frozenset[str] | None
    lifetime: float
    retry_ms: int
    token_expires_at: datetime | None = None
    subject: str = "anonymous"
    token_id: str | None = None
    heartbeat: float = 15.0
    side: Side | None = None
    several: Several | None = None

    @property
    def kind(self) -> str:
        """What /metrics counts open streams by: one of `metrics.STREAM_KINDS`."""
        if self.several is not None:
            return "multiplexed"
        return "queue" if queue_of(next(iter(self.cursors))) is not None else "notifications"


class StreamGate:
    """Who may hold a stream in this process: so many per subject, and no revoked token.

    The cap keeps one token (a leaked one, a runaway script) from taking every socket; admins,
    who run the benchmarks and the dashboards, have none.
    """

    def __init__(self, revocations: Container[str], per_subject: int, metrics: Metrics | None = None) -> None:
        self._revocations = revocations
        self._per_subject = per_subject
        self.metrics = metrics or Metrics()  # what the streams it admits report to
        self._open: Counter[str] = Counter()

    @property
    def cap(self) -> int:
        return self._per_subject

    def admit(self, principal: Principal) -> bool:
        """Count a new stream for `principal`; False past the cap."""
        subject, cap = principal.subject, self._per_subject
        if cap and not principal.is_admin and self._open[subject] >= cap:
            return False
        self._open[subject] += 1
        return True

    def release(self, subject: str) -> None:
        self._open[subject] -= 1
        if self._open[subject] <= 0:
            del self._open[subject]

    def revoked(self, token_id: str | None) -> bool:
        return token_id in self._revocations


class LogStream:
    """One client's stream of one log or several: a single coroutine that writes each frame as it comes."""

    __slots__ = (
        "_broker",
        "_gate",
        "_held",
        "_last",
        "_send",
        "_side_due",
        "_spec",
        "_subscriber",
        "request_id",
    )
    _send: Send

    def __init__(self, broker: Broker, subscriber: Subscriber, spec: StreamSpec, gate: StreamGate) -> None:
        self._gate = gate
        self._broker = broker
        self._subscriber = subscriber
        self._spec = spec
        # The last sequence sent (or filtered out) of each log followed, in the cursor's order.
        self._last = dict.fromkeys(spec.cursors, 0)
        self._side_due = False
        # A write the broker began for this stream and the client's full buffer held up.
        self._held: tuple[Coroutine[Any, Any, None], Any] | None = None
        self.request_id = "-"

    async def serve(self, receive: Receive, send: Send) -> None:
        """Write the stream to `send` until it ends; however it ends, unsubscribe."""
        subscriber, task, request_id = self._subscriber, asyncio.current_task(), self.request_id
        subscriber.task = task
        self._gate.metrics.stream_opened(self._spec.kind)
        watcher = asyncio.ensure_future(_watch_disconnect(receive, subscriber))
        self._send = send
        try:
            await self._run()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-write
        except asyncio.CancelledError:
            if not subscriber.stalled:
                raise
            if task is not None:
                task.uncancel()  # cut by the watchdog: end here, and the connection closes
            logger.bind(request_id=request_id).warning("cut a stream whose client stopped reading")
        except Exception as error:  # noqa: BLE001 - past the middleware: say it here, then close
            if unavailable_cause(error) is None:
                logger.bind(request_id=request_id).opt(exception=error).error("stream failed")
            else:  # the client resumes once it is back; the outage is logged once, by Availability
                logger.bind(request_id=request_id).debug("stream ended: the database is unavailable")
        finally:
            watcher.cancel()
            subscriber.direct = None
            if self._held is not None:
                self._held[0].close()
            self._broker.unsubscribe(subscriber)
            self._gate.release(self._spec.subject)
            self._gate.metrics.stream_closed(self._spec.kind)

    async def _run(self) -> None:
        spec = self._spec
        await self._write(f"retry: {spec.retry_ms}\n\n".encode())
        await self._start_live([log for log, cursor in spec.cursors.items() if cursor is None])
        # Every log placed before any replays: each frame's cursor must hold for every log.
        heads = {
            log: await self._place(log, cursor) for log, cursor in spec.cursors.items() if cursor is not None
        }
        for log, head in heads.items():
            # Subscribed before the head was read: whatever comes after it arrives live.
            await self._replay(log, upto=head)
        # Queues the patterns match that appeared before the subscription could see them.
        await self._take_matching()
        if spec.side is not None:
            await self._write(await spec.side.frame())
        self._side_due = False
        await self._live()

    async def _start_live(self, logs: list[str]) -> None:
        """Place each log live from now: after its head, read once subscribed, so nothing later is missed."""
        heads = await self._heads(logs)
        # A commit may have landed since subscribing: what was offered since is still news.
        firsts, self._subscriber.firsts = self._subscriber.firsts or {}, None
        for log, head in heads.items():
            first = firsts.get(log)
            self._last[log] = head if first is None else min(head, first - 1)

    async def _heads(self, logs: list[str]) -> dict[str, int]:
        """The broker knows the head of a log it delivers, and most browsers open most streams live."""
        broker = self._broker
        known = {log: broker.known_head(log) for log in logs}
        unknown = [log for log, head in known.items() if head is None]
        read: dict[str, int] = {}
        if len(unknown) == 1:
            read = {unknown[0]: await broker.reads.head(unknown[0])}
        elif unknown:
            read = await broker.reads.shared(("heads", *unknown), partial(read_heads, unknown))
        heads: dict[str, int] = {}
        for log, head in known.items():
            if head is None:
                head = read.get(log, 0)
                broker.learn_head(log, head)
            heads[log] = head
        return heads

    async def _place(self, log: str, cursor: int) -> int:
        """Start the log after `cursor`, or say `stream.reset` if the cursor did not hold; its head."""
        oldest, head = await self._broker.reads.bounds(log)
        if oldest - 1 <= cursor <= head:
            self._last[log] = cursor
            return head
        # Said out loud, never skipped over: the client learns its cursor did not hold.
        self._last[log] = head if cursor > head else oldest - 1
        reason = "cursor_ahead" if cursor > head else "cursor_expired"
        await self._write(control_frame("stream.reset", self._about(log, reason=reason, oldest_seq=oldest)))
        return head

    async def _replay(self, log: str, upto: int | None = None) -> bool:
        """Send the log after its cursor (up to `upto`) from the database; True if anything was sent."""
        sent, reads, last = False, self._broker.reads, self._last
        while upto is None or last[log] < upto:
            # A range that fills a page is read unbounded: one key for every stream resuming
            # here, whatever head each saw. Either way the page cannot change, so all share it.
            bound = upto if upto is not None and upto - last[log] < REPLAY_PAGE else None
            page = await reads.page(log, last[log], REPLAY_PAGE, bound)
            sent = await self._send_page(log, page) or sent
            if len(page.updates) < REPLAY_PAGE:
                break
        return sent

    async def _send_page(self, log: str, page: Page) -> bool:
        """A page in a few large writes, shared with every stream of this one log replaying it."""
        if not page.updates:
            return False
        spec = self._spec
        if spec.types is not None or spec.several is not None:  # frames of this stream's own
            frames = [encoded for update in page.updates if (encoded := self._take(update)) is not None]
            self._gate.metrics.replayed(len(frames))
            for chunk in joined_chunks(frames):
                await self._write(chunk)
            return bool(frames)
        self._last[log] = page.updates[-1].seq
        self._side_due = self._side_due or (spec.side is not None and log == spec.side.log)
        self._gate.metrics.replayed(len(page.updates))
        for chunk in page_chunks(page):
            await self._write(chunk)
        return True

    async def _live(self) -> None:
        subscriber, spec, loop = self._subscriber, self._spec, asyncio.get_running_loop()
        deadline = loop.time() + self._remaining()
        # A stream with side frames sends them after its events; a `send` that is not a coroutine
        # cannot be driven from the broker's call.
        can_write_now = spec.side is None and inspect.iscoroutinefunction(self._send)
        direct = self._write_now if can_write_now else None
        while not subscriber.closed and loop.time() < deadline:
            beat = loop.time() + spec.heartbeat
            subscriber.direct = direct
            await subscriber.wait(min(beat, deadline))
            subscriber.direct = None
            if self._gate.revoked(spec.token_id):  # checked at each wake: within a heartbeat
                await self._write(control_frame("stream.expired", {"reason": "token_revoked"}))
                return
            if self._held is not None:
                await self._finish_held()
            sent = await self._drain()
            if self._side_due and spec.side is not None:
                self._side_due = False
                await self._write(await spec.side.frame())
            elif not sent and loop.time() >= beat:
                await self._write(HEARTBEAT)  # a comment line: keeps proxies from closing an idle stream
        if self._token_expired():
            await self._write(control_frame("stream.expired", {"reason": "token_expired"}))

    async def _drain(self) -> bool:
        subscriber, sent = self._subscriber, False
        await self._take_joined()
        if subscriber.must_catch_up and not subscriber.closed:
            subscriber.must_catch_up = False
            # The broker may have missed anything meanwhile, a queue the patterns match included.
            await self._take_matching()
            for log in list(self._last):
                sent = await self._replay(log) or sent
        if subscriber.closed:
            return sent
        for update in subscriber.take():
            last = self._last.get(update.log)
            if last is None or update.seq <= last:
                continue  # already sent by replay, or a late duplicate
            if update.seq > last + 1:
                sent = await self._replay(update.log, upto=update.seq - 1) or sent
            sent = await self._advance(update) or sent
        return sent

    async def _take_joined(self) -> None:
        """Follow the logs the broker joined this stream to, from the event that made them live."""
        joined = self._subscriber.joined
        while joined and not self._subscriber.closed:
            log, after = joined.pop(0)
            if log not in self._last and await self._admit(log):
                self._last[log] = after

    async def _take_matching(self) -> None:
        """Follow the queues the patterns match now that this stream does not follow yet."""
        several = self._spec.several
        if several is None or several.patterns is None:
            return
        for log in await several.patterns.matching():
            if log in self._last or not await self._admit(log):
                continue
            self._broker.follow(self._subscriber, log)  # before the replay: nothing falls between
            resumed = several.resumed.get(label_of(log)) if several.resumed is not None else None
            if resumed is None:
                self._last[log] = 0  # new since the stream began: all of it is news
                await self._replay(log)
            else:
                await self._replay(log, upto=await self._place(log, resumed))

    async def _admit(self, log: str) -> bool:
        """One more log, within the bound; past it, say so and end (the client asks again, and hears 422)."""
        several = self._spec.several
        if several is not None and len(self._last) < several.max_logs:
            return True
        limit = several.max_logs if several is not None else 1
        await self._write(
            control_frame("stream.limit", self._about(log, reason="too_many_logs", limit=limit))
        )
        self._subscriber.close()
        return False

    def _write_now(self, update: Update) -> Direct:
        """Write the next update from the broker's own call, without waking this stream.

        Uvicorn's `send` completes at once unless the client's buffer is full; then the stream
        is woken to finish that write (`_finish_held`), and the watchdog times it as any other.
        Anything but the very next update of a stream with nothing buffered is declined. The
        broker counts what is written here for /metrics, a slice of streams at a time.
        """
        subscriber, last = self._subscriber, self._last.get(update.log)
        if last is None or update.seq != last + 1 or subscriber.inbox or subscriber.must_catch_up:
            return DECLINED
        if subscriber.joined or self._held:
            return DECLINED
        chunk = self._take(update)
        if chunk is None:
            return SKIPPED
        sending = cast(Coroutine[Any, Any, None], self._send(more_body(chunk)))
        try:
            waiting = sending.send(None)
        except StopIteration:
            return WRITTEN
        except Exception:  # noqa: BLE001 - the client went away: the stream ends when it wakes
            subscriber.close()
            return SKIPPED
        self._held = (sending, waiting)
        subscriber.wake()
        return WRITTEN

    async def _finish_held(self) -> None:
        assert self._held is not None
        sending, waiting = self._held
        subscriber = self._subscriber
        subscriber.sending_since = asyncio.get_running_loop().time()
        try:
            while True:
                # Not `await waiting`: the coroutine already yielded it once, as to a Task.
                await asyncio.wait({waiting})
                try:
                    waiting = sending.send(None)
                except StopIteration:
                    break
        finally:
            self._held = None
            subscriber.sending_since = 0.0

    async def _advance(self, update: Update) -> bool:
        chunk = self._take(update)
        if chunk is None:
            return False
        await self._write(chunk)
        self._gate.metrics.delivered(update, 1)
        return True

    def _take(self, update: Update) -> bytes | None:
        """Move the cursor past `update`; its frame, unless the client filtered its type out."""
        spec = self._spec
        self._last[update.log] = update.seq
        if spec.types is not None and update.type not in spec.types:
            return None
        if spec.side is not None and update.log == spec.side.log:
            self._side_due = True
        if spec.several is None:
            return frame(update)
        return labelled_frame(update, label_of(update.log), cursor_text(self._last))

    def _about(self, log: str, **data: object) -> dict[str, object]:
        """A control frame's data; in a stream of several logs, naming the log."""
        return data if self._spec.several is None else {**data, "log": label_of(log)}

    async def _write(self, chunk: bytes) -> None:
        subscriber = self._subscriber
        subscriber.sending_since = asyncio.get_running_loop().time()
        await self._send(more_body(chunk))
        subscriber.sending_since = 0.0

    def abandon(self) -> None:
        """The response never started: release the subscription it was opened with."""
        self._broker.unsubscribe(self._subscriber)
        self._gate.release(self._spec.subject)

    def _remaining(self) -> float:
        remaining = self._spec.lifetime
        expires = self._spec.token_expires_at
        if expires is not None:
            remaining = min(remaining, expires.timestamp() - time.time())
        return max(remaining, 0.0)

    def _token_expired(self) -> bool:
        expires = self._spec.token_expires_at
        return expires is not None and expires.timestamp() <= time.time() + 0.05


async def _watch_disconnect(receive: Receive, subscriber: Subscriber) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    subscriber.close()


async def live_queue_log(broker: Broker, name: str, live_queue: Callable[[str], Awaitable[object]]) -> str:
    """The queue's log, once the queue is known live: from the broker's memory when it can be.

    The same answer as `live_queue(name)` (`not_found` otherwise), without its database read for
    every stream a crowd of browsers opens on one queue: the crowd shares the first reads.
    """
    log = queue_log(name)
    if not broker.known_live(log):
        mark = broker.live_mark()
        await broker.reads.shared(("live", log), partial(live_queue, name))
        broker.learn_live(log, mark)
    return log


def busy(subject: str, cap: int, accept: str) -> Response:
    """The answer past the stream cap: a 429 with `Retry-After`, or for an event-stream client,
    a 200 stream that says so and ends.

    An EventSource that gets anything but a 200 `text/event-stream` fails for good (WHATWG HTML
    §9.2.3, "fail the connection"): a browser tab would never come back. One that reads a stream
    to its end reconnects after the last `retry:`, with its cursor, so it is told to wait through
    `retry:` and a typed `stream.busy` event (no `id:`: the cursor stays where it was). Every
    EventSource sends `Accept: text/event-stream`; other clients get the 429.
    """
    message = f"{subject!r} already holds {cap} streams here"
    if not wants_event_stream(accept):
        raise rate_limited(message, BUSY_RETRY_SECONDS, limit=cap)
    return busy_stream("too_many_streams", message, cap, BUSY_RETRY_SECONDS)


def wants_event_stream(accept: str) -> bool:
    return "text/event-stream" in accept


def busy_stream(reason: str, message: str, limit: int, retry_after: int) -> Response:
    """A 200 stream of one `stream.busy` event whose `retry:` makes an EventSource come back
    after `retry_after` seconds (see `busy`)."""
    data = {"reason": reason, "message": message, "limit": limit, "retry_after": retry_after}
    body = f"retry: {retry_after * 1000}\n\n".encode() + control_frame("stream.busy", data)
    headers = {name.decode(): value.decode() for name, value in SSE_HEADERS if name != b"content-type"}
    return Response(body, 200, headers, media_type=SSE_HEADERS[2][1].decode())


def open_stream(
    broker: Broker,
    settings: Settings,
    principal: Principal,
    cursors: Mapping[str, int | None],
    types: frozenset[str] | None = None,
    *,
    gate: StreamGate,
    accept: str = "",
    side: Side | None = None,
    several: Several | None = None,
) -> Response:
    """Count the stream against its subject, subscribe before any header is sent, then hand the
    stream to the response. Past the subject's cap, `busy()`."""
    if not gate.admit(principal):
        return busy(principal.subject, gate.cap, accept)
    spec = StreamSpec(
        cursors=cursors,
        types=types,
        lifetime=settings.stream_lifetime_seconds,
        retry_ms=settings.retry_ms,
        token_expires_at=principal.expires_at,
        subject=principal.subject,
        token_id=principal.token_id,
        heartbeat=settings.heartbeat_seconds,
        side=side,
        several=several,
    )
    patterns = several.patterns if several is not None else None
    subscriber = broker.subscribe(cursors, settings.subscriber_buffer, patterns.joins if patterns else None)
    return StreamResponse(LogStream(broker, subscriber, spec, gate))
