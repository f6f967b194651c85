"""Logging through loguru, a request id on every response and log line, one access line each."""

from __future__ import annotations

import logging
import random
import re
import sys
import time

from loguru import logger
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errors import internal_error

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _Intercept(logging.Handler):
    """Route standard logging (uvicorn, tortoise, asyncio) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        level: str | int = record.levelname if record.levelname in logger._core.levels else record.levelno  # type: ignore[attr-defined]
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def configure_logging(json_lines: bool, level: str = "INFO") -> None:
    logger.remove()
    logger.configure(extra={"request_id": "-"})
    fmt = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[request_id]} | {message}"
    logger.add(sys.stderr, level=level, serialize=json_lines, format=fmt, diagnose=False, backtrace=False)
    logging.basicConfig(handlers=[_Intercept()], level=logging.INFO, force=True)
    for name in ("uvicorn", "uvicorn.error", "tortoise", "asyncio"):
        logging.getLogger(name).handlers = [_Intercept()]
        logging.getLogger(name).propagate = False
    # Our own access line replaces uvicorn's, which would print query strings (and tokens).
    logging.getLogger("uvicorn.access").disabled = True


class RequestContext:
    """Gives each request an id (echoing a sane client one), logs one line when it ends.

    The access line has the path without its query string: `access_token` must never be logged.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
            await send(message)

        with logger.contextualize(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as error:  # noqa: BLE001 - answered here, so a 500 carries the id too
                logger.opt(exception=error).error("unhandled error")
                if not status:
                    await internal_error()(scope, receive, send_with_id)
            finally:
                elapsed = (time.perf_counter() - began) * 1000
                answered = status[0] if status else 500
                logger.info("{} {} {} {:.1f}ms", scope["method"], scope["path"], answered, elapsed)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given: str = value.decode("latin-1")
            if _REQUEST_ID.match(given):
                return given
    return f"{random.getrandbits(128):032x}"  # as uuid4().hex looks; unique, not secret (models.new_id)
