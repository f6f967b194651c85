"""Routes for workers: claim with a lease, then ack, nack or extend it; redrive the dead."""

from __future__ import annotations

from fastapi import APIRouter

from deps import AuthFirst, CurrentPrincipal, LeasesDep, QueueName, ResourceId
from errors import answers
from leases import Claim, Outcome
from schemas import (
    AckBatchIn,
    ClaimedMessage,
    ClaimIn,
    ExtendIn,
    Items,
    LeaseIn,
    MessageOut,
    NackIn,
    RedriveIn,
)

router = APIRouter(prefix="/api/v1/queues/{queue}", tags=["consume"], route_class=AuthFirst)


@router.post("/claim")
async def claim(
    queue: QueueName, body: ClaimIn, leases: LeasesDep, principal: CurrentPrincipal
) -> Items[ClaimedMessage]:
    """Up to `max` available messages, urgent first then oldest, each under a new lease."""
    principal.require("consume", queue)
    claimed = await leases.claim(queue, Claim(body.max, body.visibility_timeout, body.wait))
    return Items(items=claimed)


@router.post("/messages/{message_id}/ack", responses=answers(409))
async def ack(
    queue: QueueName, message_id: ResourceId, body: LeaseIn, leases: LeasesDep, principal: CurrentPrincipal
) -> MessageOut:
    principal.require("consume", queue)
    [acked] = await leases.ack(queue, [Outcome(message_id, body.lease_id)])
    return acked


@router.post("/ack", responses=answers(409))
async def ack_many(
    queue: QueueName, body: AckBatchIn, leases: LeasesDep, principal: CurrentPrincipal
) -> Items[MessageOut]:
    """Ack many in one transaction: all of them, or none when one lease does not hold."""
    principal.require("consume", queue)
    return Items(items=await leases.ack(queue, [Outcome(item.id, item.lease_id) for item in body.items]))


@router.post("/messages/{message_id}/nack", responses=answers(409))
async def nack(
    queue: QueueName, message_id: ResourceId, body: NackIn, leases: LeasesDep, principal: CurrentPrincipal
) -> MessageOut:
    """Back to pending after the backoff (or `delay`); dead after the last attempt."""
    principal.require("consume", queue)
    return await leases.nack(queue, Outcome(message_id, body.lease_id), body.error, body.delay)


@router.post("/messages/{message_id}/extend", responses=answers(409))
async def extend(
    queue: QueueName, message_id: ResourceId, body: ExtendIn, leases: LeasesDep, principal: CurrentPrincipal
) -> MessageOut:
    principal.require("consume", queue)
    return await leases.extend(queue, Outcome(message_id, body.lease_id), body.visibility_timeout)


@router.post("/redrive")
async def redrive(
    queue: QueueName, body: RedriveIn, leases: LeasesDep, principal: CurrentPrincipal
) -> Items[MessageOut]:
    """Dead messages (all, or the given ids; up to 1,000 a call) back to pending, attempts reset."""
    principal.require("manage", queue)
    return Items(items=await leases.redrive(queue, body.ids))
