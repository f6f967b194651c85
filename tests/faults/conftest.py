"""Fixtures for the fault suite: services of its own that a test may stop, fill or kill.

The Redis of a test is conftest's `own_redis` (a `RedisProcess` on a free port). This package has
an `__init__.py` so that this file is `faults.conftest` and never shadows `tests/conftest.py`.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import REQUIRE_SERVICES, RedisProcess, Server, unique

from .services import MountNotPermitted, PostgresCluster, Tmpfs, postgres_tool


def need_binary(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None and postgres_tool(name) is None]
    if not missing:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{', '.join(missing)} not installed and POMBO_TEST_REQUIRE_SERVICES=1")
    pytest.skip(f"{', '.join(missing)} not installed")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of the fault suite's own, on a free port; the tests may stop it."""
    need_binary("initdb", "pg_ctl", "psql", *(["runuser"] if os.geteuid() == 0 else []))
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_fault_url(pg_cluster: PostgresCluster) -> str:
    """A fresh database in the suite's own cluster (started again if a test left it stopped)."""
    if not pg_cluster.running:
        pg_cluster.start()
    return pg_cluster.create_database(f"pombo_faults_{secrets.token_hex(4)}")


@pytest.fixture
def replicas(make_server: Any, pg_fault_url: str, own_redis: RedisProcess) -> Callable[..., list[Server]]:
    """`replicas(2, **settings)`: started servers on one database and one Redis, sharing a prefix."""
    prefix = unique("faults")

    def start(count: int = 2, **settings: str) -> list[Server]:
        env = {"database_url": pg_fault_url, "redis_url": own_redis.url, "redis_prefix": prefix, **settings}
        return [make_server(**env).start() for _ in range(count)]

    return start


@pytest.fixture
def small_tmpfs() -> Iterator[Tmpfs]:
    """A 48 MiB tmpfs, unmounted afterwards; skipped where this machine may not mount one."""
    size = int(os.environ.get("POMBO_FAULTS_TMPFS_MIB", "48"))
    tmpfs = Tmpfs(size)
    try:
        tmpfs.mount()
    except MountNotPermitted as error:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {error}")
    try:
        yield tmpfs
    finally:
        tmpfs.unmount()
