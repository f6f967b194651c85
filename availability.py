"""Which failures mean a dependency is unavailable, and the episodes they make.

A database that is down, restarting, read-only or out of disk is not a bug: requests get 503
`unavailable` with `Retry-After`, readiness says so, and the log gets one warning when an
episode begins and one line when it ends, instead of a traceback per request. While anything is
down, a probe retries it every PROBE_SECONDS, so an episode ends as soon as the dependency is
back, whether or not a request came by meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import asyncpg
from loguru import logger
from redis.exceptions import RedisError
from tortoise.exceptions import DBConnectionError

from errors import ApiError, unavailable

PROBE_SECONDS = 0.5
# A probe that takes longer than this failed: readiness must answer quickly (an orchestrator's
# probe often gives up after a second or two).
PROBE_TIMEOUT = 1.5

# SQLite's result codes for a file or disk that cannot serve now (the low byte of extended codes).
_SQLITE_CODES = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL}
    | {sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_LOCKED}
)
# PostgreSQL's SQLSTATE classes 08 (connection), 53 (resources: disk full, too many connections),
# 57 (shutting down, starting up), and 25006 (read-only: a standby, or recovery).
_POSTGRES_CLASSES = ("08", "53", "57")
_POSTGRES_READ_ONLY = "25006"


async def _within(probe: Awaitable[object], seconds: float) -> None:
    """Await `probe`, giving up after `seconds` without waiting for it to let go: a connection to
    a database that stopped answering can take longer to clean up than readiness may take."""
    task = asyncio.ensure_future(probe)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        task.add_done_callback(_forget)
        raise TimeoutError(f"no answer within {seconds} s")
    task.result()


def _forget(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()  # read, so that asyncio does not report it as never retrieved


def unavailable_cause(error: BaseException) -> str | None:
    """ "database" when `error`, or what it was raised from, says the database cannot serve now."""
    for link in _chain(error):
        if isinstance(link, RedisError):
            return None  # Redis is never a request's dependency: callers fall back
        if isinstance(link, sqlite3.Error):
            return "database" if _sqlite_code(link) in _SQLITE_CODES else None
        if isinstance(link, asyncpg.PostgresError):
            state = str(link.sqlstate or "")
            return "database" if state.startswith(_POSTGRES_CLASSES) or state == _POSTGRES_READ_ONLY else None
        if isinstance(link, asyncpg.DataError | asyncpg.ClientConfigurationError):
            return None  # our own bad input to the driver: a bug, not an outage
        if isinstance(link, asyncpg.InterfaceError | asyncpg.InternalClientError):
            return "database"  # a connection closed, released or in an unknown state
        if isinstance(link, OSError | TimeoutError | DBConnectionError):
            return "database"
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and its causes; Tortoise wraps driver errors as its own (`OperationalError(exc)`)."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        link = pending.pop(0)
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        wrapped = [arg for arg in link.args[:1] if isinstance(arg, BaseException)]
        pending += [e for e in (link.__cause__, link.__context__, *wrapped) if e is not None]


def _sqlite_code(error: sqlite3.Error) -> int:
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(error).lower()  # raised without a code (sqlite3's own checks)
    return sqlite3.SQLITE_FULL if "disk is full" in text else -1


def refusal(dependency: str) -> ApiError:
    """The 503 a request gets while `dependency` is unavailable."""
    return unavailable(f"the {dependency} is unavailable; retry later", dependency=dependency)


Probe = Callable[[], Awaitable[object]]


@dataclass
class _Episode:
    began: float
    last_failure: float
    answers_503: bool = True
    refused: int = 0


class Availability:
    """What is down now, since when, and how many requests it cost; readiness reads it.

    `failed` and `recovered` are cheap when nothing changes, so every request and every group
    commit may report.
    """

    def __init__(self) -> None:
        self._down: dict[str, _Episode] = {}
        self._probes: dict[str, Probe] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, dependency: str, probe: Probe) -> None:
        """While `dependency` is down, `probe()` is tried every PROBE_SECONDS; success ends it."""
        self._probes[dependency] = probe

    def failed(self, dependency: str, error: BaseException, meanwhile: str | None = None) -> None:
        """`dependency` failed `error`; `meanwhile` says what requests get instead of a 503, for a
        dependency they can do without (the log then counts no 503s against it)."""
        now = time.monotonic()
        episode = self._down.get(dependency)
        if episode is not None:
            episode.last_failure = now
            return
        self._down[dependency] = _Episode(now, now, answers_503=meanwhile is None)
        effect = meanwhile or "answering 503"
        logger.warning("{} unavailable ({}: {}); {}", dependency, type(error).__name__, error, effect)
        if self._task is None and self._probes:
            self._task = asyncio.get_running_loop().create_task(self._probe_while_down(), name="probe")

    def recovered(self, dependency: str) -> None:
        """Something `dependency` was asked worked: the episode ends, once it has not also failed
        for PROBE_SECONDS. A full disk takes a tiny write and refuses a publish: one success
        proves little while failures keep coming."""
        episode = self._down.get(dependency)
        if episode is not None and time.monotonic() - episode.last_failure >= PROBE_SECONDS:
            del self._down[dependency]
            took = time.monotonic() - episode.began
            refused = f"; {episode.refused} requests got 503" if episode.answers_503 else ""
            logger.info("{} available again after {:.1f}s{}", dependency, took, refused)

    def refused(self) -> None:
        """A request was answered 503: counted against every episode under way."""
        for episode in self._down.values():
            episode.refused += episode.answers_503

    def is_down(self, dependency: str) -> bool:
        return dependency in self._down

    async def check(self, dependency: str) -> bool:
        """Probe `dependency` now and record the outcome; True when it is up."""
        try:
            await _within(self._probes[dependency](), PROBE_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - whatever the probe met, the dependency is down
            self.failed(dependency, error)
            return False
        self.recovered(dependency)
        return not self.is_down(dependency)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _probe_while_down(self) -> None:
        try:
            while self._down:
                await asyncio.sleep(PROBE_SECONDS)
                for dependency in [d for d in self._down if d in self._probes]:
                    await self.check(dependency)
        finally:
            self._task = None
