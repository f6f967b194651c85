"""What the service tells Prometheus about itself: one recorder per app, read at `/metrics`.

The writer, the streams and the request middleware call its methods, one line each; the rest
(backlogs, the broker, the database pool) is sampled when Prometheus scrapes. `Metrics` itself
records nothing (`POMBO_METRICS=false`); `Recorder` keeps the figures.

The hot paths keep plain integers, not prometheus-client's metric objects: a `Histogram.observe`
took 1.5 µs (it takes a lock) against 0.4 µs for all of `Recorder.delivered`, and a stream
delivery is about 14 µs in all (NOTES.md). Everything is touched from the event loop only, so
nothing needs a lock; the library turns the figures into families at scrape time and writes the
exposition format.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import Scope

from event_log import Update

_now = time.time
# Queue names cannot start with "_": the rest of the queues can never be taken for one of them.
OTHER = "_other"
# Open streams, by what they follow: one queue, one person's notifications, or several logs.
STREAM_KINDS = ("queue", "notifications", "multiplexed")
# How often the named queues are chosen again, at a scrape, from what each did meanwhile.
RELABEL_SECONDS = 60.0
# Message events counted, and the word for each on `/metrics`.
TRANSITIONS = {
    "message.created": "published",
    "message.claimed": "claimed",
    "message.acked": "acked",
    "message.retrying": "retried",
    "message.released": "released",
    "message.dead": "dead",
    "message.expired": "expired",
    "message.redriven": "redriven",
    "message.deleted": "deleted",
}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GROUP_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# Any other method a client sends is `other`: a label's values stay few, whatever comes.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """The calls the service makes; this one records nothing."""

    def committed(self, updates: Sequence[Update], operations: int, seconds: float) -> None:
        """A group commit of `operations` that took `seconds` and appended `updates`."""

    def delivered(self, update: Update, frames: int) -> None:
        """`frames` streams wrote `update`'s frame just now (a fan-out counts its whole slice at once)."""

    def replayed(self, events: int) -> None:
        """A stream wrote `events` read back from the database in one page."""

    def stream_opened(self, kind: str) -> None: ...

    def stream_closed(self, kind: str) -> None: ...

    def request(self, scope: Scope, status: int, seconds: float) -> None:
        """An HTTP request answered `status` after `seconds` (a stream: when it started)."""


NO_METRICS = Metrics()


class Tally:
    """A histogram's buckets as plain counts: `observe` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # `le` is inclusive, as bisect_left is
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        return cumulative


class QueueLabels:
    """Which queues `/metrics` names: at most `limit`, the busiest; the others are `_other`.

    A queue takes a free place when it first does something. Every RELABEL_SECONDS the places go
    to the busiest queues of that while, a named one counting double so that two queues of about
    the same traffic do not swap places at every turn; a queue that loses its place stops being
    reported (its series ends) and what it does next is counted under `_other`. So the number of
    series stays bounded and no counter ever goes down.
    """

    def __init__(self, limit: int, every: float = RELABEL_SECONDS) -> None:
        self._limit = limit
        self._every = every
        self.named: set[str] = set()
        self._recent: Counter[str] = Counter()
        self._chosen_at = time.monotonic()

    def of(self, queue: str, weight: int = 1) -> str:
        self._recent[queue] += weight
        if queue in self.named:
            return queue
        if len(self.named) < self._limit:
            self.named.add(queue)
            return queue
        return OTHER

    def label(self, queue: str) -> str:
        """The label of a queue, without counting anything for it."""
        return queue if queue in self.named else OTHER

    def choose(self) -> set[str]:
        """Give the places to the busiest of the last while; returns the queues that lost one."""
        if time.monotonic() - self._chosen_at < self._every:
            return set()
        self._chosen_at = time.monotonic()
        named, recent = self.named, self._recent

        def rank(queue: str) -> tuple[int, bool, str]:
            return -recent[queue] * (2 if queue in named else 1), queue not in named, queue

        ranked = sorted({*recent, *named}, key=rank)
        chosen = {q for q in ranked[: self._limit] if q in named or recent[q] > 0}
        lost, self.named = named - chosen, chosen
        recent.clear()
        return lost


@dataclass
class Sample:
    """What is read when Prometheus scrapes, rather than counted as it happens."""

    ready: bool = True
    broker_connected: bool = True
    broker_reconnects: int = 0
    broker_publish_failures: int = 0
    outbox: int = 0
    catch_ups: int = 0
    pool_size: int = 0
    pool_in_use: int = 0
    # By queue name: message counts by status, and how long the oldest available pending one waited.
    backlog: dict[str, dict[str, int]] | None = None
    oldest_pending: dict[str, float] = field(default_factory=dict)


class Recorder(Metrics):
    """The figures, and the registry that writes them (one per app: two apps never collide)."""

    def __init__(self, named_queues: int, relabel_every: float = RELABEL_SECONDS) -> None:
        self.queues = QueueLabels(named_queues, relabel_every)
        self.messages: Counter[tuple[str, str]] = Counter()  # (queue label, transition)
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (route, method, status)
        self.durations: dict[tuple[str, str], Tally] = {}  # (route, method)
        self.streams: Counter[str] = Counter()
        self.delivery_lag = Tally(LATENCY_BUCKETS)
        self.replays = 0
        self.group_sizes = Tally(GROUP_BUCKETS)
        self.commit_seconds = Tally(LATENCY_BUCKETS)
        self.sample = Sample()
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.registry.register(_Families(self))

    def committed(self, updates: Sequence[Update], operations: int, seconds: float) -> None:
        self.group_sizes.observe(operations)
        self.commit_seconds.observe(seconds)
        now = time.time()
        for update in updates:
            update.committed_at = now
        counted = Counter((u.log, u.type) for u in updates if u.type in TRANSITIONS)
        for (log, type_), count in counted.items():
            self.messages[self.queues.of(log.removeprefix("queue:"), count), TRANSITIONS[type_]] += count

    def delivered(self, update: Update, frames: int) -> None:
        committed = update.committed_at
        if committed is None:  # read back from the database: a replay, not a delivery
            self.replays += frames
            return
        lag, tally = _now() - committed, self.delivery_lag
        tally.counts[bisect_left(tally.bounds, lag)] += frames  # a clock stepped back counts as 0
        tally.total += frames * lag if lag > 0 else 0.0

    def replayed(self, events: int) -> None:
        self.replays += events

    def stream_opened(self, kind: str) -> None:
        self.streams[kind] += 1

    def stream_closed(self, kind: str) -> None:
        self.streams[kind] -= 1

    def request(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"  # a 404 names no route: one label
        method = scope["method"] if scope["method"] in METHODS else "other"
        self.requests[template, method, str(status)] += 1
        tally = self.durations.get((template, method))
        if tally is None:
            tally = self.durations[template, method] = Tally(LATENCY_BUCKETS)
        tally.observe(seconds)

    def render(self, sample: Sample) -> bytes:
        """The exposition text, with `sample` for what is read at scrape time."""
        for queue in self.queues.choose():
            for key in [key for key in self.messages if key[0] == queue]:
                del self.messages[key]
        self.sample = sample
        return generate_latest(self.registry)


class _Families(Collector):
    """The recorder's figures as metric families, built when the registry is read."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def collect(self) -> Iterator[Metric]:
        yield from self._http()
        yield from self._messages()
        yield from self._streams()
        yield from self._writer()
        yield from self._sampled()
        yield from self._queues()

    def _http(self) -> Iterator[Metric]:
        r = self._recorder
        requests = CounterMetricFamily(
            "pombo_http_requests", "HTTP requests answered", labels=["route", "method", "status"]
        )
        for labels, count in sorted(r.requests.items()):
            requests.add_metric(list(labels), count)
        yield requests
        durations = HistogramMetricFamily(
            "pombo_http_request_duration_seconds",
            "Time to answer (a stream: to its first byte)",
            labels=["route", "method"],
        )
        for route, tally in sorted(r.durations.items()):
            durations.add_metric(list(route), tally.buckets(), tally.total)
        yield durations

    def _messages(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "pombo_messages",
            "Message transitions committed by this replica, by queue (_other: the rest)",
            labels=["queue", "transition"],
        )
        for (queue, transition), count in sorted(self._recorder.messages.items()):
            family.add_metric([queue, transition], count)
        yield family

    def _streams(self) -> Iterator[Metric]:
        r = self._recorder
        open_ = GaugeMetricFamily("pombo_streams_open", "SSE streams open, by kind", labels=["kind"])
        for kind in STREAM_KINDS:
            open_.add_metric([kind], r.streams[kind])
        yield open_
        delivered = CounterMetricFamily(
            "pombo_events_delivered", "Event frames written to streams", labels=["path"]
        )
        delivered.add_metric(["live"], sum(r.delivery_lag.counts))
        delivered.add_metric(["replay"], r.replays)
        yield delivered
        yield _histogram(
            "pombo_delivery_lag_seconds", "From commit to the write to a stream's socket", r.delivery_lag
        )

    def _writer(self) -> Iterator[Metric]:
        r = self._recorder
        yield _histogram("pombo_writer_group_size", "Operations per group commit", r.group_sizes)
        yield _histogram("pombo_writer_commit_seconds", "Duration of a group commit", r.commit_seconds)

    def _sampled(self) -> Iterator[Metric]:
        s = self._recorder.sample
        yield GaugeMetricFamily("pombo_ready", "1 when this replica can commit now", value=int(s.ready))
        yield GaugeMetricFamily(
            "pombo_broker_connected",
            "1 while the broker (Redis) subscription is up",
            value=int(s.broker_connected),
        )
        yield CounterMetricFamily(
            "pombo_broker_reconnects", "Broker subscriptions regained after a loss", value=s.broker_reconnects
        )
        yield CounterMetricFamily(
            "pombo_broker_publish_failures", "Batches Redis did not take", value=s.broker_publish_failures
        )
        yield GaugeMetricFamily("pombo_broker_outbox", "Batches waiting to go to Redis", value=s.outbox)
        yield GaugeMetricFamily(
            "pombo_catch_ups_running", "Log reads for streams in progress or queued", value=s.catch_ups
        )
        yield GaugeMetricFamily("pombo_database_connections", "Connections in the pool", value=s.pool_size)
        yield GaugeMetricFamily(
            "pombo_database_connections_in_use", "Pool connections taken", value=s.pool_in_use
        )

    def _queues(self) -> Iterator[Metric]:
        s, labels = self._recorder.sample, self._recorder.queues
        backlog = GaugeMetricFamily(
            "pombo_queue_messages", "Messages stored, by queue and status", labels=["queue", "status"]
        )
        oldest = GaugeMetricFamily(
            "pombo_queue_oldest_pending_seconds",
            "How long the oldest claimable pending message has waited",
            labels=["queue"],
        )
        counts: Counter[tuple[str, str]] = Counter()
        for queue, by_status in (s.backlog or {}).items():
            for status, count in by_status.items():
                counts[labels.label(queue), status] += count
        for key, count in sorted(counts.items()):
            backlog.add_metric(list(key), count)
        ages: dict[str, float] = {}
        for queue, age in s.oldest_pending.items():
            ages[labels.label(queue)] = max(age, ages.get(labels.label(queue), 0.0))
        for queue, age in sorted(ages.items()):
            oldest.add_metric([queue], age)
        yield backlog
        yield oldest


def _histogram(name: str, documentation: str, tally: Tally) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, buckets=tally.buckets(), sum_value=tally.total)
