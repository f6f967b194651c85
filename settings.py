"""Pombo's settings: one typed object, read once, handed to `create_app`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Environment = Literal["development", "test", "production"]
ENV_PREFIX = "POMBO_"
DOCKER_SECRETS = Path("/run/secrets")
KIB = 1024
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


class SettingsError(Exception):
    """A setting with a bad value; the message names it in one line."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    environment: Environment = "development"
    data_dir: Path = Path("data")
    # Unset means a SQLite file in the data dir: the one-command embedded default.
    database_url: str = ""
    # Unset means the in-process broker, which serves exactly one process.
    redis_url: str = ""
    redis_prefix: str = Field(default="pombo", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # Kept out of the URL, e.g. as the Docker secret pombo_database_password.
    database_password: SecretStr | None = None
    jwt_secret: SecretStr | None = None
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    anonymous_scopes: str = ""
    # Origins whose pages may call the API and open streams (`https://app.example.com`, comma- or
    # space-separated; `*` for any). None by default: only the API's own origin.
    cors_origins: str = ""
    # Let those pages send cookies and `Authorization` with credentials mode: never with `*`.
    cors_credentials: bool = False
    # Strict-Transport-Security on every response: only once the API is served over HTTPS only.
    hsts: bool = False

    max_body_bytes: int = Field(default=256 * KIB, ge=1)
    max_batch_items: int = Field(default=1000, ge=1, le=10_000)
    max_batch_bytes: int = Field(default=8 * KIB * KIB, ge=1)
    idempotency_seconds: float = Field(default=24 * 3600, gt=0)
    # Checked before an export starts (a clear 400, never a cut-off file). An XLSX is built whole
    # before its first byte: about 40 s for 100,000 rows on 2 busy cores (measured).
    export_max_rows: int = Field(default=100_000, ge=1)

    # Proxies drop idle connections after 30-60 s; 15 s keeps them open cheaply.
    heartbeat_seconds: float = Field(default=15, gt=0)
    retry_ms: int = Field(default=3000, ge=0)
    # A bounded lifetime lets deploys drain; the client resumes without loss.
    stream_lifetime_seconds: float = Field(default=600, gt=0)
    subscriber_buffer: int = Field(default=1000, ge=1)
    # Open streams one subject may hold in each process (0: no cap; admins have none).
    streams_per_subject: int = Field(default=50, ge=0)
    # Logs one stream of several (`GET /api/v1/stream`) may follow: its cursor rides in every
    # frame's `id:` and in the next request's headers, so it stays a few KiB at most.
    stream_max_logs: int = Field(default=50, ge=1)
    # A client that takes no frame for this long is cut: its socket buffer would hold the stream.
    stream_send_timeout_seconds: float = Field(default=30.0, gt=0)
    event_retention_seconds: float = Field(default=7 * 24 * 3600, ge=0)
    # Expired leases come back within about this long.
    sweep_seconds: float = Field(default=1.0, gt=0, le=60)
    retention_sweep_seconds: float = Field(default=60.0, gt=0)

    # FULL: a 2xx means the message survived a power cut. NORMAL is an opt-in.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    writer_batch: int = Field(default=500, ge=1)
    # Queue counts kept under each queue log's head, in Redis or (one process) in memory: a read of
    # the queue list under steady publishing is then a few key lookups instead of a count per read.
    count_cache: bool = True
    # A copy of the SQLite database into the data dir's backups/ this often (0: never), keeping
    # the newest `backup_keep`.
    backup_interval: float = Field(default=0, ge=0)
    backup_keep: int = Field(default=7, ge=1)
    log_json: bool | None = None
    # Log to this file instead of stderr, rotated and pruned in loguru's notation ("100 MB",
    # "1 day", "00:00"; "14 days", "10 files").
    log_file: Path | None = None
    log_rotation: str = "100 MB"
    log_retention: str = "14 days"

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        if url and not url.startswith(("sqlite://", "postgres://", "postgresql://")):
            raise ValueError("must start with sqlite://, postgres:// or postgresql://")
        return url.replace("postgresql://", "postgres://", 1)

    @field_validator("redis_url")
    @classmethod
    def _known_redis(cls, url: str) -> str:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, given: str) -> str:
        for origin in given.replace(",", " ").split():
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin such as https://app.example.com (no path)")
        return given

    @field_validator("jwt_secret")
    @classmethod
    def _strong_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes (try: openssl rand -hex 32)")
        return secret

    @model_validator(mode="after")
    def _replicas_share_a_secret(self) -> Settings:
        # A generated secret would differ per replica: only the embedded default may generate one.
        if not self.is_sqlite and self.jwt_secret is None:
            raise ValueError("POMBO_JWT_SECRET is required with PostgreSQL")
        if self.cors_credentials and "*" in self.allowed_origins:
            raise ValueError("POMBO_CORS_ORIGINS=* cannot go with POMBO_CORS_CREDENTIALS: name the origins")
        if self.backup_interval and self.sqlite_path is None:
            raise ValueError("POMBO_BACKUP_INTERVAL copies a SQLite file: back PostgreSQL up with pg_dump")
        return self

    @property
    def database(self) -> str:
        if not self.database_url:
            return f"sqlite://{self.data_dir / 'pombo.sqlite3'}"
        return _with_password(self.database_url, self.database_password)

    @property
    def is_sqlite(self) -> bool:
        return self.database.startswith("sqlite://")

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, when the database is one (not PostgreSQL, not in memory)."""
        path = self.database.removeprefix("sqlite://").split("?")[0]
        return Path(path) if self.is_sqlite and path != ":memory:" else None

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        return tuple(self.cors_origins.replace(",", " ").split())

    @property
    def json_logs(self) -> bool:
        return self.environment == "production" if self.log_json is None else self.log_json


class ClientSettings(BaseSettings):
    """Where the `publish`, `subscribe` and `work` commands find the server: `POMBO_URL`,
    `POMBO_TOKEN` (options given on the command line win)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    url: str = "http://127.0.0.1:8000"
    token: str | None = None


def load_settings(**overrides: Any) -> Settings:
    """Environment, then `.env.<environment>`, then `.env`, then Docker secrets."""
    environment = overrides.get("environment") or _environment_hint()
    secrets = str(DOCKER_SECRETS) if DOCKER_SECRETS.is_dir() else None
    try:
        return Settings(
            _env_file=(".env", f".env.{environment}"),  # later files win
            _secrets_dir=secrets,
            **overrides,
        )
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


def _environment_hint() -> str:
    value = os.environ.get(f"{ENV_PREFIX}ENVIRONMENT")
    if value is None and Path(".env").is_file():
        for line in Path(".env").read_text().splitlines():
            key, _, rest = line.partition("=")
            if key.strip() == f"{ENV_PREFIX}ENVIRONMENT":
                value = rest.strip().strip("'\"")
    return value or "development"


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    if not first["loc"]:
        return f"invalid settings: {first['msg'].removeprefix('Value error, ')}"
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid setting {ENV_PREFIX}{str(first['loc'][0]).upper()}: {message}"


def _with_password(url: str, password: SecretStr | None) -> str:
    """The URL with `password` in it, unless it names one itself."""
    parts = urlsplit(url)
    if password is None or parts.password is not None or not parts.username:
        return url
    secret = quote(password.get_secret_value().strip(), safe="")
    return urlunsplit(parts._replace(netloc=parts.netloc.replace("@", f":{secret}@", 1)))


def tortoise_config(settings: Settings) -> dict[str, Any]:
    return {
        "connections": {"default": _connection(settings)},
        "apps": {"pombo": {"models": ["models"], "migrations": "migrations"}},
        "use_tz": True,
        "timezone": "UTC",
    }


def _connection(settings: Settings) -> str:
    url = settings.database
    if not settings.is_sqlite:
        # About 5 connections beat 10 on a 2-core machine (measured); a server that does not
        # answer within 2 s is unavailable (a 503 now, rather than a request hung for a minute).
        defaults = {"minsize": "1", "maxsize": "5", "timeout": "2"}
        given = url.partition("?")[2]
        missing = [f"{key}={value}" for key, value in defaults.items() if f"{key}=" not in given]
        separator = "&" if "?" in url else "?"
        return f"{url}{separator}{'&'.join(missing)}" if missing else url
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}journal_mode=WAL&synchronous={settings.sqlite_synchronous}&busy_timeout=5000"


# What `tortoise makemigrations` reads (`make migration`): the models, on a throwaway database.
MIGRATIONS_CONFIG: dict[str, Any] = {
    "connections": {"default": "sqlite://:memory:"},
    "apps": {"pombo": {"models": ["models"], "migrations": "migrations"}},
}
