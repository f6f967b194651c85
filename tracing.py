"""Traces: W3C Trace Context on every request, and OpenTelemetry spans when they are switched on.

A request's `traceparent` header (https://www.w3.org/TR/trace-context/) continues its trace; one
that is missing or invalid starts a new trace, never an error. Each request is a span of its own
in that trace, and its span id is the parent-id it hands on: stored with a message it publishes,
given to the worker that claims it, who continues from there (worker.py).

OpenTelemetry is optional (requirements-otel.txt): with `OTEL_EXPORTER_OTLP_ENDPOINT` set and the
SDK installed, requests, commits and claims become spans exported over OTLP; without, ids are made
here and nothing else changes.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from loguru import logger

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer

_HEX = frozenset("0123456789abcdef")  # lowercase only: the spec's HEXDIGLC
_LENGTH = 55  # version 00: 2 + 1 + 32 + 1 + 16 + 1 + 2
# Level 1 defines only `sampled`; other flags are reserved, and set to zero when handed on.
_SAMPLED = 0x01


class TraceParent(NamedTuple):  # a tuple: made on every request, at a quarter of a dataclass's cost
    """A `traceparent`: the trace, the span that is the parent of what comes next, its flags."""

    trace_id: str  # 32 lowercase hex digits, not all zero
    parent_id: str  # 16 lowercase hex digits, not all zero
    flags: str  # 2 hex digits

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"

    def child(self) -> TraceParent:
        """A new span in this trace, under this one."""
        return TraceParent(self.trace_id, new_span_id(), self.flags)


_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def parse(value: str) -> TraceParent | None:
    """The header's trace, or None when it is not a valid `traceparent` (W3C Trace Context §3.2).

    A version above 00 is read as 00 is, past its fields may come more of its own after a dash;
    version ff is invalid; ids of zeros are invalid.
    """
    value = value.strip(" \t")
    match = _VERSION_00.fullmatch(value)  # what nearly every caller sends, at a third of the cost
    if match is not None:
        trace_id, parent_id, flags = match.groups()
        return _valid(trace_id, parent_id, flags)
    version = value[:2]
    if len(value) < _LENGTH or not _is_hex(version) or version == "ff":
        return None
    if (version == "00" and len(value) != _LENGTH) or (len(value) > _LENGTH and value[_LENGTH] != "-"):
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_is_hex(trace_id) and _is_hex(parent_id) and _is_hex(flags)):
        return None
    return _valid(trace_id, parent_id, flags)


def _valid(trace_id: str, parent_id: str, flags: str) -> TraceParent | None:
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return TraceParent(trace_id, parent_id, "01" if int(flags, 16) & _SAMPLED else "00")


def from_headers(headers: Iterable[tuple[bytes, bytes]]) -> TraceParent | None:
    """The request's trace; a repeated `traceparent` is as invalid as a malformed one."""
    given = [value for name, value in headers if name == b"traceparent"]
    return parse(given[0].decode("latin-1")) if len(given) == 1 else None


def _is_hex(text: str) -> bool:
    return _HEX.issuperset(text)


def new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"  # unique, not secret (as request ids)


def new_trace() -> TraceParent:
    # Sampled: the trace id goes into the log lines, which is a record of it.
    return TraceParent(f"{random.getrandbits(128) or 1:032x}", new_span_id(), "01")


@dataclass
class RequestTrace:
    """The trace of the request being served: its own span, and what it claimed."""

    own: TraceParent
    linked: list[str] = field(default_factory=list)  # trace ids of the messages it claimed
    tracer: Tracer | None = None
    server_span: Span | None = None

    def answered(self, method: str, route: str | None, status: int) -> None:
        """Name the server span by its route and give it the status (a 5xx is an error)."""
        if self.server_span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        if route is not None:
            self.server_span.update_name(f"{method} {route}")
            self.server_span.set_attribute("http.route", route)
        self.server_span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.server_span.set_status(Status(StatusCode.ERROR))


_current: ContextVar[RequestTrace | None] = ContextVar("pombo_trace", default=None)
_NO_SPAN = contextlib.nullcontext()


def current() -> str | None:
    """The `traceparent` of the request being served (its own span as the parent), if any."""
    trace = _current.get()
    return None if trace is None else str(trace.own)


def span(name: str, **attributes: str | int) -> contextlib.AbstractContextManager[Any]:
    """A span inside the current request's, when OpenTelemetry is on; else nothing (and cheap)."""
    trace = _current.get()
    if trace is None or trace.tracer is None:
        return _NO_SPAN
    return trace.tracer.start_as_current_span(name, attributes=attributes)


def link(traceparents: Iterable[str | None]) -> None:
    """The request handed out messages stored with these traceparents (ours, so version 00): its
    access line names their traces, its span links to them (OpenTelemetry's way for one consumer
    span of many producers)."""
    trace = _current.get()
    if trace is None:
        return
    stored = [t for t in traceparents if t]
    trace.linked += dict.fromkeys(t[3:35] for t in stored)
    if trace.tracer is not None:
        from opentelemetry import trace as otel

        active = otel.get_current_span()
        for parent in filter(None, map(parse, stored)):
            active.add_link(_span_context(parent))


class Tracing:
    """One app's tracing: W3C ids always; OpenTelemetry spans once started, when switched on.

    `exporter` is where spans go: OTLP over HTTP (configured by the OTEL_EXPORTER_OTLP_*
    variables, which the SDK reads) unless another is set before `start`.
    """

    def __init__(self, enabled: bool, service_name: str = "pombo") -> None:
        self.enabled = enabled
        self.service_name = service_name
        self.exporter: SpanExporter | None = None
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None

    @contextlib.contextmanager
    def started(self) -> Iterator[None]:
        """Spans are exported meanwhile; the last ones when it ends."""
        self.start()
        try:
            yield
        finally:
            self.close()

    def start(self) -> None:
        if not self.enabled:
            return
        try:
            self._provider = self._provider_with(self.exporter)
        except ImportError as error:
            logger.warning(
                "tracing is off: OTEL_EXPORTER_OTLP_ENDPOINT is set, but the OpenTelemetry SDK is "
                "not installed (no {}; pip install -r requirements-otel.txt)",
                error.name,
            )
            return
        self._tracer = self._provider.get_tracer("pombo")
        logger.info("tracing: spans are exported over OTLP")

    def _provider_with(self, exporter: SpanExporter | None) -> TracerProvider:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        # Our own provider, not the process-global one: an app is what owns it (and tests make many).
        provider = TracerProvider(resource=Resource.create({"service.name": self.service_name}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return provider

    def flush(self) -> None:
        if self._provider is not None:
            self._provider.force_flush()

    def close(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = self._tracer = None

    @contextlib.contextmanager
    def request(self, method: str, path: str, incoming: TraceParent | None) -> Iterator[RequestTrace]:
        """The request's trace for as long as it is served, with a server span when tracing is on."""
        if self._tracer is None:
            trace = RequestTrace(incoming.child() if incoming else new_trace())
            token = _current.set(trace)
            try:
                yield trace
            finally:
                _current.reset(token)
            return
        from opentelemetry import trace as otel
        from opentelemetry.trace import NonRecordingSpan, SpanKind

        parent = otel.set_span_in_context(NonRecordingSpan(_span_context(incoming))) if incoming else None
        attributes = {"http.request.method": method, "url.path": path}
        with self._tracer.start_as_current_span(
            method, context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as server_span:
            own = _trace_parent(server_span)
            with _serving(RequestTrace(own, tracer=self._tracer, server_span=server_span)) as trace:
                yield trace


@contextlib.contextmanager
def _serving(trace: RequestTrace) -> Iterator[RequestTrace]:
    token = _current.set(trace)
    try:
        yield trace
    finally:
        _current.reset(token)


def _span_context(parent: TraceParent) -> SpanContext:
    from opentelemetry.trace import SpanContext, TraceFlags

    flags = TraceFlags(int(parent.flags, 16))
    return SpanContext(int(parent.trace_id, 16), int(parent.parent_id, 16), is_remote=True, trace_flags=flags)


def _trace_parent(active: Span) -> TraceParent:
    context = active.get_span_context()
    flags = int(context.trace_flags) & _SAMPLED
    return TraceParent(f"{context.trace_id:032x}", f"{context.span_id:016x}", f"{flags:02x}")
