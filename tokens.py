"""Tokens Pombo minted: recorded so that admins can list and revoke them."""

from __future__ import annotations

from datetime import timedelta
from functools import partial

from tortoise.backends.base.client import BaseDBAsyncClient

from auth import MintedToken, TokenCodec
from errors import not_found
from models import Token, utcnow
from schemas import TokenOut
from writer import Tx, Writer


async def issue_token(
    codec: TokenCodec,
    subject: str,
    scopes: frozenset[str],
    ttl: timedelta,
    conn: BaseDBAsyncClient | None = None,
) -> MintedToken:
    """Mint a token and record it, so it can be listed and revoked later."""
    minted = codec.mint(subject, scopes, ttl)
    await Token.create(
        using_db=conn,
        id=minted.token_id,
        subject=subject,
        scopes=" ".join(sorted(scopes)),
        created_at=minted.issued_at,
        expires_at=minted.expires_at,
    )
    return minted


class Revocations:
    """Revoked token ids, kept in memory: checking them costs no query per request.

    Each replica re-reads them every sweep, so a revocation reaches all replicas within seconds.
    """

    def __init__(self) -> None:
        self._ids: frozenset[str] = frozenset()

    def __contains__(self, token_id: object) -> bool:
        return token_id in self._ids

    def add(self, token_id: str) -> None:
        self._ids = self._ids | {token_id}

    async def refresh(self) -> None:
        # Expired tokens fail on their own; only the still-valid revoked ones need remembering.
        ids = await Token.filter(revoked_at__isnull=False, expires_at__gt=utcnow()).values_list(
            "id", flat=True
        )
        self._ids = frozenset(str(i) for i in ids)


class TokenStore:
    def __init__(self, writer: Writer, codec: TokenCodec, revocations: Revocations) -> None:
        self.writer = writer
        self.codec = codec
        self.revocations = revocations

    async def mint(self, subject: str, scopes: frozenset[str], ttl: timedelta) -> MintedToken:
        async def mint(tx: Tx) -> MintedToken:
            return await issue_token(self.codec, subject, scopes, ttl, tx.conn)

        return await self.writer.run(mint)

    async def list(self, limit: int, offset: int) -> tuple[list[TokenOut], int]:
        total = await Token.all().count()
        rows = await Token.all().order_by("-created_at", "id").offset(offset).limit(limit)
        return [TokenOut.of(row) for row in rows], total

    async def revoke(self, token_id: str) -> TokenOut:
        revoked = await self.writer.run(partial(_revoke, token_id))
        self.revocations.add(token_id)
        return revoked


async def _revoke(token_id: str, tx: Tx) -> TokenOut:
    row = await Token.filter(id=token_id).using_db(tx.conn).first()
    if row is None:
        raise not_found("token", token_id)
    if row.revoked_at is None:
        row.revoked_at = tx.now
        await row.save(using_db=tx.conn, update_fields=["revoked_at"])
    return TokenOut.of(row)
