"""Traces: one W3C trace from a publish to the worker that runs the message, in every log line."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, SECRET, Server, need_tool, sql, unique
from test_worker import create_queue, pombo, script, wait_done

import tracing
from tracing import TraceParent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SENT = f"00-{TRACE}-00f067aa0ba902b7-01"
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$")


# The header, as W3C Trace Context §3.2 reads it ---------------------------------------------------


def test_a_valid_traceparent_is_read() -> None:
    assert tracing.parse(SENT) == TraceParent(TRACE, "00f067aa0ba902b7", "01")
    assert tracing.parse(f" {SENT}\t") == TraceParent(TRACE, "00f067aa0ba902b7", "01")  # OWS
    # Flags other than `sampled` are reserved: read, and set to zero when handed on.
    assert tracing.parse(f"00-{TRACE}-00f067aa0ba902b7-ff") == TraceParent(TRACE, "00f067aa0ba902b7", "01")
    # A later version may add fields after a dash; its first four are read as version 00's.
    later = tracing.parse(f"cc-{TRACE}-00f067aa0ba902b7-00-what-comes-next")
    assert later == TraceParent(TRACE, "00f067aa0ba902b7", "00")
    assert str(later) == f"00-{TRACE}-00f067aa0ba902b7-00"  # handed on as the version we know


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        f"00-{TRACE.upper()}-00f067aa0ba902b7-01",  # lowercase only
        f"00-{TRACE}-00F067AA0BA902B7-01",
        f"00-{TRACE}-00f067aa0ba902b7-0x",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # an all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # an all-zero parent id
        f"ff-{TRACE}-00f067aa0ba902b7-01",  # version ff is invalid
        f"0g-{TRACE}-00f067aa0ba902b7-01",
        f"00-{TRACE}-00f067aa0ba902b7-01-extra",  # version 00 has exactly four fields
        f"cc-{TRACE}-00f067aa0ba902b7-01.extra",  # after the flags: the end, or a dash
        f"00_{TRACE}_00f067aa0ba902b7_01",
        f"00-{TRACE[:-1]}-00f067aa0ba902b7-01x",
    ],
)
def test_an_invalid_traceparent_is_none(value: str) -> None:
    assert tracing.parse(value) is None


def test_a_repeated_traceparent_header_counts_as_invalid() -> None:
    one = [(b"traceparent", SENT.encode())]
    assert tracing.from_headers(one) == tracing.parse(SENT)
    assert tracing.from_headers(one * 2) is None


def test_a_child_is_a_new_span_of_the_same_trace() -> None:
    parent = TraceParent(TRACE, "00f067aa0ba902b7", "01")
    children = {parent.child() for _ in range(100)}
    assert {c.trace_id for c in children} == {TRACE} and len(children) == 100
    assert all(TRACEPARENT.match(str(c)) and c.parent_id != parent.parent_id for c in children)
    assert TRACEPARENT.match(str(tracing.new_trace()))


# From the publisher to the worker, on a real server --------------------------------------------------


async def logged(server: Server, *needles: str, timeout: float = 5) -> str:
    """The first line of the server's log holding every needle (access lines are batched)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.log().splitlines() if all(n in line for n in needles)]
        if lines:
            return lines[0]
        assert time.monotonic() < deadline, f"no line with {needles}:\n{server.log()[-3000:]}"
        await asyncio.sleep(0.05)


async def stored_traceparent(server: Server, message_id: str) -> str:
    [(value,)] = await sql(server, "SELECT traceparent FROM messages WHERE id = ?", message_id)
    return str(value)


async def publish_traced(
    server: Server, client: httpx.AsyncClient, queue: str, traceparent: str
) -> tuple[str, str]:
    """Publish with this `traceparent` header: the request's id and the traceparent stored."""
    request_id = unique("publish")
    headers = {"traceparent": traceparent, "X-Request-ID": request_id}
    published = await client.post(f"/api/v1/queues/{queue}/messages", content=b"job", headers=headers)
    assert published.status_code == 201, published.text
    return request_id, await stored_traceparent(server, published.json()["id"])


async def test_one_trace_goes_from_a_publish_to_the_worker_command_and_both_requests_logs(
    server: Server, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Must show 4: the traceparent of a publish reaches a real `main.py work` command's
    environment, and the trace id is in the log lines of the publish and of the claim."""
    queue = await create_queue(client)
    request_id, stored = await publish_traced(server, client, queue, SENT)
    out = tmp_path / "traceparent"
    worker = pombo(
        server, "work", queue, "--", script(tmp_path, "t.sh", f'echo "$POMBO_TRACEPARENT" > {out}\n')
    )
    try:
        await wait_done(client, queue, 1)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0

    run = tracing.parse(out.read_text().strip())
    assert run is not None and run.trace_id == TRACE
    # The server's span of the publish is under the publisher's; the run's is under the server's.
    assert stored.startswith(f"00-{TRACE}-") and tracing.parse(stored) is not None
    assert len({SENT, stored, str(run)}) == 3
    publish_line = await logged(
        server, f"| {request_id} | {TRACE} | POST /api/v1/queues/{queue}/messages 201"
    )
    claim_line = await logged(server, f"POST /api/v1/queues/{queue}/claim 200", f"traces {TRACE}")
    assert publish_line and claim_line


async def test_the_claim_hands_over_the_stored_traceparent_of_each_message(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client)
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    items = {"items": [{"body": 1}, {"body": 2}]}
    batch = await client.post(
        f"/api/v1/queues/{queue}/messages/batch", json=items, headers={"traceparent": SENT}
    )
    alone = await client.post(
        f"/api/v1/queues/{queue}/messages", json={"body": 3}, headers={"traceparent": other}
    )
    ids = [m["id"] for m in batch.json()["items"]] + [alone.json()["id"]]
    stored = [await stored_traceparent(server, message_id) for message_id in ids]
    assert [tracing.parse(s).trace_id for s in stored] == [TRACE, TRACE, other[3:35]]  # type: ignore[union-attr]
    assert stored[2].endswith("-00")  # not sampled upstream: handed on as not sampled

    claimed = await client.post(f"/api/v1/queues/{queue}/claim", json={"max": 3})
    assert [(m["id"], m["traceparent"]) for m in claimed.json()["items"]] == list(
        zip(ids, stored, strict=True)
    )
    line = await logged(server, f"POST /api/v1/queues/{queue}/claim 200")
    assert line.endswith(f"traces {TRACE},{other[3:35]}"), line  # each trace once


@pytest.mark.parametrize("given", ["00-abc-def-01", f"00-{TRACE.upper()}-00f067aa0ba902b7-01", SENT * 2])
async def test_an_invalid_traceparent_starts_a_new_trace_and_is_never_an_error(
    server: Server, client: httpx.AsyncClient, given: str
) -> None:
    request_id, stored = await publish_traced(server, client, await create_queue(client), given)
    assert TRACEPARENT.match(stored) and TRACE not in stored.lower()
    trace_id = stored[3:35]
    await logged(server, f"| {request_id} | {trace_id} | POST")


async def test_a_request_without_a_traceparent_gets_a_trace_of_its_own(
    server: Server, client: httpx.AsyncClient
) -> None:
    queue = await create_queue(client)
    first = await client.post(f"/api/v1/queues/{queue}/messages", content=b"a")
    second = await client.post(f"/api/v1/queues/{queue}/messages", content=b"b")
    traces = [await stored_traceparent(server, r.json()["id"]) for r in (first, second)]
    assert all(TRACEPARENT.match(t) for t in traces) and traces[0][3:35] != traces[1][3:35]


# OpenTelemetry -----------------------------------------------------------------------------------

# `main.py serve` with its spans kept in the SDK's in-memory exporter instead of sent over OTLP,
# written to a file when the server's tracing shuts down (the lifespan's end).
SERVE_KEEPING_SPANS = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import main

    class Kept(InMemorySpanExporter):
        def shutdown(self):
            spans = [json.loads(span.to_json()) for span in self.get_finished_spans()]
            with open(sys.argv[2], "w") as out:
                json.dump(spans, out)
            super().shutdown()

    def create_app(settings, build=main.create_app):
        app = build(settings)
        app.state.tracing.exporter = Kept()
        return app

    main.create_app = create_app
    sys.exit(main.run(["serve"]))
    """
)
# `main.py serve` as it runs where the optional packages are not installed.
SERVE_WITHOUT_THE_SDK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    sys.modules["opentelemetry.sdk"] = None  # what `import opentelemetry.sdk` then raises: ImportError
    import main
    sys.exit(main.run(["serve"]))
    """
)


def start_server(tmp_path: Path, program: str, *args: str) -> Server:
    """A server run by `program` (python -c) instead of `main.py serve`, tracing switched on."""
    server = Server(tmp_path / "data", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    server.data_dir.mkdir(parents=True)
    env = {**os.environ, "POMBO_PORT": str(server.port), "POMBO_DATA_DIR": str(server.data_dir)}
    env |= {"POMBO_ENVIRONMENT": "test", "POMBO_JWT_SECRET": SECRET, **server.env}
    with server.log_path.open("ab") as log:
        command = [sys.executable, "-c", program, str(ROOT), *args]
        server.process = subprocess.Popen(command, cwd=server.data_dir, env=env, stdout=log, stderr=log)
    server.wait_ready()
    return server


def by_name(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [span for span in spans if span["name"] == name]


async def test_opentelemetry_sees_spans_for_the_request_the_commit_and_the_claim(tmp_path: Path) -> None:
    need_tool("opentelemetry-sdk", present=importlib.util.find_spec("opentelemetry.sdk") is not None)
    kept = tmp_path / "spans.json"
    server = start_server(tmp_path, SERVE_KEEPING_SPANS, str(kept))
    try:
        async with server.client() as http:
            queue = await create_queue(http)
            url = f"/api/v1/queues/{queue}/messages"
            published = await http.post(url, content=b"job", headers={"traceparent": SENT})
            claimed = await http.post(f"/api/v1/queues/{queue}/claim", json={"max": 1})
    finally:
        assert server.stop() is not None
    spans = json.loads(kept.read_text())
    [publish] = by_name(spans, "POST /api/v1/queues/{queue}/messages")
    assert publish["kind"] == "SpanKind.SERVER" and publish["context"]["trace_id"] == f"0x{TRACE}"
    assert publish["parent_id"] == "0x00f067aa0ba902b7"  # under the publisher's span
    assert publish["attributes"]["http.response.status_code"] == 201
    # What the message keeps is the server's span, so the worker's span is a child of it.
    [item] = claimed.json()["items"]
    assert item["id"] == published.json()["id"]
    assert item["traceparent"] == f"00-{TRACE}-{publish['context']['span_id'][2:]}-01"
    commits = [s for s in by_name(spans, "commit") if s["parent_id"] == publish["context"]["span_id"]]
    assert len(commits) == 1 and commits[0]["context"]["trace_id"] == f"0x{TRACE}"
    [claim_request] = by_name(spans, "POST /api/v1/queues/{queue}/claim")
    [claim] = by_name(spans, f"claim {queue}")
    assert claim["parent_id"] == claim_request["context"]["span_id"]
    assert [link["context"]["trace_id"] for link in claim["links"]] == [f"0x{TRACE}"]
    assert any(s["parent_id"] == claim["context"]["span_id"] for s in by_name(spans, "commit"))


async def test_without_the_optional_packages_tracing_is_off_and_the_trace_still_travels(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path, SERVE_WITHOUT_THE_SDK)
    try:
        async with server.client() as http:
            queue = await create_queue(http)
            url = f"/api/v1/queues/{queue}/messages"
            published = await http.post(url, content=b"job", headers={"traceparent": SENT})
            assert published.status_code == 201, published.text
            [item] = (await http.post(f"/api/v1/queues/{queue}/claim", json={})).json()["items"]
    finally:
        server.stop()
    assert item["traceparent"].startswith(f"00-{TRACE}-")
    off = "tracing is off: OTEL_EXPORTER_OTLP_ENDPOINT is set, but the OpenTelemetry SDK is not installed"
    assert off in server.log()


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector's trace endpoint: records (path, span name, trace id, parent id)."""

    received: list[tuple[str, str, str, str]]

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = self.rfile.read(int(self.headers["content-length"]))
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
            for scope in resource.scope_spans:
                self.received += [
                    (self.path, s.name, s.trace_id.hex(), s.parent_span_id.hex()) for s in scope.spans
                ]
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


async def test_spans_reach_an_otlp_collector_at_the_configured_endpoint(tmp_path: Path) -> None:
    need_tool(
        "opentelemetry-exporter-otlp", present=importlib.util.find_spec("opentelemetry.proto") is not None
    )
    received: list[tuple[str, str, str, str]] = []
    collector = ThreadingHTTPServer(
        ("127.0.0.1", 0), type("Collector", (_Collector,), {"received": received})
    )
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    server = Server(tmp_path / "data", {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}).start()
    try:
        async with server.client() as http:
            queue = await create_queue(http)
            url = f"/api/v1/queues/{queue}/messages"
            assert (await http.post(url, content=b"x", headers={"traceparent": SENT})).status_code == 201
    finally:
        server.stop()  # the last spans are sent as tracing shuts down
        collector.shutdown()
        collector.server_close()
    published = ("/v1/traces", "POST /api/v1/queues/{queue}/messages", TRACE, "00f067aa0ba902b7")
    assert published in received, received
    assert "tracing: spans are exported over OTLP" in server.log()


async def test_a_traced_page_on_an_allowed_origin_may_send_its_traceparent(make_server: Any) -> None:
    page = "https://app.example.com"
    server = make_server(cors_origins=page).start()
    async with server.client() as http:
        queue = await create_queue(http)
        preflight = await http.options(
            f"/api/v1/queues/{queue}/messages",
            headers={
                "Origin": page,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, traceparent, tracestate",
            },
        )
    assert preflight.status_code == 200, preflight.text
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "traceparent" in allowed and "tracestate" in allowed
