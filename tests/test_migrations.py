"""The migrations in `migrations/` build exactly the models' schema, on SQLite and on PostgreSQL.

Tortoise runs in subprocesses (`python main.py migrate`, a small script for `generate_schemas`),
so its context and its SQLite worker threads never live in the test process.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import PG_ADMIN_URL, ROOT, SECRET, need_service

BOOKKEEPING = "tortoise_migrations"
TABLES = ("queues", "messages", "events", "event_logs", "notifications", "tokens")
MIGRATION_FILES = sorted(p.stem for p in (ROOT / "migrations").glob("[0-9]*.py"))

# The schema Tortoise derives from models.py, on whatever database the settings name.
GENERATE = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from tortoise import Tortoise
    from settings import load_settings, tortoise_config

    async def main():
        settings = load_settings()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await Tortoise.init(config=tortoise_config(settings))
        try:
            await Tortoise.generate_schemas()
        finally:
            await Tortoise.close_connections()

    asyncio.run(main())
    """
)

# What `make migration` would write next, without writing anything.
PENDING_CHANGES = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from tortoise.context import TortoiseContext
    from tortoise.migrations.autodetector import MigrationAutodetector
    from settings import MIGRATIONS_CONFIG

    async def main():
        async with TortoiseContext() as ctx:
            await ctx.init(config=MIGRATIONS_CONFIG)
            apps = {label: dict(app) for label, app in MIGRATIONS_CONFIG["apps"].items()}
            for writer in await MigrationAutodetector(ctx.apps, apps).changes():
                print(writer.name, [repr(op) for op in writer.operations])

    asyncio.run(main())
    """
)


def pombo_env(data_dir: Path, database_url: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POMBO_")}
    env.update(POMBO_DATA_DIR=str(data_dir), POMBO_JWT_SECRET=SECRET, POMBO_ENVIRONMENT="test")
    if database_url:
        env["POMBO_DATABASE_URL"] = database_url
    return env


def run_python(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-W", "error", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{args[:2]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def migrate(cwd: Path, database_url: str = "") -> None:
    """`python main.py migrate`, as an operator runs it."""
    run_python([str(ROOT / "main.py"), "migrate"], cwd, pombo_env(cwd, database_url))


def generate(cwd: Path, database_url: str = "") -> None:
    run_python(["-c", GENERATE, str(ROOT)], cwd, pombo_env(cwd, database_url))


def diff(migrated: dict[str, Any], generated: dict[str, Any]) -> str:
    """Only what differs, so a failure names the column or index at fault."""
    lines = []
    for key in migrated:
        lines += [
            f"{key} only from migrations: {row}" for row in sorted(migrated[key] - generated[key], key=str)
        ]
        lines += [f"{key} only from models: {row}" for row in sorted(generated[key] - migrated[key], key=str)]
    return "\n".join(lines)


# SQLite ---------------------------------------------------------------------------------------


def sqlite_schema(path: Path) -> dict[str, set[tuple[Any, ...]]]:
    """Tables, columns, indexes and foreign keys, ignoring column order and SQLite's own tables."""
    schema: dict[str, set[tuple[Any, ...]]] = {
        "tables": set(),
        "columns": set(),
        "indexes": set(),
        "fks": set(),
    }
    with sqlite3.connect(path) as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            if table.startswith("sqlite_") or table == BOOKKEEPING:
                continue
            schema["tables"].add((table,))
            for _, name, kind, notnull, default, pk in db.execute(f'PRAGMA table_info("{table}")'):
                schema["columns"].add((table, name, kind, notnull, default, pk))
            for _, name, unique, origin, partial in db.execute(f'PRAGMA index_list("{table}")').fetchall():
                info = db.execute(f'PRAGMA index_info("{name}")').fetchall()
                columns = tuple(column for _, _, column in sorted(info))
                # Automatic indexes (UNIQUE, PRIMARY KEY) are numbered by position: know them by content.
                shown = None if name.startswith("sqlite_autoindex_") else name
                schema["indexes"].add((table, shown, unique, origin, partial, columns))
            for row in db.execute(f'PRAGMA foreign_key_list("{table}")'):
                schema["fks"].add((table, *row[2:8]))
    return schema


def sqlite_applied(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT app, name, applied_at FROM {BOOKKEEPING} ORDER BY id").fetchall()


def test_sqlite_migrations_build_the_models_schema_once(tmp_path: Path) -> None:
    (migrated := tmp_path / "migrated").mkdir()
    (generated := tmp_path / "generated").mkdir()
    migrate(migrated)
    generate(generated)
    database = migrated / "pombo.sqlite3"
    from_migrations, from_models = sqlite_schema(database), sqlite_schema(generated / "pombo.sqlite3")
    assert from_migrations["tables"] == {(t,) for t in TABLES}
    assert from_migrations == from_models, diff(from_migrations, from_models)

    # A second run (every restart does one) changes nothing and keeps the data.
    applied = sqlite_applied(database)
    assert [name for _, name, _ in applied] == MIGRATION_FILES
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO event_logs (name, last_seq) VALUES ('queue:kept', 7)")
    migrate(migrated)
    assert sqlite_schema(database) == from_migrations
    assert sqlite_applied(database) == applied
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT name, last_seq FROM event_logs").fetchall() == [("queue:kept", 7)]


def test_sqlite_settings_stored_before_the_bounds_are_brought_within_them(tmp_path: Path) -> None:
    """What SQLite kept before the API refused it (PostgreSQL never could) reads back after 0002."""
    migrate(tmp_path)
    database = tmp_path / "pombo.sqlite3"
    queue = (
        "INSERT INTO queues (name, description, owner, visibility_timeout, max_attempts, backoff_base, "
        "backoff_max, retention_seconds, alert_after, alert_active, dead_letter_urgent, created_at, "
        "updated_at) VALUES (?, ?, 'o', 30, 5, 1, 300, ?, ?, 0, 0, '2026-01-01', '2026-01-01')"
    )
    with sqlite3.connect(database) as db:  # as an older release left them, before 0002
        db.execute(queue, ("extreme", "a\x00b", 10**15, 2**62))
        db.execute(queue, ("fine", "ok", 0, None))
        db.execute(f"DELETE FROM {BOOKKEEPING} WHERE name = '0002_settings_within_bounds'")
    migrate(tmp_path)
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT name, description, retention_seconds, alert_after FROM queues ORDER BY 1")
        assert rows.fetchall() == [("extreme", "a\ufffdb", 2**31 - 1, 2**31 - 1), ("fine", "ok", 0, None)]


def test_models_have_no_changes_missing_a_migration(tmp_path: Path) -> None:
    """`make migration` would write nothing: every model change has its migration file."""
    done = run_python(["-c", PENDING_CHANGES, str(ROOT)], tmp_path, pombo_env(tmp_path))
    assert done.stdout.strip() == "", f"models.py changed without a migration:\n{done.stdout}"


# PostgreSQL -----------------------------------------------------------------------------------


@pytest.fixture
async def other_pg_url() -> AsyncIterator[str]:
    """A second fresh PostgreSQL database, dropped afterwards (`pg_url` gives only one per test)."""
    need_service("PostgreSQL", 5432)
    name = f"pombo_test_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.close()


PG_COLUMNS = """
    SELECT c.table_name, c.column_name, c.data_type, c.character_maximum_length, c.numeric_precision,
           c.is_nullable, c.column_default, c.is_identity,
           col_description(format('%I.%I', c.table_schema, c.table_name)::regclass, c.ordinal_position)
    FROM information_schema.columns c
    WHERE c.table_schema = 'public' AND c.table_name <> $1
"""
PG_INDEXES = (
    "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename <> $1"
)
PG_CONSTRAINTS = """
    SELECT rel.relname, con.conname, con.contype, pg_get_constraintdef(con.oid)
    FROM pg_constraint con JOIN pg_class rel ON rel.oid = con.conrelid
    JOIN pg_namespace ns ON ns.oid = rel.relnamespace
    WHERE ns.nspname = 'public' AND rel.relname <> $1
"""
PG_TABLES = """
    SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c
    JOIN pg_namespace ns ON ns.oid = c.relnamespace
    WHERE ns.nspname = 'public' AND c.relkind IN ('r', 'p', 'S') AND c.relname NOT LIKE $1 || '%'
"""


async def pg_schema(url: str) -> dict[str, Any]:
    connection = await asyncpg.connect(url)
    try:
        tables = {tuple(r) for r in await connection.fetch(PG_TABLES, BOOKKEEPING)}
        columns = {tuple(r) for r in await connection.fetch(PG_COLUMNS, BOOKKEEPING)}
        indexes = {tuple(r) for r in await connection.fetch(PG_INDEXES, BOOKKEEPING)}
        constraints = {tuple(r) for r in await connection.fetch(PG_CONSTRAINTS, BOOKKEEPING)}
    finally:
        await connection.close()
    return {"tables": tables, "columns": columns, "indexes": indexes, "constraints": constraints}


async def pg_applied(url: str) -> list[tuple[Any, ...]]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(f"SELECT app, name, applied_at FROM {BOOKKEEPING} ORDER BY id")
    finally:
        await connection.close()
    return [tuple(r) for r in rows]


async def test_postgres_migrations_build_the_models_schema_once(
    tmp_path: Path, pg_url: str, other_pg_url: str
) -> None:
    migrate(tmp_path, pg_url)
    generate(tmp_path, other_pg_url)
    from_migrations, from_models = await pg_schema(pg_url), await pg_schema(other_pg_url)
    assert {name for name, _ in from_migrations["tables"]} >= set(TABLES)
    assert from_migrations == from_models, diff(from_migrations, from_models)

    # A second run (every replica's start does one) changes nothing and keeps the data.
    applied = await pg_applied(pg_url)
    assert [name for _, name, _ in applied] == MIGRATION_FILES
    connection = await asyncpg.connect(pg_url)
    try:
        await connection.execute("INSERT INTO event_logs (name, last_seq) VALUES ('queue:kept', 7)")
        migrate(tmp_path, pg_url)
        rows = [tuple(r) for r in await connection.fetch("SELECT name, last_seq FROM event_logs")]
    finally:
        await connection.close()
    assert await pg_schema(pg_url) == from_migrations
    assert await pg_applied(pg_url) == applied
    assert rows == [("queue:kept", 7)]
