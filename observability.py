"""Logging through loguru; a request id and a trace id on every request's log lines, one access line each."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import loguru
from loguru import logger
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from availability import Availability, refusal, unavailable_cause
from errors import envelope, internal_error
from metrics import Metrics
from settings import SettingsError
from tracing import RequestTrace, Tracing, from_headers

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _Intercept(logging.Handler):
    """Route standard logging (uvicorn, tortoise, asyncio) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        level: str | int = record.levelname if record.levelname in logger._core.levels else record.levelno  # type: ignore[attr-defined]
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def _not_a_cut_stream(record: logging.LogRecord) -> bool:
    """A stream cut because its client stopped reading ends without its last chunk: by design,
    and the stream says so itself in one warning. Every other response of ours completes."""
    return record.getMessage() != "ASGI callable returned without completing response."


# How long an access line may wait to be written with the others (nginx's `access_log … flush=`).
FLUSH_SECONDS = 0.1
_FLUSH_LINES = 512


class BatchedSink:
    """Access lines written together, at most FLUSH_SECONDS late; any other line at once, after them.

    A write per line is a system call per request, and each one hands the GIL to the writer's
    thread, then waits to get it back: ~25 us of a request's time under load (NOTES.md). Only
    access lines wait, so a process killed by its signal (uvicorn re-raises SIGTERM after a
    graceful shutdown, and atexit never runs) has written everything it said about itself.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._lock = threading.Lock()  # lines come from the event loop and the writer's thread
        self._due: asyncio.TimerHandle | None = None

    def write(self, line: loguru.Message) -> None:
        with self._lock:
            self._lines.append(line)
            urgent = not line.record["extra"].get("access") or len(self._lines) >= _FLUSH_LINES
        if urgent or not self._schedule():
            self.drain()

    def _schedule(self) -> bool:
        """Drain from the event loop soon; False when not on the loop's thread."""
        if self._due is None:
            try:
                self._due = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.drain)
            except RuntimeError:
                return False
        return True

    def drain(self) -> None:
        with self._lock:
            lines, self._lines, self._due = self._lines, [], None
        if lines:
            self._stream.write("".join(lines))
            self._stream.flush()

    def stop(self) -> None:
        """Called by loguru when the sink is removed, at exit included."""
        self.drain()


@dataclass(frozen=True)
class LogFile:
    path: Path
    rotation: str
    retention: str


def configure_logging(json_lines: bool, level: str = "INFO", file: LogFile | None = None) -> None:
    """Lines to stderr, or to a rotated file; standard logging (uvicorn, Tortoise) goes the same way."""
    logger.remove()
    logger.configure(extra={"request_id": "-", "trace_id": "-"})
    fmt = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[request_id]} | {extra[trace_id]} | {message}"
    options: dict[str, Any] = {"level": level, "serialize": json_lines, "format": fmt, "diagnose": False}
    if file is None:
        logger.add(BatchedSink(sys.stderr), backtrace=False, **options)
    else:
        _add_file(file, options)
    logging.basicConfig(handlers=[_Intercept()], level=logging.INFO, force=True)
    for name in ("uvicorn", "uvicorn.error", "tortoise", "asyncio"):
        logging.getLogger(name).handlers = [_Intercept()]
        logging.getLogger(name).propagate = False
    logging.getLogger("uvicorn.error").addFilter(_not_a_cut_stream)
    # Each outage is logged once, as an episode (availability.py); asyncpg would add a traceback
    # every second while it fails to keep its pool's floor of connections.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    # Our own access line replaces uvicorn's, which would print query strings (and tokens).
    logging.getLogger("uvicorn.access").disabled = True


def _add_file(file: LogFile, options: dict[str, Any]) -> None:
    retention: str | int = int(file.retention) if file.retention.isdigit() else file.retention  # files
    _readable("POMBO_LOG_ROTATION", file.path, rotation=file.rotation)
    _readable("POMBO_LOG_RETENTION", file.path, retention=retention)
    try:
        logger.add(file.path, rotation=file.rotation, retention=retention, backtrace=False, **options)
    except OSError as error:
        reason = f"cannot write {file.path}: {error.strerror}"
        raise SettingsError(f"invalid setting POMBO_LOG_FILE: {reason}") from None


def _readable(setting: str, path: Path, **given: Any) -> None:
    """A SettingsError naming `setting` when loguru cannot read its value (tried alone, unopened)."""
    try:
        logger.remove(logger.add(path, delay=True, **given))
    except ValueError as error:
        raise SettingsError(f"invalid setting {setting}: {error}") from None


_access = logger.bind(access=True)  # batched by BatchedSink


class RequestContext:
    """Gives each request an id (echoing a sane client one) and a trace (tracing.py), both in
    every line it logs, and logs one line when it ends.

    The access line has the path without its query string: `access_token` must never be logged;
    a claim's also names the traces of the messages it handed out. An error that says the
    database is unavailable is answered 503 and counted against its episode; any other is logged
    with its traceback and answered 500.
    """

    def __init__(
        self, app: ASGIApp, availability: Availability, tracing: Tracing, metrics: Metrics | None = None
    ) -> None:
        self.app = app
        self.availability = availability
        self.tracing = tracing
        self.metrics = metrics or Metrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        status: list[int] = []
        began = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
                if message["status"] == 503:
                    self.availability.refused()
            await send(message)

        method, path = scope["method"], scope["path"]
        with (
            self.tracing.request(method, path, from_headers(scope["headers"])) as trace,
            logger.contextualize(request_id=request_id, trace_id=trace.own.trace_id),
        ):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as error:  # noqa: BLE001 - answered here, so a 500 carries the id too
                response = self._answer(error)
                if not status:
                    await response(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - began
                answered = status[0] if status else 500
                self.metrics.request(scope, answered, elapsed)
                trace.answered(method, getattr(scope.get("route"), "path", None), answered)
                _access.info("{} {} {} {:.1f}ms{}", method, path, answered, elapsed * 1000, _linked(trace))

    def _answer(self, error: Exception) -> Response:
        dependency = unavailable_cause(error)
        if dependency is None:
            logger.opt(exception=error).error("unhandled error")
            return internal_error()
        self.availability.failed(dependency, error)
        return envelope(refusal(dependency))


def _linked(trace: RequestTrace) -> str:
    return f" traces {','.join(trace.linked)}" if trace.linked else ""


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given: str = value.decode("latin-1")
            if _REQUEST_ID.match(given):
                return given
    return f"{random.getrandbits(128):032x}"  # as uuid4().hex looks; unique, not secret (models.new_id)
