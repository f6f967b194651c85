"""Who is calling and what they may do: JWTs, scopes and the principal behind a request."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import Any

from jose import jwt
from jose.exceptions import JOSEError

from errors import forbidden, unauthorized
from schemas import token_subject
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
    """The JWT library lives behind `mint` and `read`, so it can be swapped in this one file.

    Tokens are signed with `secret`; those signed with one of `previous` still verify, so a
    secret can be rotated without signing everyone out. With `issuer` or `audience` set, tokens
    carry them and a token without the same is refused.
    """

    def __init__(
        self,
        secret: str,
        algorithm: str,
        previous: Sequence[str] = (),
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        self._secret = secret
        # A list, tried in order (the current secret first): a single string key the library
        # would first try to read as JSON, and a secret that parses as JSON would change meaning.
        self._keys = [secret, *previous]
        self._algorithm = algorithm
        self._issuer, self._audience = issuer, audience
        # Verifying a signature costs more than the rest of a publish; tokens repeat a lot.
        self._verified = lru_cache(maxsize=4096)(self._verify)

    @classmethod
    def configured(cls, settings: Settings, secret: str) -> TokenCodec:
        """The codec `settings` describe, around the current `secret` (see `load_secret`)."""
        return cls(
            secret,
            settings.jwt_algorithm,
            settings.previous_secrets,
            settings.jwt_issuer,
            settings.jwt_audience,
        )

    def mint(self, subject: str, scopes: frozenset[str], ttl: timedelta) -> MintedToken:
        now = datetime.now(UTC).replace(microsecond=0)
        minted = MintedToken("", secrets.token_hex(16), subject, scopes, now, now + ttl)
        claims: dict[str, str | int] = {
            "sub": subject,
            "scope": " ".join(sorted(scopes)),
            "iat": int(now.timestamp()),
            "exp": int(minted.expires_at.timestamp()),
            "jti": minted.token_id,
        }
        if self._issuer is not None:
            claims["iss"] = self._issuer
        if self._audience is not None:
            claims["aud"] = self._audience
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
            return _principal_of(self._decode(token))
        # Claims of the wrong type or size (`"exp": 1e999`, `"exp": [1]`) get past the library's
        # checks as TypeError or OverflowError: still only a bad token, never a 500.
        except (JOSEError, ValueError, TypeError, OverflowError, OSError):
            raise unauthorized("the token is invalid or expired") from None

    def _decode(self, token: str) -> dict[str, Any]:
        # Pinning the algorithm refuses `alg: none`, RS256 and key-confusion tricks; `nbf` is
        # checked when present. An `aud` the server does not expect is refused (RFC 7519 §4.1.3).
        claims: dict[str, Any] = jwt.decode(
            token,
            self._keys,
            algorithms=[self._algorithm],
            issuer=self._issuer,
            audience=self._audience,
            options={
                "require_exp": True,
                "require_sub": True,
                "require_iss": self._issuer is not None,
                "require_aud": self._audience is not None,
            },
        )
        return claims


def _principal_of(claims: dict[str, Any]) -> Principal:
    """The caller a verified token names (the library checked that `sub` and `jti` are strings);
    ValueError for a subject or scopes Pombo would never mint."""
    scopes = parse_scopes(str(claims.get("scope", "")))
    expires = datetime.fromtimestamp(int(claims["exp"]), UTC)
    return Principal(token_subject(claims["sub"]), scopes, expires, claims.get("jti"))


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
