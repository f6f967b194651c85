"""The event log: what a log is, what its sequence numbers mean, and how it is read back.

Every change appends a typed event to one ordered log: a queue's (`queue:<name>`) or a person's
notification feed (`user:<subject>`). A log numbers its events 1, 2, 3… in commit order: the
writer bumps the log's counter row (`event_logs.last_seq`) inside the transaction that commits
them, under that row's lock. A sequence number is what a stream sends as `id:` and resumes
from. The head, the last number given out, outlives its events: retention trims old events,
never the counter, so a cursor older than the oldest kept event is known to be stale.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime

from tortoise.backends.base.client import BaseDBAsyncClient

from models import Event, EventLog

QUEUE_LOG = "queue:"
USER_LOG = "user:"
# Logs per head query: well within the bind parameters every database here allows.
HEADS_PER_QUERY = 1000


def queue_log(name: str) -> str:
    return f"{QUEUE_LOG}{name}"


def user_log(subject: str) -> str:
    return f"{USER_LOG}{subject}"


def queue_of(log: str) -> str | None:
    """The queue whose log this is, or None for a person's notifications."""
    return log[len(QUEUE_LOG) :] if log.startswith(QUEUE_LOG) else None


@dataclass(slots=True)
class Update:
    """One committed event as the broker carries it; `data` is the JSON text of the resource."""

    log: str
    seq: int
    type: str
    data: str
    at: str
    # Its SSE frames, encoded by the first stream that sends each and shared by the rest: a
    # log's own stream's, and (less its `id:`) a stream of several logs'.
    frame: bytes | None = field(default=None, repr=False, compare=False)
    labelled: bytes | None = field(default=None, repr=False, compare=False)


def utc_text(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def read_page(log: str, after: int, limit: int, upto: int | None = None) -> list[Update]:
    """Up to `limit` events of `log` after `after` (and at most `upto`), in sequence order."""
    query = Event.filter(log=log, seq__gt=after)
    if upto is not None:
        query = query.filter(seq__lte=upto)
    rows = await query.order_by("seq").limit(limit)
    return [Update(e.log, e.seq, e.type, e.data, utc_text(e.at)) for e in rows]


async def count_after(log: str, after: int) -> int:
    """How many retained events of `log` come after `after`."""
    return await Event.filter(log=log, seq__gt=after).count()


async def read_head(log: str) -> int:
    """The last sequence number the log has given out (0 for a log never written)."""
    row = await EventLog.filter(name=log).only("name", "last_seq").first()
    return row.last_seq if row else 0


async def read_bounds(log: str) -> tuple[int, int]:
    """(oldest retained sequence, head sequence); oldest is head + 1 when none is kept."""
    head = await read_head(log)
    first = await Event.filter(log=log).order_by("seq").only("id", "seq").first()
    return (first.seq if first else head + 1), head


async def read_heads(logs: Collection[str]) -> dict[str, int]:
    """The last sequence number of each log that has one (a log never written is left out)."""
    names, heads = list(logs), {}
    for start in range(0, len(names), HEADS_PER_QUERY):
        chunk = names[start : start + HEADS_PER_QUERY]
        rows = await EventLog.filter(name__in=chunk).values_list("name", "last_seq")
        heads.update({str(name): int(seq) for name, seq in rows})
    return heads


async def trim(conn: BaseDBAsyncClient, before: datetime, limit: int) -> int:
    """Drop up to `limit` events of any log older than `before`, oldest first; heads stay."""
    query = Event.filter(at__lt=before).order_by("id").limit(limit).using_db(conn)
    ids = await query.values_list("id", flat=True)
    return await Event.filter(id__in=list(ids)).using_db(conn).delete() if ids else 0


class Heads:
    """Heads of logs known without asking the database, learnt from what was delivered or read.

    Exact for a log whose every event since is delivered here in order, because an event
    committed before another has the lower number; whoever keeps it forgets a log as soon as
    that may no longer hold.
    """

    __slots__ = ("_seqs",)

    def __init__(self) -> None:
        self._seqs: dict[str, int] = {}

    def get(self, log: str) -> int | None:
        return self._seqs.get(log)

    def advance(self, log: str, seq: int) -> None:
        """`seq` is known committed: the head is at least that."""
        if self._seqs.get(log, 0) < seq:
            self._seqs[log] = seq

    def set(self, log: str, seq: int) -> None:
        self._seqs[log] = seq

    def forget(self, log: str) -> None:
        self._seqs.pop(log, None)

    def clear(self) -> None:
        self._seqs.clear()
