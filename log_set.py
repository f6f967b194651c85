"""The logs one stream follows at once (`GET /api/v1/stream`): queues named outright, queue
patterns, the caller's notifications; and their cursor, a vector of positions.

A log goes by a label there: a queue by its name, the caller's notification feed as
`@notifications`. The cursor names each log's last sequence: `orders:41,billing:7,@notifications:3`
(queue names hold neither `,` nor `:`), so one `Last-Event-ID` resumes every log at once.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from auth import Principal
from event_log import queue_log, queue_of, user_log
from models import QUEUE_NAME_PATTERN

NOTIFICATIONS = "@notifications"
# A queue pattern: the characters of a queue name, and at least one `*` or `?` (shell globs,
# where `*` also matches dots, as in scopes).
PATTERN = r"^(?=.*[*?])[a-z0-9._*?-]{1,64}$"
_LABEL = f"(?:{NOTIFICATIONS}|{QUEUE_NAME_PATTERN.strip('^$')}):[0-9]{{1,19}}"
# The cursor as the stream writes it (a reader also takes spaces around its pairs).
CURSOR_PATTERN = f"^{_LABEL}(?:,{_LABEL})*$"
_QUEUE = re.compile(QUEUE_NAME_PATTERN)
_PATTERN = re.compile(PATTERN)


def label_of(log: str) -> str:
    """A log's name in a cursor vector and in the `log` of its events."""
    queue = queue_of(log)
    return NOTIFICATIONS if queue is None else queue


def log_of(label: str, subject: str) -> str:
    return user_log(subject) if label == NOTIFICATIONS else queue_log(label)


def cursor_text(positions: Mapping[str, int]) -> str:
    """The vector for positions by log, in their order."""
    return ",".join(f"{label_of(log)}:{seq}" for log, seq in positions.items())


def read_cursor(text: str, read_seq: Callable[[str], int | None]) -> dict[str, int] | None:
    """Positions by label, or None unless every pair is `label:seq` and each label comes once."""
    positions: dict[str, int] = {}
    for pair in text.strip().split(","):
        label, colon, given = pair.strip().partition(":")
        seq = read_seq(given)
        known = label == NOTIFICATIONS or _QUEUE.fullmatch(label) is not None
        if not colon or seq is None or not known or label in positions:
            return None
        positions[label] = seq
    return positions


def is_pattern(name: str) -> bool:
    return _PATTERN.fullmatch(name) is not None


@dataclass(frozen=True)
class QueuePatterns:
    """Queue patterns a stream follows: every live queue that matches one and that the caller
    may subscribe to, including queues created (or restored) after the stream began."""

    patterns: tuple[str, ...]
    principal: Principal
    # The names of the live queues, read from the database.
    live_queues: Callable[[], Awaitable[Iterable[str]]]

    def joins(self, log: str) -> bool:
        """Whether a queue log that becomes live is one to take on."""
        queue = queue_of(log)
        if queue is None or not any(fnmatchcase(queue, pattern) for pattern in self.patterns):
            return False
        return self.principal.can("subscribe", queue)

    async def matching(self) -> list[str]:
        """The logs of the live queues the patterns take on now, by name."""
        return [log for log in map(queue_log, sorted(await self.live_queues())) if self.joins(log)]
