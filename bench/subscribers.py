"""The subscriber side of the streaming scenarios: many SSE streams, and what each received."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from wire import EventStream, FrameHandler, Target, open_stream

# Each published body carries its number and the monotonic time it was sent; both servers keep
# the body's key order, so one regex finds them without decoding every frame's JSON.
_STAMP = re.compile(rb'"n":\s*(\d+),\s*"t":\s*([0-9.]+)')
OPEN_TIMEOUT = 30.0
WARM_UP = b'"warm_up"'


class Tally:
    """Which subscriber received which message, how late, and how often."""

    def __init__(self, subscribers: int, messages: int) -> None:
        self.seen = [bytearray(messages) for _ in range(subscribers)]
        self.latencies: list[float] = []
        self.duplicates = 0
        self.expected = messages * subscribers
        self.complete = asyncio.Event()
        self.warm = bytearray(subscribers)  # which streams have received the warm-up message
        self.warmed = asyncio.Event()

    def handler(self, index: int) -> FrameHandler:
        seen = self.seen[index]

        def on_frame(frame: bytes, arrived: float) -> None:
            match = _STAMP.search(frame)
            if match is None or int(match[1]) >= len(seen):
                if WARM_UP in frame:
                    self._warmed_up(index)
                return  # a ping, the retry line, or another log event
            number = int(match[1])
            if seen[number]:
                self.duplicates += 1
                return
            seen[number] = 1
            self.latencies.append(arrived - float(match[2]))
            if len(self.latencies) >= self.expected:
                self.complete.set()

        return on_frame

    def _warmed_up(self, index: int) -> None:
        self.warm[index] = 1
        if all(self.warm):
            self.warmed.set()

    def lost(self, subscribers: list[int], published: bytearray) -> int:
        sent = [n for n, ok in enumerate(published) if ok]
        return sum(1 for index in subscribers for n in sent if not self.seen[index][n])


@dataclass
class Streams:
    """The streams that opened (by subscriber index), how long opening took, and what failed."""

    opened: dict[int, EventStream] = field(default_factory=dict)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def dropped(self) -> int:
        return sum(1 for stream in self.opened.values() if stream.ended)

    def close(self) -> None:
        for stream in self.opened.values():
            stream.close()


async def open_streams(target: Target, queue: str, tally: Tally, concurrency: int) -> Streams:
    """Open one stream per tally row, `concurrency` at a time, as a crowd of browsers arrives."""
    path = f"/api/v1/queues/{queue}/stream"
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> EventStream:
        async with gate, asyncio.timeout(OPEN_TIMEOUT):
            return await open_stream(target, path, tally.handler(index))

    streams = Streams()
    began = time.perf_counter()
    outcomes = await asyncio.gather(*(one(i) for i in range(len(tally.seen))), return_exceptions=True)
    streams.seconds = time.perf_counter() - began
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, EventStream):
            streams.opened[index] = outcome
        else:
            streams.errors.append(str(outcome) or type(outcome).__name__)
    return streams


@contextlib.contextmanager
def quiet_client_gc() -> Iterator[None]:
    """The load generator's own collector must not pause the loop that timestamps arrivals.

    Measuring creates no reference cycles (floats and bytes), so nothing piles up meanwhile.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def wait_for_deliveries(tally: Tally, expected: int, seconds: float) -> None:
    """Until every open stream has every published message, or `seconds` have passed."""
    tally.expected = expected
    if len(tally.latencies) >= expected:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.complete.wait(), seconds)
