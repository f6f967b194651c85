"""Real servers for tests: Pombo in a subprocess on a free port, real SQLite, PostgreSQL, Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis
from httpx_sse import ServerSentEvent, aconnect_sse
from loguru import logger

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auth import TokenCodec  # noqa: E402

# Screenshots the browser tests write for people to look at (git-ignored).
ARTEFACTS = ROOT / "tests" / "artefacts"
SECRET = "test-secret-" + "x" * 40
PG_ADMIN_URL = os.environ.get("POMBO_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("POMBO_TEST_REDIS", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("POMBO_TEST_REQUIRE_SERVICES") == "1"


# Lines a test adds here are printed in the terminal summary (schemathesis's case counts).
SUMMARY_LINES = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for line in config.stash.get(SUMMARY_LINES, []):
        terminalreporter.write_line(line)


def mint(subject: str = "tester", scopes: str = "admin", ttl: float = 3600, secret: str = SECRET) -> str:
    token = TokenCodec(secret, "HS256").mint(subject, frozenset(scopes.split()), timedelta(seconds=ttl)).token
    return never_logged(token)


# Log hygiene, over the whole session -----------------------------------------------------------
# Every server's log file and everything logged in this process are read when the session ends:
# no token, secret or `access_token` value may be in them (tests/test_security.py says why).

NEVER_LOGGED: set[str] = {SECRET}
SERVER_LOGS: set[Path] = set()
_IN_PROCESS_LOG: list[str] = []
# A JWT by its shape (a base64url JSON header and payload, then the signature), so that tokens
# minted over HTTP or by the CLI are caught without being registered.
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*")
ACCESS_TOKEN_VALUE = re.compile(r"access_token=[^&\s\"']")
# What a server writes into its data dir that is as secret as a token.
SECRET_FILES = ("jwt-secret", "admin-token")


def never_logged(value: str) -> str:
    """Register a token or secret that no log line may hold; returns it."""
    NEVER_LOGGED.add(value)
    return value


def leaks(text: str, where: str) -> list[str]:
    """What in `text` must not be there, each named without repeating the value."""
    found = [f"{where}: a registered token or secret ({v[:4]}…)" for v in NEVER_LOGGED if v in text]
    found += [f"{where}: a JWT ({match[:12]}…)" for match in JWT_SHAPE.findall(text)]
    found += [f"{where}: an access_token value" for _ in ACCESS_TOKEN_VALUE.findall(text)[:1]]
    return found


def _session_leaks() -> list[str]:
    for log in SERVER_LOGS:
        for name in SECRET_FILES:
            if (log.parent / name).is_file():
                never_logged((log.parent / name).read_text().strip())
    found = leaks("".join(_IN_PROCESS_LOG), "this process's log")
    for log in sorted(SERVER_LOGS):
        if log.is_file():
            found += leaks(log.read_text(errors="replace"), log.name)
    return found


_sink_id: int | None = None


@pytest.fixture(autouse=True)
def _capture_in_process_log() -> None:
    """A loguru sink for this process's lines, put back before each test (code under test may
    remove every sink, as `configure_logging` does)."""
    global _sink_id
    if _sink_id is not None:
        with contextlib.suppress(ValueError):
            logger.remove(_sink_id)
    _sink_id = logger.add(_IN_PROCESS_LOG.append, level="TRACE", format="{message} {extra}")


@pytest.fixture(scope="session", autouse=True)
def _no_token_in_any_log() -> Iterator[None]:
    """Fails the session (an error at its last teardown) when any log held a token or secret."""
    yield
    found = _session_leaks()
    assert not found, "tokens or secrets reached a log:\n" + "\n".join(sorted(set(found))[:20])


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ADMIN = auth(mint())


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error envelope `{"error": {"code", "message", "details"}}` with this status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], dict), error
    return dict(error)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need_service(name: str, port: int) -> None:
    if _reachable("127.0.0.1", port):
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{name} is not running on 127.0.0.1:{port} and POMBO_TEST_REQUIRE_SERVICES=1")
    pytest.skip(f"{name} is not running on 127.0.0.1:{port}")


def need_tool(name: str, present: bool | None = None) -> None:
    """Skip without `name` (a command on PATH, unless `present` tells), or fail when every
    dependency is required (POMBO_TEST_REQUIRE_SERVICES=1)."""
    if shutil.which(name) is not None if present is None else present:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{name} is not installed and POMBO_TEST_REQUIRE_SERVICES=1")
    pytest.skip(f"{name} is not installed")


@dataclass
class Server:
    """`python main.py serve` in a subprocess, with its log captured to a file."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"server-{self.port}.log"

    def start(self, wait: bool = True) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        SERVER_LOGS.add(self.log_path)
        for name, value in self.env.items():
            if "SECRET" in name:
                for secret in value.replace(",", " ").split():
                    never_logged(secret)
        env = {**os.environ, "POMBO_PORT": str(self.port), "POMBO_DATA_DIR": str(self.data_dir)}
        env.setdefault("POMBO_ENVIRONMENT", "test")
        env.update({"POMBO_JWT_SECRET": SECRET, **self.env})
        env = {k: v for k, v in env.items() if v != ""}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), "serve"],
                cwd=self.data_dir,
                env=env,
                stdout=log,
                stderr=log,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log()[-2000:]}")

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers=headers if headers is not None else ADMIN, timeout=30
        )


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def make(data_dir: Path | None = None, **settings: str) -> Server:
        """`make(database_url=…)` sets POMBO_DATABASE_URL; an empty value unsets the variable."""
        env = {
            k.upper() if k.upper().startswith("POMBO_") else f"POMBO_{k.upper()}": v
            for k, v in settings.items()
        }
        server = Server(data_dir or tmp_path / f"srv{len(servers)}", env)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("sqlite")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A module's server, once on the embedded default and once on PostgreSQL + Redis."""
    data_dir = tmp_path_factory.mktemp(request.param)
    if request.param == "sqlite":
        server = Server(data_dir).start()
        yield server
        server.stop()
        return
    need_service("PostgreSQL", 5432)
    need_service("Redis", 6379)
    with postgres_database() as url:
        env = {"POMBO_DATABASE_URL": url, "POMBO_REDIS_URL": REDIS_URL, "POMBO_REDIS_PREFIX": unique("test")}
        server = Server(data_dir, env).start()
        yield server
        server.stop()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with server.client() as http:
        yield http


def unique(prefix: str = "q") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


TABLES = ("queues", "messages", "events", "event_logs", "notifications")


async def sql(server: Server, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run SQL (with `?` placeholders) straight against a server's database."""
    url = server.env.get("POMBO_DATABASE_URL")
    if url is None:
        with sqlite3.connect(server.data_dir / "pombo.sqlite3") as db:
            return db.execute(query, args).fetchall()
    parts = query.split("?")
    numbered = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], start=1))
    connection = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await connection.fetch(numbered, *args)]
    finally:
        await connection.close()


async def snapshot(server: Server) -> dict[str, Any]:
    """Every row of every table, to prove a rejected request changed nothing."""
    return {table: await sql(server, f"SELECT * FROM {table} ORDER BY 1") for table in TABLES}


def sqlite_snapshot(server: Server) -> dict[str, Any]:
    with sqlite3.connect(server.data_dir / "pombo.sqlite3") as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in TABLES}


async def _admin_sql(*statements: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        for statement in statements:
            await admin.execute(statement)
    finally:
        await admin.close()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards (usable from sync and async fixtures)."""
    name = f"pombo_test_{secrets.token_hex(4)}"
    run = partial(_in_thread, _admin_sql)
    run(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        kill = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        run(kill, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _in_thread(function: Any, *args: Any) -> None:
    """asyncio.run in a thread of its own, so it never meets the tests' event loop."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, function(*args)).result()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    need_service("PostgreSQL", 5432)
    with postgres_database() as url:
        yield url


@pytest.fixture
def redis_url() -> str:
    """The shared Redis, on a key prefix of this test's own (pass it as POMBO_REDIS_PREFIX)."""
    need_service("Redis", 6379)
    return REDIS_URL


@pytest.fixture
def replicas(make_server: Any, pg_url: str, redis_url: str) -> tuple[Server, Server]:
    """Two started servers on one PostgreSQL database and one Redis prefix."""
    prefix = unique("test")
    first, second = (
        make_server(database_url=pg_url, redis_url=redis_url, redis_prefix=prefix) for _ in range(2)
    )
    return first.start(), second.start()


@dataclass
class RedisProcess:
    """A Redis server of the test's own, which it may stop and start again."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.process = subprocess.Popen(args, cwd=self.directory, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        if REQUIRE_SERVICES:
            pytest.fail("redis-server is not installed and POMBO_TEST_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


class Listener:
    """A real SSE client on a real server, recording every event with its arrival time."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, params: Any = None) -> None:
        # A copy: httpx-sse adds its Accept header to the dict it is given, and ADMIN is shared.
        self.url, self.params = url, params
        self.headers = dict(headers if headers is not None else ADMIN)
        self.events: list[tuple[float, ServerSentEvent]] = []
        self.response: httpx.Response | None = None
        self.connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Listener:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._wait_connected(), 10)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _wait_connected(self) -> None:
        assert self._task is not None
        waiter = asyncio.create_task(self.connected.wait())
        await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            waiter.cancel()
            self._task.result()

    async def _run(self) -> None:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as http,
            aconnect_sse(http, "GET", self.url, headers=self.headers, params=self.params) as source,
        ):
            self.response = source.response
            self.connected.set()
            async for event in source.aiter_sse():
                if event.data:  # pings carry no data
                    self.events.append((time.monotonic(), event))
                    self._changed.set()

    @property
    def finished(self) -> bool:
        return self._task is not None and self._task.done()

    def logged(self) -> list[ServerSentEvent]:
        """Events that belong to the log (they carry an `id:`)."""
        return [e for _, e in self.events if e.event not in CONTROL_EVENTS]

    async def wait_for(
        self, count: int, timeout: float = 10, event: str | None = None
    ) -> list[ServerSentEvent]:
        deadline = time.monotonic() + timeout
        while True:
            matching = [e for _, e in self.events if event is None or e.event == event]
            if len(matching) >= count or self.finished:
                return matching
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return matching
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


CONTROL_EVENTS = {"stream.reset", "stream.expired", "stream.limit", "stream.busy", "unread_count"}
