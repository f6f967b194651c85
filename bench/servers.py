"""The servers a comparison run starts and stops: Pombo on SQLite, Pombo on PostgreSQL + Redis, the baseline.

Each runs in a session of its own, so a Ctrl-C in the terminal reaches only run.py, which then
stops them in order; on Linux each is also told to exit if run.py itself dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after bench/, so our module names win

from auth import TokenCodec  # noqa: E402

SECRET = secrets.token_hex(32)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _exit_with_parent() -> None:
    """In the child before exec: SIGTERM when run.py dies, however it dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Server:
    label: str
    argv: list[str]
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    token: str | None = None
    unsupported: frozenset[str] = frozenset()
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.label}.log"

    @property
    def exit_code(self) -> int | None:
        """None while it runs; a negative code names the signal that ended it."""
        return None if self.process is None else self.process.poll()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.workdir,  # no stray .env from the caller's directory
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_exit_with_parent,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.process.returncode}:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as answer,
            ):
                if answer.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.label} did not answer /healthz within {START_TIMEOUT} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, size: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-size:] if self.log_path.exists() else ""


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without its POMBO_* settings, so only what we set applies."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("POMBO_")}, **extra}


def _pombo(label: str, workdir: Path, settings: dict[str, str]) -> Server:
    server = Server(label, [sys.executable, str(ROOT / "main.py"), "serve"], workdir / label)
    token = TokenCodec(SECRET, "HS256").mint("bench", frozenset({"admin"}), timedelta(days=1)).token
    server.token = token
    server.env = _clean_env(
        {
            "POMBO_PORT": str(server.port),
            "POMBO_DATA_DIR": str(server.workdir),
            "POMBO_JWT_SECRET": SECRET,
            **settings,
        }
    )
    return server


@contextlib.contextmanager
def pombo_sqlite(workdir: Path, settings: dict[str, str], label: str = "pombo-sqlite") -> Iterator[Server]:
    """Pombo as `make run` starts it: SQLite in a data dir of its own, the in-process broker."""
    with running(_pombo(label, workdir, settings)) as server:
        yield server


@contextlib.contextmanager
def pombo_postgres(
    workdir: Path, settings: dict[str, str], admin_url: str, redis_url: str, label: str = "pombo-postgres"
) -> Iterator[Server]:
    """Pombo on a fresh PostgreSQL database, created here and dropped afterwards, and Redis."""
    with postgres_database(admin_url) as database_url:
        replica = {
            "POMBO_DATABASE_URL": database_url,
            "POMBO_REDIS_URL": redis_url,
            "POMBO_REDIS_PREFIX": f"bench-{secrets.token_hex(4)}",
            **settings,
        }
        with running(_pombo(label, workdir, replica)) as server:
            yield server


@contextlib.contextmanager
def baseline(workdir: Path, redis_url: str) -> Iterator[Server]:
    server = Server("baseline", [], workdir / "baseline", unsupported=frozenset({"claim", "reads"}))
    server.argv = [sys.executable, str(ROOT / "bench" / "baseline.py"), "--port", str(server.port)]
    server.argv += ["--redis", redis_url]
    server.env = _clean_env({})
    with running(server):
        yield server


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    name = f"pombo_bench_{secrets.token_hex(4)}"
    asyncio.run(_admin_sql(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        # A server killed hard may leave sessions behind; they would block the drop.
        kill = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        asyncio.run(_admin_sql(admin_url, kill, f'DROP DATABASE IF EXISTS "{name}"'))


async def _admin_sql(admin_url: str, *statements: str) -> None:
    connection = await asyncpg.connect(admin_url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()
