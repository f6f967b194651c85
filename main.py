"""Pombo: the app factory, its lifespan, and the command line.

python main.py [serve]                         run the service
python main.py token --sub NAME --scope "…"    print a signed token
python main.py migrate                         apply migrations and exit
python main.py backup PATH                     copy the SQLite database, also while serving
python main.py restore PATH                    put a copy back (the server stopped)
python main.py publish QUEUE [BODY] [--json]     publish BODY (or stdin), as text or as JSON
python main.py subscribe QUEUE                 print the queue's events as JSON lines
python main.py work QUEUE -- COMMAND [ARGS…]   run COMMAND once per message
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import resource
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from loguru import logger
from starlette.middleware.cors import CORSMiddleware
from tortoise import Tortoise, connections
from tortoise.contrib.fastapi import RegisterTortoise

import api_consume
import api_messages
import api_metrics
import api_notifications
import api_queues
import api_streams
import api_system
import api_tokens
import dashboard
from auth import (
    ADMIN_TOKEN_FILE,
    TokenCodec,
    anonymous,
    load_secret,
    parse_scopes,
    write_private,
)
from availability import Availability
from backups import ScheduledBackups, backup, database_path, restore
from body_limit import BodyLimit
from broker import Broker, create_broker
from client import PomboClient, PomboError
from count_cache import CountCache
from database import prepare_database, replicas_share_a_broker, single_process
from errors import install_error_handlers
from http_rules import BoundedHttpTools, GzipReads, HttpRules
from hub import Hub
from leases import Leases
from metrics import Metrics, Recorder
from models import Token
from notifications import Notifications
from observability import LogFile, RequestContext, configure_logging
from openapi import document
from proxies import TrustedProxies
from rate_counts import Counters
from rate_limits import RateLimits
from schemas import parse_duration, token_lifetime, token_subject
from settings import ClientSettings, Settings, SettingsError, load_settings, proxy_networks, tortoise_config
from sse import DirectSend
from streams import StreamGate
from sweeper import Sweeper
from tokens import Revocations, TokenStore, issue_token
from tracing import Tracing
from worker import Worker, WorkerError, WorkerOptions
from writer import Writer

ADMIN_TOKEN_TTL = timedelta(days=365)
FIRST_TOKEN_COMMAND = "python main.py token --sub admin --scope admin"
# Bounded work per sweep, so housekeeping never stalls publishes for long.
LEASES_PER_TICK = 500
ROWS_PER_TICK = 500
EVENTS_PER_TICK = 5000


# Below this a JSON answer (a publish's, say) gains little from gzip and costs its CPU.
GZIP_MIN_BYTES = 1024
# zlib's default: level 9 took about twice as long for the same size within 2 % (NOTES.md).
GZIP_LEVEL = 6
CORS_METHODS = ["GET", "HEAD", "POST", "PATCH", "DELETE"]
CORS_REQUEST_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "Last-Event-ID",  # EventSource sends it when it resumes: not a safelisted header
    "traceparent",  # and "tracestate": what a traced page's fetch sends (W3C Trace Context)
    "tracestate",
    "X-Delay",
    "X-Priority",
    "X-Request-ID",
    "X-Type",
]
CORS_RESPONSE_HEADERS = [
    "Content-Disposition",
    "Location",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "Retry-After",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "X-Request-ID",
]
CORS_MAX_AGE = 600  # seconds a browser may keep a preflight's answer


# fastapi-offline's pages (it registers them itself, so app.docs_url is None).
DOCS_PAGES = ("/docs", "/docs/oauth2-redirect", "/redoc")
_DOCUMENTED_IN_ORDER = (
    "system",
    "tokens",
    "queues",
    "messages",
    "consume",
    "notifications",
    "streams",
    "dashboard",
)


def create_app(settings: Settings) -> FastAPI:
    # /docs and /redoc with their scripts and styles served by the app itself, so they work on a
    # closed network; no online validator badge either.
    app = FastAPIOffline(
        title="Pombo",
        version="0.1.0",
        lifespan=_lifespan,
        description="A small, self-hosted message hub.",
        openapi_tags=[{"name": tag} for tag in _DOCUMENTED_IN_ORDER],
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    # /openapi.json as the server answers (openapi.py), in FastAPI's documented way to extend it.
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]
    try:
        app.state.anonymous = anonymous(settings.anonymous_scopes)
    except ValueError as error:
        raise SettingsError(f"invalid setting POMBO_ANONYMOUS_SCOPES: {error}") from None
    app.state.availability = Availability()
    # Its own registry per app, not prometheus-client's global one: two apps never collide.
    app.state.metrics = Recorder(settings.metrics_queues) if settings.metrics else Metrics()
    app.state.tracing = Tracing(bool(settings.otel_exporter_otlp_endpoint), settings.otel_service_name)
    install_error_handlers(app)
    # Routes match in order: the busiest first (publish, claim, ack), about 40 µs less a publish.
    modules: tuple[ModuleType, ...] = (api_messages, api_consume, api_queues, api_notifications, api_streams)
    modules += (api_tokens, api_system, api_metrics) if settings.metrics else (api_tokens, api_system)
    for module in modules:
        app.include_router(module.router)
    # Every route, for the `Allow` of a 405 (errors.allowed_methods).
    dashboard.install(app)
    app.state.routes = [
        *app.router.routes,
        *(route for module in (*modules, dashboard) for route in module.router.routes),
    ]
    app.add_middleware(BodyLimit, limit=max(settings.max_batch_bytes, settings.max_body_bytes))
    # Lists, exports and docs assets; never a stream (Starlette excludes text/event-stream).
    app.add_middleware(GzipReads, minimum_size=GZIP_MIN_BYTES, compresslevel=GZIP_LEVEL)
    # Inside RequestContext (a 429 has its request id and access line), before any body is read.
    app.state.rate_counters = Counters(settings.redis_url, settings.redis_prefix, app.state.availability)
    app.add_middleware(RateLimits, settings=settings, counters=app.state.rate_counters)
    # Its request id and access line cover the rest.
    app.add_middleware(
        RequestContext,
        availability=app.state.availability,
        tracing=app.state.tracing,
        metrics=app.state.metrics,
    )
    if settings.allowed_origins:
        # Outside RequestContext, so that a 500 it answers is readable cross-origin too.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_credentials=settings.cors_credentials,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_RESPONSE_HEADERS,
            max_age=CORS_MAX_AGE,
        )
    app.add_middleware(
        HttpRules,
        hsts=settings.hsts,
        docs_pages=DOCS_PAGES,
        styled_at_run_time=["/redoc"],
        trusted_pages=[dashboard.PAGE],
    )
    if trusted := proxy_networks(settings.trusted_proxies):
        # Outermost: everything inside reads the client's address and scheme, not the proxy's.
        app.add_middleware(TrustedProxies, trusted=trusted)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    if not app.openapi_schema:
        app.openapi_schema = document(app, app.state.settings)
    return app.openapi_schema


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    with app.state.tracing.started():
        async with replicas_share_a_broker(settings), _running_app(app, settings):
            yield


@asynccontextmanager
async def _running_app(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    secret, generated = load_secret(settings)
    app.state.codec = TokenCodec.configured(settings, secret)
    async with RegisterTortoise(app, config=tortoise_config(settings)):
        if generated:
            await _first_admin_token(settings, app.state.codec)
        elif not await Token.exists():
            # A secret of the operator's own (PostgreSQL, Docker): the first token is theirs to make.
            logger.warning("no tokens yet: make an admin one with: {}", FIRST_TOKEN_COMMAND)
        app.state.revocations = Revocations()
        await app.state.revocations.refresh()
        app.state.stream_gate = StreamGate(
            app.state.revocations, settings.streams_per_subject, app.state.metrics
        )
        async with _running_hub(app, settings):
            broker = "redis" if settings.redis_url else "in-process broker"
            logger.info("pombo ready on {}:{} ({})", settings.host, settings.port, broker)
            # Everything alive now (modules, app, ORM) lives as long as the process: keep it out of
            # the collector's full passes, which otherwise pause every stream while they walk it.
            gc.freeze()
            # A full pass over 10,000 streams' objects takes 0.3-0.5 s, all streams paused: make
            # them 100 times rarer (fan-out p99 at 1,000 x 20/s 245-289 -> 193-208 ms, measured).
            gc.set_threshold(700, 10, 1000)
            yield


@asynccontextmanager
async def _running_hub(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    broker = create_broker(settings.redis_url, settings.redis_prefix, app.state.metrics)
    availability: Availability = app.state.availability
    writer = Writer(broker, settings.writer_batch, availability, app.state.metrics)
    availability.watch("database", _select_one)
    availability.watch("writer", writer.probe)
    counts = CountCache(settings.redis_url, settings.redis_prefix, enabled=settings.count_cache)
    await broker.start()
    writer.start()
    app.state.broker = broker
    app.state.hub = Hub(settings, writer, counts)
    app.state.leases = Leases(writer, broker)
    app.state.notifications = Notifications(writer)
    app.state.tokens = TokenStore(writer, app.state.codec, app.state.revocations)
    sweeper = _sweeper(app, settings)
    sweeper.start()
    backups = ScheduledBackups(settings) if settings.backup_interval else None
    if backups is not None:
        backups.start()
    try:
        yield
    finally:
        if backups is not None:
            await backups.close()
        await sweeper.close()
        await availability.close()
        await writer.close()
        await broker.close()
        await counts.close()
        await app.state.rate_counters.close()


def _sweeper(app: FastAPI, settings: Settings) -> Sweeper:
    hub, leases, notifications = app.state.hub, app.state.leases, app.state.notifications
    every_tick = [
        partial(leases.release_expired, LEASES_PER_TICK),
        notifications.check_backlogs,
        app.state.revocations.refresh,
        partial(app.state.broker.cut_stalled, settings.stream_send_timeout_seconds),
    ]
    retention = [
        partial(hub.expire_messages, ROWS_PER_TICK),
        partial(notifications.remove_expired, ROWS_PER_TICK),
    ]
    if settings.event_retention_seconds > 0:
        retention.append(partial(hub.trim_logs, settings.event_retention_seconds, EVENTS_PER_TICK))
    return Sweeper(settings, every_tick, retention, app.state.availability)


async def _select_one() -> None:
    await connections.get("default").execute_query("SELECT 1")


async def _first_admin_token(settings: Settings, codec: TokenCodec) -> None:
    minted = await issue_token(codec, "admin", frozenset({"admin"}), ADMIN_TOKEN_TTL)
    path = settings.data_dir / ADMIN_TOKEN_FILE
    write_private(path, minted.token + "\n")
    # The console shows where the token is, never the token itself.
    logger.warning("first start: generated a JWT secret; an admin token is in {} (mode 0600)", path)


def _raise_open_files_limit() -> None:
    """10,000 streams need 10,000 sockets: lift our soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Server(uvicorn.Server):
    """uvicorn waits for open connections before shutting the app down: end the streams first."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        broker: Broker | None = getattr(self._app.state, "broker", None)
        if broker is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(broker.close_all)


def serve(settings: Settings) -> None:
    _raise_open_files_limit()
    app = create_app(settings)
    config = uvicorn.Config(
        DirectSend(app),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http=BoundedHttpTools.configured(settings.hsts, settings.read_timeout_seconds),
        # X-Forwarded-For is read by the app, and only from POMBO_TRUSTED_PROXIES (proxies.py);
        # uvicorn's own rule would believe any local peer.
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    with single_process(settings):
        asyncio.run(prepare_database(settings))  # before uvicorn: a failure is one line, not a traceback
        try:
            _Server(config, app).run()
        except KeyboardInterrupt:
            # uvicorn raises the Ctrl-C again once it has shut down: done, so no traceback.
            raise SystemExit(130) from None


async def _mint(settings: Settings, subject: str, scopes: frozenset[str], ttl: timedelta) -> str:
    secret, _ = load_secret(settings)
    await prepare_database(settings)
    await Tortoise.init(config=tortoise_config(settings))
    try:
        minted = await issue_token(TokenCodec.configured(settings, secret), subject, scopes, ttl)
    finally:
        await Tortoise.close_connections()
    return minted.token


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python main.py", description="Pombo, a small message hub.")
    commands = parser.add_subparsers(dest="command")
    _client_commands(commands)
    commands.add_parser("serve", help="run the service (the default)")
    commands.add_parser("migrate", help="apply database migrations and exit")
    backup = commands.add_parser("backup", help="copy the SQLite database to PATH, also while it serves")
    backup.add_argument("path", type=Path)
    restore = commands.add_parser("restore", help="put the copy at PATH in place (the server stopped)")
    restore.add_argument("path", type=Path)
    token = commands.add_parser("token", help="print a signed token on stdout")
    token.add_argument("--sub", required=True, help="the subject, e.g. a user or service name")
    token.add_argument(
        "--scope", default="", help='space-separated scopes, e.g. "publish:builds.* subscribe:*"'
    )
    token.add_argument("--ttl", default="30d", help="lifetime: 3600, 30m, 12h, 30d (default 30d)")
    return parser


def _client_commands(commands: Any) -> None:
    remote, client = argparse.ArgumentParser(add_help=False), ClientSettings()
    remote.add_argument("--url", default=client.url, help="default: $POMBO_URL, else http://127.0.0.1:8000")
    remote.add_argument("--token", default=client.token, help="default: $POMBO_TOKEN")
    publish = commands.add_parser("publish", parents=[remote], help="publish a message (the body, or stdin)")
    publish.add_argument("queue")
    publish.add_argument("body", nargs="?", help="default: read stdin")
    publish.add_argument("--type", default=None)
    publish.add_argument("--priority", choices=["low", "normal", "high", "urgent"], default=None)
    publish.add_argument("--delay", default=None, help="e.g. 30s, 5m")
    publish.add_argument("--idempotency-key", default=None)
    publish.add_argument("--json", action="store_true", help="the body is JSON, published as a JSON body")
    subscribe = commands.add_parser(
        "subscribe", parents=[remote], help="print events as JSON lines, resuming"
    )
    subscribe.add_argument("queue")
    subscribe.add_argument("--from-start", action="store_true", help="the whole retained log first")
    work = commands.add_parser(
        "work",
        parents=[remote],
        help="run a command once per message",
        usage="%(prog)s QUEUE [options] -- COMMAND [ARGS…]",
        description=WORK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    work.add_argument("queue", help="the queue to work through")
    work.add_argument("--concurrency", type=int, default=1, metavar="N", help="commands at once (1)")
    work.add_argument(
        "--visibility-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="lease, kept while running (30)",
    )
    work.add_argument("--batch", type=int, default=10, help="messages per claim; 1 for long commands")


WORK_DESCRIPTION = """\
Claim messages from QUEUE and run COMMAND once for each: the body on its stdin (a JSON string
as the string itself), the metadata in POMBO_* variables. Exit 0 acks; anything else nacks with
the last stderr line. Everything after `--` is the command.

example:
  python main.py work backups --concurrency 2 -- sh -c 'echo "job $POMBO_MESSAGE_ID: $(cat)"'"""


def _run_client(args: argparse.Namespace) -> int:
    if args.command == "publish":
        return asyncio.run(_publish(args))
    if args.command == "subscribe":
        asyncio.run(_subscribe(args))
        return 0
    if not args.program or args.concurrency < 1 or not 1 <= args.batch <= 100:
        raise UsageError(
            "usage: python main.py work QUEUE [--concurrency N] [--batch 1..100] -- COMMAND [ARGS…]"
        )
    options = WorkerOptions(
        args.queue, args.program, args.concurrency, args.visibility_timeout, batch=args.batch
    )
    asyncio.run(_work(args, options))
    return 0


async def _publish(args: argparse.Namespace) -> int:
    text = args.body if args.body is not None else sys.stdin.read()
    key = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key is not None else {}
    async with PomboClient(args.url, args.token) as client:
        if args.json:
            message = await client.publish_json(args.queue, _envelope(args, _json_body(text)), key)
        else:
            given = {"X-Type": args.type, "X-Priority": args.priority, "X-Delay": args.delay}
            headers = key | {k: v for k, v in given.items() if v is not None}
            message = await client.publish(args.queue, text, headers)
    print(message["id"])
    return 0


def _envelope(args: argparse.Namespace, body: Any) -> dict[str, Any]:
    """The JSON publish body (DECISIONS.md §8): the options become its fields."""
    given = {"type": args.type, "priority": args.priority}
    envelope = {"body": body} | {k: v for k, v in given.items() if v is not None}
    if args.delay is not None:
        envelope["delay"] = parse_duration(args.delay)
    return envelope


class UsageError(ValueError):
    """A command line that cannot work as given: one line, exit status 2."""


def _json_body(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError as error:
        raise UsageError(f"--json: the body is not valid JSON: {error}") from None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")  # Python's json reads NaN and Infinity


async def _subscribe(args: argparse.Namespace) -> None:
    """Prints until SIGINT or SIGTERM, then exits 0.

    Handlers of our own, not asyncio.run's: a shell without job control starts a background
    command with SIGINT ignored, and asyncio.run then leaves it ignored.
    """
    printing = asyncio.create_task(_print_events(args))
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, printing.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await printing


async def _print_events(args: argparse.Namespace) -> None:
    async with PomboClient(args.url, args.token) as client:
        async for event in client.events(args.queue, "0" if args.from_start else None):
            seq = int(event.id) if event.id.isdigit() else None
            print(json.dumps({"seq": seq, "type": event.event, "data": json.loads(event.data)}), flush=True)


async def _work(args: argparse.Namespace, options: WorkerOptions) -> None:
    async with PomboClient(args.url, args.token) as client:
        await Worker(client, options).run()


def _parsed(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Options anywhere: argparse takes `publish QUEUE` and its optional BODY in one go, so a BODY
    after an option (`publish q --json '{}'`) would be left over. Such a BODY is taken here."""
    args, rest = parser.parse_known_args(argv)
    if args.command == "publish" and args.body is None and len(rest) == 1 and _positional(rest[0]):
        args.body, rest = rest[0], []
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def _positional(arg: str) -> bool:
    return not arg.startswith("-") or arg[1:2].isdigit()  # `-5` is a body, as argparse reads it


def run(argv: Sequence[str]) -> int:
    # Everything after `--` is the worker's command, options included.
    split = list(argv).index("--") if "--" in argv else len(argv)
    args = _parsed(_parser(), argv[:split])
    args.program = list(argv[split + 1 :])
    if args.command in ("publish", "subscribe", "work"):
        configure_logging(json_lines=False)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            return _run_client(args)
        except (PomboError, WorkerError, ValueError) as error:
            print(f"pombo: {error}", file=sys.stderr)
            return 2 if isinstance(error, UsageError) else 1
    try:
        settings = load_settings()
        if args.command == "token":
            configure_logging(settings.json_logs, level="WARNING")
            scopes, ttl = parse_scopes(args.scope), token_lifetime(args.ttl)
            print(asyncio.run(_mint(settings, token_subject(args.sub), scopes, ttl)))
            return 0
        configure_logging(settings.json_logs, file=_log_file(settings))
        if args.command == "migrate":
            asyncio.run(prepare_database(settings))
        elif args.command in ("backup", "restore"):
            return _copy(settings, args.command, args.path)
        else:
            serve(settings)
    except (SettingsError, ValueError) as error:
        print(f"pombo: {error}", file=sys.stderr)
        return 2
    return 0


def _copy(settings: Settings, command: str, path: Path) -> int:
    try:
        if command == "restore":
            restore(settings, path)
        else:
            size = backup(database_path(settings), path)
            print(f"{path}: {size / 2**20:.1f} MiB")
    except (OSError, sqlite3.Error) as error:
        print(f"pombo: {command} failed: {error}", file=sys.stderr)
        return 1
    return 0


def _log_file(settings: Settings) -> LogFile | None:
    if settings.log_file is None:
        return None
    return LogFile(settings.log_file, settings.log_rotation, settings.log_retention)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
