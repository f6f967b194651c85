"""Pombo's settings: one typed object, read once, handed to `create_app`."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from limits import RateLimitItem, parse_many
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
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
    # Secrets tokens were signed with before this one (space- or comma-separated): their tokens
    # still verify, new ones are signed with POMBO_JWT_SECRET. Drop one once its tokens expired.
    jwt_previous_secrets: SecretStr | None = None
    # When set, tokens are minted with this `iss` / `aud`, and a token without the same is refused.
    jwt_issuer: str | None = Field(default=None, min_length=1, max_length=255)
    jwt_audience: str | None = Field(default=None, min_length=1, max_length=255)
    anonymous_scopes: str = ""
    # Origins whose pages may call the API and open streams (`https://app.example.com`, comma- or
    # space-separated; `*` for any). None by default: only the API's own origin.
    cors_origins: str = ""
    # Let those pages send cookies and `Authorization` with credentials mode: never with `*`.
    cors_credentials: bool = False
    # Strict-Transport-Security on every response: only once the API is served over HTTPS only.
    hsts: bool = False
    # Peers whose X-Forwarded-For is believed (addresses or CIDRs, comma- or space-separated):
    # the reverse proxies in front. Anyone else could write any address there.
    trusted_proxies: str = ""

    # Requests per subject (a token's `sub`; callers without a token by address) in the `limits`
    # notation ("600/minute", "20/second;1000/hour"); empty switches the group off. About a
    # thousand a second for a minute: no script, worker or dashboard of a small team comes near,
    # and no benchmark run either (a publish run sends 20,000 in 5 s); a runaway loop does.
    rate_limit_publish: str = "60000/minute"  # publish, batch (one request each), notifications
    rate_limit_claim: str = "60000/minute"  # claim, ack, nack, extend, batch ack
    rate_limit_read: str = "60000/minute"  # every GET under /api/v1, opening a stream included
    rate_limit_tokens: str = "60/minute"  # minting and revoking tokens
    # Per client address: requests refused for a bad or missing token (10 a second, for a minute).
    rate_limit_auth_failures: str = "600/minute"
    # Admins have no per-subject limits (as they have no stream cap): the operator's own token,
    # which could mint itself another anyway.
    rate_limit_exempt_admins: bool = True

    max_body_bytes: int = Field(default=256 * KIB, ge=1)
    max_batch_items: int = Field(default=1000, ge=1, le=10_000)
    max_batch_bytes: int = Field(default=8 * KIB * KIB, ge=1)
    # A request's body must arrive whole within this long (8 MiB in 60 s is 1.1 Mbit/s), and so
    # must its head: a client that trickles either is cut with 408 rather than held.
    read_timeout_seconds: float = Field(default=60, gt=0, le=3600)
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
    # Prometheus figures at /metrics (false: nothing is collected and /metrics is 404). Reading
    # them takes the `metrics` scope unless they are public; at most `metrics_queues` queues are
    # named, the busiest, so that thousands of queues do not make thousands of series.
    metrics: bool = True
    metrics_public: bool = False
    metrics_queues: int = Field(default=20, ge=0, le=1000)
    log_json: bool | None = None
    # Log to this file instead of stderr, rotated and pruned in loguru's notation ("100 MB",
    # "1 day", "00:00"; "14 days", "10 files").
    log_file: Path | None = None
    log_rotation: str = "100 MB"
    log_retention: str = "14 days"
    # OpenTelemetry's own variables, read here only to switch tracing on (tracing.py); the SDK
    # reads the endpoint and the other OTEL_* variables itself.
    otel_exporter_otlp_endpoint: str = Field(
        default="",
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "otel_exporter_otlp_endpoint"),
    )
    otel_service_name: str = Field(
        default="pombo", validation_alias=AliasChoices("OTEL_SERVICE_NAME", "otel_service_name")
    )

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

    @field_validator(
        "rate_limit_publish",
        "rate_limit_claim",
        "rate_limit_read",
        "rate_limit_tokens",
        "rate_limit_auth_failures",
    )
    @classmethod
    def _rate_limit(cls, given: str) -> str:
        rate_limits(given)
        return given

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, given: str) -> str:
        proxy_networks(given)
        return given

    @field_validator("jwt_secret")
    @classmethod
    def _strong_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None:
            _strong(secret.get_secret_value())
        return secret

    @field_validator("jwt_previous_secrets")
    @classmethod
    def _strong_secrets(cls, given: SecretStr | None) -> SecretStr | None:
        for secret in _secrets(given):
            _strong(secret, "each ")
        return given

    @field_validator("jwt_issuer", "jwt_audience", mode="before")
    @classmethod
    def _empty_is_unset(cls, given: str | None) -> str | None:
        return given or None

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
    def previous_secrets(self) -> tuple[str, ...]:
        return _secrets(self.jwt_previous_secrets)

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        return tuple(self.cors_origins.replace(",", " ").split())

    @property
    def json_logs(self) -> bool:
        return self.environment == "production" if self.log_json is None else self.log_json


def rate_limits(given: str) -> list[RateLimitItem]:
    """`"20/second;1000/hour"` as limits' items; empty: none. ValueError for anything else."""
    if not given.strip():
        return []
    try:
        items = parse_many(given)
    except ValueError:
        example = "600/minute or 20/second;1000/hour"
        raise ValueError(f"{given!r} is not in the limits notation, e.g. {example}") from None
    if any(item.amount < 1 for item in items):
        raise ValueError(f"{given!r} allows nothing: use an empty value to switch the limit off")
    return items


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_networks(given: str) -> tuple[Network, ...]:
    """`"10.0.0.0/8, 127.0.0.1"` as networks; ValueError names the first that is none."""
    networks = []
    for text in given.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an address or a network such as 10.0.0.0/8") from None
    return tuple(networks)


def _secrets(given: SecretStr | None) -> tuple[str, ...]:
    """The secrets of `POMBO_JWT_PREVIOUS_SECRETS`, separated by spaces or commas."""
    return tuple(given.get_secret_value().replace(",", " ").split()) if given is not None else ()


def _strong(secret: str, each: str = "") -> None:
    if len(secret.encode()) < 32:
        raise ValueError(f"{each}must be at least 32 bytes (try: openssl rand -hex 32)")


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
        # answer within 2 s is unavailable (a 503 now, rather than a request hung for a minute),
        # and so is one that takes a statement and then says nothing for 5 s (its host hangs,
        # the network drops packets): no statement of ours takes that long on a server at work.
        defaults = {"minsize": "1", "maxsize": "5", "timeout": "2", "command_timeout": "5"}
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
