"""Logs read back from the database: pages of events after a cursor, and the heads of many logs.

Below the broker and the hub alike, so that both read a log the same way: streams replay and
fill gaps through it, and the broker feeds its subscribers through it while Redis is away.
"""

from __future__ import annotations

from collections.abc import Collection

from models import Event, EventLog
from schemas import Update, utc_text

# Logs per head query: well within the bind parameters every database here allows.
HEADS_PER_QUERY = 1000


async def read_page(log: str, after: int, limit: int, upto: int | None = None) -> list[Update]:
    """Up to `limit` events of `log` after `after` (and at most `upto`), in sequence order."""
    query = Event.filter(log=log, seq__gt=after)
    if upto is not None:
        query = query.filter(seq__lte=upto)
    rows = await query.order_by("seq").limit(limit)
    return [Update(e.log, e.seq, e.type, e.data, utc_text(e.at)) for e in rows]


async def read_heads(logs: Collection[str]) -> dict[str, int]:
    """The last sequence number of each log that has one (a log never written is left out)."""
    names, heads = list(logs), {}
    for start in range(0, len(names), HEADS_PER_QUERY):
        chunk = names[start : start + HEADS_PER_QUERY]
        rows = await EventLog.filter(name__in=chunk).values_list("name", "last_seq")
        heads.update({str(name): int(seq) for name, seq in rows})
    return heads
