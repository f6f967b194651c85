"""Who is calling and what they may do: JWTs, scopes and the principal behind a request."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path

from jose import jwt
from jose.exceptions import JOSEError

from errors import forbidden, unauthorized
from settings import Settings

ACTIONS = frozenset({"publish", "consume", "subscribe", "manage"})
PLAIN_SCOPES = frozenset({"admin", "notify", "metrics"})
ANONYMOUS = "anonymous"
SECRET_FILE = "jwt-secret"
ADMIN_TOKEN_FILE = "admin-token"


def parse_scopes(text: str) -> frozenset[str]:
    """`"publish:builds.* subscribe:*"` → scopes; ValueError names the first bad one."""
    scopes = frozenset(text.split())
    for scope in scopes:
        action, colon, pattern = scope.partition(":")
        if scope in PLAIN_SCOPES or (colon and action in ACTIONS and pattern):
            continue
        raise ValueError(f"unknown scope {scope!r}: use admin, notify, metrics or ACTION:PATTERN")
    return scopes


@dataclass(frozen=True)
class Principal:
    subject: str
    scopes: frozenset[str]
    expires_at: datetime | None = None
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def can(self, action: str, queue: str) -> bool:
        if self.is_admin:
            return True
        for scope in self.scopes:
            granted, _, pattern = scope.partition(":")
            if granted == action and fnmatchcase(queue, pattern):
                return True
        return False

    def require(self, action: str, queue: str) -> None:
        if not self.can(action, queue):
            raise forbidden(f"{action}:{queue}")

    def require_scope(self, scope: str) -> None:
        """A scope that names no queue, such as `notify`."""
        if not (self.is_admin or scope in self.scopes):
            raise forbidden(scope)


@dataclass(frozen=True)
class MintedToken:
    token: str
    token_id: str
    subject: str
    scopes: frozenset[str]
    issued_at: datetime
    expires_at: datetime


class TokenCodec:
    """The JWT library lives behind `mint` and `read`, so it can be swapped in this one file."""

    def __init__(self, secret: str, algorithm: str) -> None:
        self._secret = secret
        self._algorithm = algorithm
        # Verifying a signature costs more than the rest of a publish; tokens repeat a lot.
        self._verified = lru_cache(maxsize=4096)(self._verify)

    def mint(self, subject: str, scopes: frozenset[str], ttl: timedelta) -> MintedToken:
        now = datetime.now(UTC).replace(microsecond=0)
        minted = MintedToken("", secrets.token_hex(16), subject, scopes, now, now + ttl)
        claims = {
            "sub": subject,
            "scope": " ".join(sorted(scopes)),
            "iat": int(now.timestamp()),
            "exp": int(minted.expires_at.timestamp()),
            "jti": minted.token_id,
        }
        token = jwt.encode(claims, self._secret, algorithm=self._algorithm)
        return MintedToken(token, minted.token_id, subject, scopes, now, minted.expires_at)

    def read(self, token: str) -> Principal:
        principal = self._verified(token)
        # A cached verification still expires on time.
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            raise unauthorized("the token is invalid or expired")
        return principal

    def _verify(self, token: str) -> Principal:
        try:
            # Pinning the algorithm refuses `alg: none` and key-confusion tricks.
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[self._algorithm],
                options={"require_exp": True, "require_sub": True},
            )
            scopes = parse_scopes(str(claims.get("scope", "")))
        except (JOSEError, ValueError):
            raise unauthorized("the token is invalid or expired") from None
        expires = datetime.fromtimestamp(int(claims["exp"]), UTC)
        return Principal(str(claims["sub"]), scopes, expires, claims.get("jti"))


def load_secret(settings: Settings) -> tuple[str, bool]:
    """The configured secret, or the one kept in the data dir, or a new one there.

    Returns the secret and whether it was generated just now.
    """
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value(), False
    path = settings.data_dir / SECRET_FILE
    if path.is_file():
        return path.read_text().strip(), False
    secret = secrets.token_hex(32)
    write_private(path, secret + "\n")
    return secret, True


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 0600 from the start, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def anonymous(scopes_text: str) -> Principal | None:
    scopes = parse_scopes(scopes_text)
    return Principal(ANONYMOUS, scopes) if scopes else None
