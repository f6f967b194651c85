"""Settings: bad values stop the start in one clear line; `.env` files; one process per SQLite dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import ADMIN, PG_ADMIN_URL, ROOT, SECRET, free_port, need_service, unique
from tortoise.backends.base.config_generator import expand_db_url

from main import FIRST_TOKEN_COMMAND
from settings import Settings, SettingsError, load_settings, tortoise_config

PG_URL = "postgres://postgres@127.0.0.1:5432/pombo_never_created"
UNREACHABLE = f"postgres://postgres@127.0.0.1:{free_port()}/pombo"  # nothing listens there
SHORT_SECRET = "tooshort-s3cr3t"
HANG_LIMIT = 4  # seconds alive without using any CPU: a hung start, however busy the machine


def clean_env(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without its POMBO_ settings, then these (an empty value unsets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POMBO_")}
    env.update({"POMBO_JWT_SECRET": SECRET, "POMBO_ENVIRONMENT": "test", **settings})
    return {k: v for k, v in env.items() if v != ""}


def cpu_ticks(pid: int) -> int:
    """User + system CPU time a process has used so far (it stops moving when the process waits)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return -1
    return int(fields[11]) + int(fields[12])


# case → (environment, the setting the message must name)
BAD_STARTS: dict[str, tuple[dict[str, str], str]] = {
    "port-not-a-number": ({"POMBO_PORT": "abc"}, "POMBO_PORT"),
    "unknown-database": ({"POMBO_DATABASE_URL": "mysql://x"}, "POMBO_DATABASE_URL"),
    "short-secret": ({"POMBO_JWT_SECRET": SHORT_SECRET}, "POMBO_JWT_SECRET"),
    "postgres-without-secret": ({"POMBO_DATABASE_URL": PG_URL, "POMBO_JWT_SECRET": ""}, "POMBO_JWT_SECRET"),
    "postgres-unreachable": ({"POMBO_DATABASE_URL": UNREACHABLE}, "POMBO_DATABASE_URL"),
    "unknown-environment": ({"POMBO_ENVIRONMENT": "staging"}, "POMBO_ENVIRONMENT"),
    "unsafe-algorithm": ({"POMBO_JWT_ALGORITHM": "none"}, "POMBO_JWT_ALGORITHM"),
    "bad-anonymous-scope": ({"POMBO_ANONYMOUS_SCOPES": "read:*"}, "POMBO_ANONYMOUS_SCOPES"),
    # Set per run below: a data dir that is a file, a SQLite file under a file.
    "data-dir-is-a-file": ({}, "POMBO_DATA_DIR"),
    "sqlite-path-impossible": ({}, "POMBO_DATABASE_URL"),
}


@pytest.fixture(scope="module")
def bad_starts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int | None, str, str]]:
    """`python main.py serve` with each bad setting, all at once: case → (status, stdout, stderr).

    The status is None for a start that hung: alive, and idle for HANG_LIMIT seconds.
    """
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    results: dict[str, tuple[int | None, str, str]] = {}
    try:
        for case, (settings, _) in BAD_STARTS.items():
            cwd = tmp_path_factory.mktemp(case)
            (cwd / "a-file").write_text("not a directory\n")
            where = {
                "data-dir-is-a-file": {"POMBO_DATA_DIR": str(cwd / "a-file")},
                "sqlite-path-impossible": {"POMBO_DATABASE_URL": f"sqlite://{cwd / 'a-file' / 'db.sqlite3'}"},
            }.get(case, {})
            env = clean_env(
                {"POMBO_DATA_DIR": str(cwd / "data"), "POMBO_PORT": str(free_port()), **settings, **where}
            )
            with (cwd / "stdout").open("wb") as out, (cwd / "stderr").open("wb") as err:
                command = [sys.executable, str(ROOT / "main.py"), "serve"]
                running[case] = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err), cwd
        busy = {case: (-1, time.monotonic()) for case in running}  # CPU ticks, when they last moved
        while len(results) < len(running):
            for case, (process, cwd) in running.items():
                if case in results:
                    continue
                if process.poll() is None:
                    ticks, since = busy[case]
                    now, used = time.monotonic(), cpu_ticks(process.pid)
                    if used != ticks:
                        busy[case] = (used, now)
                    if used != ticks or now - since < HANG_LIMIT:
                        continue
                    process.kill()
                status = process.wait()
                out, err = ((cwd / name).read_text(errors="replace") for name in ("stdout", "stderr"))
                results[case] = (None if status == -signal.SIGKILL else status, out, err)
            time.sleep(0.1)
    finally:
        for process, _ in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


@pytest.mark.parametrize("case", list(BAD_STARTS))
def test_a_bad_setting_stops_the_start_in_one_line(
    bad_starts: dict[str, tuple[int | None, str, str]], case: str
) -> None:
    status, out, err = bad_starts[case]
    assert status is not None, f"still running, idle for {HANG_LIMIT} s, so killed: {err[-500:]}"
    assert status == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert BAD_STARTS[case][1] in lines[0]
    assert SHORT_SECRET not in lines[0]  # a bad secret is named, never printed


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A small file system mounted read-only, as a volume can be: even root cannot write to it."""
    mount = tmp_path / "read-only"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize(
    ("where", "named"),
    [("data", "POMBO_DATA_DIR"), ("database", "POMBO_DATABASE_URL")],
)
def test_a_read_only_place_stops_the_start_in_one_line(
    read_only_mount: Path, tmp_path: Path, where: str, named: str
) -> None:
    settings = {"POMBO_DATA_DIR": str(read_only_mount), "POMBO_PORT": str(free_port())}
    if where == "database":
        settings |= {
            "POMBO_DATA_DIR": str(tmp_path / "data"),
            "POMBO_DATABASE_URL": f"sqlite://{read_only_mount}/p.db",
        }
    command = [sys.executable, str(ROOT / "main.py"), "serve"]
    done = subprocess.run(command, cwd=tmp_path, env=clean_env(settings), capture_output=True, timeout=60)
    assert done.returncode == 2, done.stderr.decode()
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "read-only file system" in lines[0], lines


# .env files ------------------------------------------------------------------------------------


@pytest.fixture
def no_pombo_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("POMBO_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_env_files_are_read_and_the_environment_file_wins(
    no_pombo_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (no_pombo_env / ".env").write_text(
        "POMBO_ENVIRONMENT=production\nPOMBO_PORT=9001\nPOMBO_HOST=0.0.0.0\nPOMBO_RETRY_MS=1234\n"
    )
    (no_pombo_env / ".env.production").write_text("POMBO_PORT=9002\nPOMBO_HOST=10.0.0.2\n")
    (no_pombo_env / ".env.test").write_text("POMBO_PORT=9003\n")

    settings = load_settings()
    assert settings.environment == "production"
    assert (settings.port, settings.host, settings.retry_ms) == (9002, "10.0.0.2", 1234)
    assert settings.json_logs  # production's default

    # The process environment beats both files, and picks which environment file applies.
    monkeypatch.setenv("POMBO_HOST", "127.0.0.9")
    monkeypatch.setenv("POMBO_ENVIRONMENT", "test")
    settings = load_settings()
    assert (settings.environment, settings.port, settings.host) == ("test", 9003, "127.0.0.9")


def test_a_bad_value_in_an_env_file_names_the_setting(no_pombo_env: Path) -> None:
    (no_pombo_env / ".env").write_text("POMBO_HEARTBEAT_SECONDS=0\n")
    with pytest.raises(SettingsError, match="POMBO_HEARTBEAT_SECONDS"):
        load_settings()


def test_the_count_cache_is_on_by_default_and_can_be_turned_off(
    no_pombo_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings().count_cache
    monkeypatch.setenv("POMBO_COUNT_CACHE", "false")
    assert not load_settings().count_cache
    monkeypatch.setenv("POMBO_COUNT_CACHE", "sometimes")
    with pytest.raises(SettingsError, match="POMBO_COUNT_CACHE"):
        load_settings()


async def test_the_server_reads_env_files_in_its_working_directory(make_server: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "served"  # the server's working directory (see conftest)
    data_dir.mkdir()
    (data_dir / ".env").write_text("POMBO_ANONYMOUS_SCOPES=publish:*\nPOMBO_RETRY_MS=1234\n")
    (data_dir / ".env.test").write_text('POMBO_ANONYMOUS_SCOPES="subscribe:*"\n')
    server = make_server(data_dir=data_dir, POMBO_ENVIRONMENT="test").start()
    async with server.client(headers={}) as http:
        me = await http.get("/api/v1/me")
        assert me.status_code == 200, me.text
        assert me.json()["scopes"] == ["subscribe:*"]
        queue = unique()
        assert (await http.post("/api/v1/queues", json={"name": queue}, headers=ADMIN)).status_code == 201
        async with http.stream("GET", f"/api/v1/queues/{queue}/stream") as stream:
            assert stream.status_code == 200
            assert (await anext(stream.aiter_text())).startswith("retry: 1234")


# One process per SQLite data dir ----------------------------------------------------------------


async def test_a_second_server_on_the_same_sqlite_dir_refuses_to_start(make_server: Any) -> None:
    first = make_server().start()
    second = make_server(data_dir=first.data_dir).start(wait=False)
    assert second.process is not None
    assert second.process.wait(timeout=30) == 2
    lines = second.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert "another Pombo process" in lines[0] and str(first.data_dir) in lines[0]
    assert "PostgreSQL" in lines[0]  # it says what to do instead

    async with httpx.AsyncClient(base_url=first.url, headers=ADMIN, timeout=10) as http:
        queue = unique()
        assert (await http.post(f"/api/v1/queues/{queue}/messages", content="still here")).status_code == 201
        listed = await http.get(f"/api/v1/queues/{queue}/messages")
        assert [m["body"] for m in listed.json()["items"]] == ["still here"]

    # The lock goes with the process: once the first stops, the data dir is free again.
    first.stop()
    second.start()
    async with httpx.AsyncClient(base_url=second.url, headers=ADMIN, timeout=10) as http:
        listed = await http.get(f"/api/v1/queues/{queue}/messages")
        assert [m["body"] for m in listed.json()["items"]] == ["still here"]


def test_the_database_password_may_come_from_a_docker_secret(tmp_path: Path) -> None:
    (tmp_path / "pombo_database_password").write_text("p@ss/w:rd\n")
    settings = Settings(
        _secrets_dir=tmp_path, database_url="postgres://pombo@db:5432/pombo", jwt_secret=SECRET
    )
    credentials = expand_db_url(tortoise_config(settings)["connections"]["default"])["credentials"]
    assert (credentials["user"], credentials["password"], credentials["host"]) == ("pombo", "p@ss/w:rd", "db")
    given = Settings(
        database_url="postgres://pombo:own@db/pombo", database_password="other", jwt_secret=SECRET
    )
    assert given.database == "postgres://pombo:own@db/pombo"  # a password in the URL wins


async def test_a_first_start_on_postgres_creates_its_database_and_says_how_to_get_a_token(
    make_server: Any,
) -> None:
    need_service("PostgreSQL", 5432)
    name = f"pombo_created_{unique('db').replace('-', '_')}"
    server = make_server(database_url=PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        server.start()
        async with server.client() as http:
            assert (await http.post("/api/v1/queues/first/messages", content="hello")).status_code == 201
        assert f"created the database {name}" in server.log()
        assert f"no tokens yet: make an admin one with: {FIRST_TOKEN_COMMAND}" in server.log()
    finally:
        server.stop()
        admin = await asyncpg.connect(PG_ADMIN_URL)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
