"""Shared reads of logs: a crowd asking for the same page gets one read, and never a stale one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tortoise import Tortoise

from event_log import read_bounds, read_heads
from log_pages import SHARED_READS, SharedReads
from models import Event, EventLog


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[None]:
    await Tortoise.init(db_url=f"sqlite://{tmp_path / 'pombo.sqlite3'}", modules={"pombo": ["models"]})
    await Tortoise.generate_schemas()
    yield
    await Tortoise.close_connections()


async def append(log: str, *seqs: int) -> None:
    now = datetime.now(UTC)
    await Event.bulk_create(
        [Event(log=log, seq=seq, type="message.created", data="{}", at=now) for seq in seqs]
    )
    await EventLog.update_or_create(name=log, defaults={"last_seq": max(seqs)})


async def test_a_crowd_asking_for_one_page_shares_one_copy(database: None) -> None:
    await append("queue:a", *range(1, 11))
    reads = SharedReads()
    full = await asyncio.gather(*(reads.page("queue:a", 0, 10) for _ in range(50)))
    assert all(page is full[0] for page in full)
    assert [u.seq for u in full[0].updates] == list(range(1, 11))
    # A short page may lack what was committed after its read began: those who came during the
    # first read share a second one.
    short = await asyncio.gather(*(reads.page("queue:a", 0, 500) for _ in range(50)))
    assert len({id(page) for page in short}) == 2
    assert all([u.seq for u in page.updates] == list(range(1, 11)) for page in short)


async def test_a_short_page_read_before_a_caller_asked_is_not_given_to_it(database: None) -> None:
    await append("queue:a", 1, 2, 3)
    reads = SharedReads()
    first = await reads.page("queue:a", 0, 500)
    await append("queue:a", 4)  # committed after that read: a stream asking now must see it
    again = await reads.page("queue:a", 0, 500)
    assert [u.seq for u in first.updates] == [1, 2, 3]
    assert [u.seq for u in again.updates] == [1, 2, 3, 4]


async def test_a_page_that_cannot_change_is_kept_for_who_comes_next(database: None) -> None:
    await append("queue:a", 1, 2, 3)
    reads = SharedReads()
    full, bounded = await reads.page("queue:a", 0, 2), await reads.page("queue:a", 0, 500, upto=3)
    await append("queue:a", 4)
    assert await reads.page("queue:a", 0, 2) is full
    assert await reads.page("queue:a", 0, 500, upto=3) is bounded
    assert [u.seq for u in bounded.updates] == [1, 2, 3]


async def test_reads_wait_their_turn_and_those_who_asked_meanwhile_share_the_next(database: None) -> None:
    reads, running, most = SharedReads(), 0, 0
    made: list[str] = []

    async def read(key: str) -> str:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        made.append(key)
        return key

    crowd = [
        reads.shared(f"k{n % (SHARED_READS * 2)}", lambda n=n: read(f"k{n % (SHARED_READS * 2)}"))
        for n in range(40)
    ]
    answers = await asyncio.gather(*crowd)
    assert answers == [f"k{n % (SHARED_READS * 2)}" for n in range(40)]
    assert most == SHARED_READS
    # The first SHARED_READS keys began at once; the rest queued, and each queue made one read.
    assert len(made) < 40 and sorted(set(made)) == sorted(set(answers))


async def test_a_caller_that_leaves_before_its_read_began_leaves_nobody_stranded(database: None) -> None:
    reads, gate = SharedReads(), asyncio.Event()

    async def blocked() -> str:
        await gate.wait()
        return "blocked"

    holders = [asyncio.create_task(reads.shared(f"hold{n}", blocked)) for n in range(SHARED_READS)]
    await asyncio.sleep(0)
    leaver = asyncio.create_task(reads.shared("key", lambda: asyncio.sleep(0, "left")))
    await asyncio.sleep(0)
    stayer = asyncio.create_task(reads.shared("key", lambda: asyncio.sleep(0, "stayed")))
    await asyncio.sleep(0)
    leaver.cancel()
    gate.set()
    assert await asyncio.wait_for(stayer, 2) == "stayed"  # it read for itself once the reader left
    assert await asyncio.gather(*holders) == ["blocked"] * SHARED_READS
    with pytest.raises(asyncio.CancelledError):
        await leaver


async def test_bounds_and_heads_say_what_the_database_holds(database: None) -> None:
    await append("queue:a", 3, 4, 5)
    await EventLog.create(name="queue:empty", last_seq=7)
    assert await read_bounds("queue:a") == (3, 5)
    assert await read_bounds("queue:empty") == (8, 7)  # nothing retained: oldest is head + 1
    assert await read_heads(["queue:a", "queue:empty", "queue:never"]) == {"queue:a": 5, "queue:empty": 7}
    reads = SharedReads()
    assert await reads.bounds("queue:a") == (3, 5)
    assert (await reads.head("queue:a"), await reads.head("queue:never")) == (5, 0)
