"""Catch-up reads shared by a crowd: `SharedReads`, through which this process's streams make
each read of a log (a page after a cursor, its bounds, its head) once for all who want it.

The reads themselves are the log's own (`event_log`); what is here is how a thousand streams
resuming at once share them: a bound on reads at once, one read per key, pages kept briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Any, TypeVar

from event_log import Update, read_bounds, read_head, read_page

# Database reads at once, however many streams catch up: the rest queue, and most of them then
# share a read instead of making their own.
SHARED_READS = 4
# How long a finished page is kept for streams that ask for it just after (a storm's stragglers),
# and how many at most.
KEEP_SECONDS = 2.0
KEEP_PAGES = 64

PageKey = tuple[str, int, int, int | None]
T = TypeVar("T")


class Page:
    """Events read once and shared by every stream replaying the same range."""

    __slots__ = ("__weakref__", "chunks", "updates")

    def __init__(self, updates: list[Update]) -> None:
        self.updates = updates
        # The page's SSE frames joined into a few large writes, by the first stream that sends it.
        self.chunks: list[bytes] | None = None


class _Abandoned(Exception):
    """The caller reading for others went away before its read began."""


class _Read:
    """One read in progress, and when it began: a counter that only grows, unset while queued."""

    __slots__ = ("began", "result")

    def __init__(self, result: asyncio.Future[Any]) -> None:
        self.result = result
        self.began = math.inf


def _complete(key: PageKey, page: Page) -> bool:
    """A full page, or one bounded by `upto`: later commits cannot change it."""
    return len(page.updates) == key[2] or key[3] is not None


class SharedReads:
    """A process's reads of logs for its streams, each made once for all who want the same.

    A caller may take any read that began after it asked. A read that began before may have
    missed a commit the caller must see (a stream asks after subscribing, and what is committed
    after that reaches it live), so it is taken only when its result cannot have changed: a full
    page, or one bounded by `upto`. The semaphore bounds the reads at once; those who come while
    all are taken queue behind one read per key, and share it.
    """

    def __init__(self, reads: int = SHARED_READS) -> None:
        self._reads = asyncio.Semaphore(reads)
        self._begun = 0
        self._pending: dict[Hashable, _Read] = {}
        self._in_use: weakref.WeakValueDictionary[PageKey, Page] = weakref.WeakValueDictionary()
        self._kept: OrderedDict[PageKey, Page] = OrderedDict()

    async def page(self, log: str, after: int, limit: int, upto: int | None = None) -> Page:
        """`read_page`, shared."""
        key = (log, after, limit, upto)
        page = self._in_use.get(key)
        if page is not None:
            return page
        return await self.shared(key, partial(self._read_page, key), partial(_complete, key))

    async def bounds(self, log: str) -> tuple[int, int]:
        """`read_bounds`, shared."""
        return await self.shared(("bounds", log), partial(read_bounds, log))

    async def head(self, log: str) -> int:
        """`read_head`, shared."""
        return await self.shared(("head", log), partial(read_head, log))

    async def _read_page(self, key: PageKey) -> Page:
        page = self._in_use.get(key)  # another caller's read may have brought it meanwhile
        if page is None:
            page = Page(await read_page(*key))
            if _complete(key, page):
                self._keep(key, page)
        return page

    async def shared(
        self, key: Hashable, read: Callable[[], Awaitable[T]], holds: Callable[[T], bool] | None = None
    ) -> T:
        """`read()`, or the result of a read of `key` that began after this call, or one that
        began before it when `holds(result)` says that result cannot have changed."""
        asked = self._begun
        while True:
            pending = self._pending.get(key)
            if pending is None or (holds is None and pending.began <= asked):
                return await self._begin(key, read)
            with contextlib.suppress(_Abandoned):
                result: T = await asyncio.shield(pending.result)  # shielded: leaving cancels it for nobody
                if pending.began > asked or (holds is not None and holds(result)):
                    return result

    async def _begin(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        pending = _Read(asyncio.get_running_loop().create_future())
        self._pending[key] = pending
        try:
            async with self._reads:
                self._begun += 1
                pending.began = self._begun
                result = await read()
        except BaseException as error:
            self._finish(key, pending)
            pending.result.set_exception(_Abandoned() if isinstance(error, asyncio.CancelledError) else error)
            pending.result.exception()  # retrieved, whether or not anyone joined
            raise
        self._finish(key, pending)
        pending.result.set_result(result)
        return result

    def _finish(self, key: Hashable, pending: _Read) -> None:
        if self._pending.get(key) is pending:
            del self._pending[key]

    def _keep(self, key: PageKey, page: Page) -> None:
        self._in_use[key] = page
        self._kept[key] = page
        if len(self._kept) > KEEP_PAGES:
            self._kept.popitem(last=False)
        # Only the key: the timer must not keep the page alive past the bound. A page of the same
        # key kept meanwhile holds the same events, so dropping it early costs a read at most.
        asyncio.get_running_loop().call_later(KEEP_SECONDS, self._kept.pop, key, None)
