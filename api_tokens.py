"""Routes for admins to mint, list and revoke tokens."""

from __future__ import annotations

from fastapi import APIRouter

from auth import parse_scopes
from deps import AuthFirst, CurrentPrincipal, ResourceId, TokensDep, WindowDep
from errors import answers, validation_error
from schemas import MintedTokenOut, Page, TokenIn, TokenOut, token_lifetime

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"], route_class=AuthFirst)


@router.post("", status_code=201, responses=answers(403))
async def mint_token(body: TokenIn, tokens: TokensDep, principal: CurrentPrincipal) -> MintedTokenOut:
    """The token is in this answer only: Pombo keeps its id, subject, scopes and expiry."""
    principal.require_scope("admin")
    try:
        scopes, ttl = parse_scopes(body.scope), token_lifetime(body.ttl)
    except ValueError as error:
        raise validation_error({"body": [str(error)]}) from None
    minted = await tokens.mint(body.sub, scopes, ttl)
    return MintedTokenOut(
        id=minted.token_id,
        subject=minted.subject,
        scopes=sorted(minted.scopes),
        created_at=minted.issued_at,
        expires_at=minted.expires_at,
        revoked_at=None,
        token=minted.token,
    )


@router.get("", responses=answers(403))
async def list_tokens(tokens: TokensDep, principal: CurrentPrincipal, window: WindowDep) -> Page[TokenOut]:
    principal.require_scope("admin")
    items, total = await tokens.list(window.limit, window.offset)
    return Page.of(items, total, window.limit, window.offset)


@router.delete("/{token_id}", responses=answers(403))
async def revoke_token(token_id: ResourceId, tokens: TokensDep, principal: CurrentPrincipal) -> TokenOut:
    """From now on this token is refused (on other replicas within a sweep, about a second)."""
    principal.require_scope("admin")
    return await tokens.revoke(token_id)
