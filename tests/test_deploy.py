"""Deployment files: docker-compose.yml, the Dockerfile, deploy/nginx.conf, deploy/make-secrets.

No Docker engine is needed: the compose file is checked by Compose's own validator where one is
installed (`docker compose` or Debian's `docker-compose`), the proxy's config by `nginx -t`.
Without them these two tests skip, or fail under POMBO_TEST_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import ROOT, need_tool

import dashboard
from settings import ENV_PREFIX, Settings

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
MAKE_SECRETS = ROOT / "deploy" / "make-secrets"
APP_PORT = 8000
HOUR = 3600


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def replicas() -> dict[str, dict[str, Any]]:
    """The services that run Pombo: the ones built from this repository."""
    return {name: service for name, service in compose()["services"].items() if "build" in service}


def compose_validators() -> list[list[str]]:
    found = []
    if shutil.which("docker") and run("docker", "compose", "version").returncode == 0:
        found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    if not found:
        need_tool("docker-compose")
    return found


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


def test_compose_validates_and_its_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("restart:", "restart_policy:", 1))
    for validator in compose_validators():
        good = run(*validator, "-f", str(COMPOSE), "config", "--quiet")
        assert good.returncode == 0, f"{' '.join(validator)}: {good.stderr}"
        bad = run(*validator, "-f", str(broken), "config", "--quiet")
        assert bad.returncode != 0, f"{' '.join(validator)} accepted an unknown key"


def test_two_replicas_of_one_image_behind_one_published_port() -> None:
    services = compose()["services"]
    apps = replicas()
    assert len(apps) == 2
    assert len({(str(app["build"]), app["image"]) for app in apps.values()}) == 1
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert list(published) == ["proxy"], "only the proxy publishes a port: replicas would collide"
    assert published["proxy"] == ["${POMBO_PORT:-8000}:8080"]
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", NGINX_CONF.read_text(), re.MULTILINE)
    assert sorted(upstreams) == sorted((name, str(APP_PORT)) for name in apps)
    assert set(services["proxy"]["depends_on"]) == set(apps)


def test_replicas_share_postgresql_and_redis() -> None:
    for app in replicas().values():
        environment = app["environment"]
        assert urlsplit(environment["POMBO_DATABASE_URL"]).hostname == "postgres"
        assert urlsplit(environment["POMBO_REDIS_URL"]).hostname == "redis"
        assert app["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }


def test_every_service_restarts_and_has_a_healthcheck() -> None:
    for name, service in compose()["services"].items():
        assert service.get("restart") == "unless-stopped", name
        check = service.get("healthcheck", {})
        assert check.get("test") and check.get("start_period") and check.get("retries"), name


def test_replica_and_image_healthchecks_are_liveness() -> None:
    for app in replicas().values():
        assert "/healthz" in " ".join(app["healthcheck"]["test"])
    healthcheck = re.search(r"^HEALTHCHECK .*?(?<!\\)$", DOCKERFILE.read_text(), re.MULTILINE | re.DOTALL)
    assert healthcheck is not None and "/healthz" in healthcheck.group(0)


def test_no_password_or_secret_in_the_compose_file() -> None:
    text = COMPOSE.read_text()
    loaded = compose()
    for service in loaded["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|KEY", key):
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), key
            if "://" in str(value):
                assert urlsplit(str(value)).password is None, key
    assert not re.search(r"[0-9a-f]{32}", text), "a literal that looks like a generated secret"
    assert all(set(secret) == {"file"} for secret in loaded["secrets"].values())


def test_secrets_reach_the_names_the_settings_read() -> None:
    fields = {f"{ENV_PREFIX.lower()}{name}" for name in Settings.model_fields}
    for app in replicas().values():
        targets = {entry["source"]: entry["target"] for entry in app["secrets"]}
        assert targets == {"jwt_secret": "pombo_jwt_secret", "postgres_password": "pombo_database_password"}
        assert set(targets.values()) <= fields
    postgres = compose()["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert postgres["secrets"] == ["postgres_password"]


def test_secret_files_are_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git work tree")
    for secret in compose()["secrets"].values():
        path = Path(secret["file"])
        assert run("git", "check-ignore", "-q", str(path)).returncode == 0, f"{path} is not ignored by git"


def test_image_runs_as_a_fixed_non_root_user() -> None:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric uid lets a runtime check it is not root"


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if re.match(r"(COPY|RUN) ", line)]
    install = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert lines[install - 1] == "COPY requirements.txt ./"
    assert all("*.py" not in line for line in lines[:install])


def copied_into_the_image() -> set[str]:
    return set(re.findall(r"^COPY\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE))


def test_only_what_the_image_needs_reaches_the_builder() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "start from nothing: secrets/, data/ and .env never reach a builder"
    included = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert included == copied_into_the_image()


def test_the_image_carries_the_dashboards_files() -> None:
    # Without them the app does not start: the dashboard's mount checks its directory at startup.
    assert dashboard.FILES.relative_to(ROOT).as_posix() in copied_into_the_image()


def make_secrets(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "deploy").mkdir(exist_ok=True)
    script = tmp_path / "deploy" / "make-secrets"
    shutil.copy(MAKE_SECRETS, script)
    return subprocess.run(["sh", str(script)], capture_output=True, text=True, cwd="/")


def test_make_secrets_writes_random_secrets_only_their_owner_can_reach(tmp_path: Path) -> None:
    made = make_secrets(tmp_path)
    assert made.returncode == 0, made.stderr
    directory = tmp_path / "secrets"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    values = []
    for name in ("jwt_secret", "postgres_password"):
        path = directory / name
        # Readable inside the containers, where Compose bind-mounts the file with these bits for
        # the app's own (non-root) user; on the host, the 0700 directory keeps others out.
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        values.append(path.read_text().strip())
    assert all(re.fullmatch(r"[0-9a-f]{64}", value) for value in values)
    assert values[0] != values[1]
    assert len(values[0]) >= 32  # what settings.py asks of a JWT secret


def test_make_secrets_never_replaces_a_secret(tmp_path: Path) -> None:
    assert make_secrets(tmp_path).returncode == 0
    directory = tmp_path / "secrets"
    before = {path.name: path.read_text() for path in directory.iterdir()}

    again = make_secrets(tmp_path)
    assert again.returncode != 0 and "exists" in again.stderr
    assert {path.name: path.read_text() for path in directory.iterdir()} == before

    (directory / "postgres_password").unlink()
    refill = make_secrets(tmp_path)
    assert refill.returncode == 0
    assert (directory / "jwt_secret").read_text() == before["jwt_secret"]
    assert (directory / "postgres_password").read_text() != before["postgres_password"]


def nginx_directives() -> dict[str, list[str]]:
    """Each directive of deploy/nginx.conf with the values it is given (comments left out)."""
    found: dict[str, list[str]] = {}
    for line in NGINX_CONF.read_text().splitlines():
        statement = line.split("#", 1)[0].strip()
        if statement.endswith(";"):
            name, _, value = statement.removesuffix(";").partition(" ")
            found.setdefault(name, []).append(value.strip())
    return found


def test_the_proxy_passes_streams_through_unbuffered() -> None:
    directives = nginx_directives()
    assert directives["proxy_buffering"] == ["off"]
    assert directives["proxy_http_version"] == ["1.1"]
    (read_timeout,) = directives["proxy_read_timeout"]
    assert int(read_timeout.removesuffix("s")) >= HOUR
    headers = dict(value.split(None, 1) for value in directives["proxy_set_header"])
    assert headers["Connection"] == '""'
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert "X-Request-ID" in headers


def test_the_proxy_gives_up_on_a_stopped_replica_within_seconds() -> None:
    (connect_timeout,) = nginx_directives()["proxy_connect_timeout"]
    assert int(connect_timeout.removesuffix("s")) <= 2


def test_the_proxy_takes_the_largest_body_a_replica_takes() -> None:
    (limit,) = nginx_directives()["client_max_body_size"]
    assert limit.endswith("m") and int(limit[:-1]) * 2**20 > Settings.model_fields["max_batch_bytes"].default


def test_the_proxy_never_logs_query_strings() -> None:
    log_format = re.search(r"log_format\s+\w+(.*?);", NGINX_CONF.read_text(), re.DOTALL)
    assert log_format is not None
    assert "$uri" in log_format.group(1)
    assert not re.search(r"\$(request|request_uri|args|query_string)\b", log_format.group(1))
    # nginx's own error lines quote the whole request line: only levels that never name a request.
    (error_log,) = nginx_directives()["error_log"]
    assert error_log.split()[-1] in {"crit", "alert", "emerg"}


def test_the_proxy_may_open_the_files_it_is_configured_for() -> None:
    (files,) = nginx_directives()["worker_rlimit_nofile"]
    assert compose()["services"]["proxy"]["ulimits"]["nofile"] == int(files)


def test_nginx_accepts_the_proxy_config(tmp_path: Path) -> None:
    need_tool("nginx")
    version = run("nginx", "-v").stderr
    numbers = tuple(int(n) for n in re.findall(r"nginx/(\d+)\.(\d+)\.(\d+)", version)[0])
    config = NGINX_CONF.read_text()
    # The replicas' names resolve only on the compose network: here they are this machine.
    for name in replicas():
        config = config.replace(f"{name}:{APP_PORT}", f"127.0.0.1:{APP_PORT}")
    if numbers < (1, 27, 3):  # `resolve` in an upstream is in open-source nginx since 1.27.3
        config = config.replace(" resolve;", ";")
    conf, log, pid = tmp_path / "nginx.conf", tmp_path / "error.log", tmp_path / "nginx.pid"
    conf.write_text(config)
    # Files of the test's own, so that a user other than root can check it too.
    checked = run("nginx", "-t", "-p", f"{tmp_path}/", "-c", str(conf), "-e", str(log), "-g", f"pid {pid};")
    assert checked.returncode == 0, checked.stderr
