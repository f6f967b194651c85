"""The invariants every fault scenario ends with, each returning what it found wrong, precisely.

A scenario collects findings in a `Verdict` and asserts once at the end, so a failure lists
every broken invariant with counts, and a pass still prints the numbers (run pytest with -s).
"""

from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from conftest import Server

from .load import Call, Publisher, Replicas, Subscriber

RECOVERY_SECONDS = 10.0


@dataclass
class Verdict:
    """Numbers worth reporting, and the expectations that did not hold."""

    name: str
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def fail(self, *texts: str) -> None:
        self.failures += texts

    def expect(self, condition: bool, text: str) -> None:
        if not condition:
            self.failures.append(text)

    def report(self) -> str:
        lines = [f"== {self.name}", *(f"  {n}" for n in self.notes)]
        if self.failures:
            lines += [
                f"-- {len(self.failures)} expectation(s) failed:",
                *(f"  FAIL {f}" for f in self.failures),
            ]
        return "\n".join(lines)

    def conclude(self) -> None:
        print(self.report())
        assert not self.failures, self.report()


def note_peak_rss(verdict: Verdict, servers: Iterable[Server]) -> None:
    """Each live server's peak resident set since it started (VmHWM)."""
    peaks = []
    for server in servers:
        if server.process is None or server.process.poll() is not None:
            continue
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        peaks.append(f"{kib / 1024:.0f} MiB")
    verdict.note(f"peak server RSS: {', '.join(peaks)}")


def show(calls: Iterable[Call]) -> str:
    return ", ".join(str(c) for c in calls)


def histogram(calls: Iterable[Call]) -> dict[str, int]:
    """Statuses as `{"201": 40, "503": 7, "none:ConnectError": 2}`."""
    counts = Counter(str(c.status) if c.status is not None else f"none:{c.error}" for c in calls)
    return dict(sorted(counts.items()))


# --- what is stored --------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    id: str
    key: str | None
    status: str


async def stored_messages(database_url: str, queue: str) -> list[Stored]:
    """Every message row of a queue, straight from the database (SQLite file or PostgreSQL)."""
    query = (
        "SELECT m.id, m.idempotency_key, m.status FROM messages m JOIN queues q ON q.id = m.queue_id "
        "WHERE q.name = {}"
    )
    if database_url.startswith("sqlite://"):
        with sqlite3.connect(database_url.removeprefix("sqlite://")) as db:
            rows = db.execute(query.format("?"), (queue,)).fetchall()
        return [Stored(*row) for row in rows]
    connection = await asyncpg.connect(database_url)
    try:
        return [Stored(*row) for row in await connection.fetch(query.format("$1"), queue)]
    finally:
        await connection.close()


def check_published(verdict: Verdict, publishers: list[Publisher], stored: list[Stored]) -> None:
    """Every 2xx publish is stored exactly once, under its id; no key twice; nothing unknown."""
    published = {key: p for publisher in publishers for key, p in publisher.published.items()}
    attempted = {key for publisher in publishers for key in publisher.attempted}
    by_key = Counter(s.key for s in stored)
    ids = {s.id: s for s in stored}
    missing = [p for p in published.values() if p.message_id not in ids]
    doubled = [key for key, n in by_key.items() if n > 1]
    unknown = [s for s in stored if s.key not in attempted]
    abandoned = sum(len(p.abandoned) for p in publishers)
    rejected = [r for p in publishers for r in p.rejected]
    verdict.note(
        f"publishes: {len(attempted)} keys, {len(published)} got a 2xx, {abandoned} abandoned, "
        f"{len(rejected)} rejected; {len(stored)} stored"
    )
    verdict.expect(not missing, f"{len(missing)} messages answered 2xx are not stored, e.g. {missing[:3]}")
    verdict.expect(not doubled, f"{len(doubled)} idempotency keys stored more than once, e.g. {doubled[:5]}")
    verdict.expect(not unknown, f"{len(unknown)} stored messages carry no key we sent, e.g. {unknown[:3]}")
    verdict.expect(not rejected, f"{len(rejected)} publishes got a 4xx, e.g. {rejected[:3]}")
    verdict.expect(
        abandoned == 0, f"{abandoned} publishes never got a 2xx, on any replica, within their deadline"
    )


def check_exact_store(verdict: Verdict, publishers: list[Publisher], stored: list[Stored]) -> None:
    """For a single database that had no ambiguous answers: what is stored equals the 2xx publishes."""
    published = {p.message_id for publisher in publishers for p in publisher.published.values()}
    extra = {s.id for s in stored} - published
    verdict.expect(
        not extra, f"{len(extra)} stored messages were never answered 2xx, e.g. {sorted(extra)[:3]}"
    )


# --- what streams saw ------------------------------------------------------------------------


def check_subscriber(
    verdict: Verdict, name: str, subscriber: Subscriber, head: int, published_ids: set[str]
) -> None:
    """One contiguous run of sequence numbers after its cursor, up to the head, every 2xx once."""
    seqs, start = subscriber.seqs, subscriber.after + 1
    problem = contiguity(seqs, start, head)
    verdict.expect(problem is None, f"{name}: {problem}")
    missing = published_ids - subscriber.arrival.keys()
    verdict.expect(not missing, f"{name}: {len(missing)} 2xx messages' message.created never arrived")
    verdict.expect(
        not subscriber.duplicates_created,
        f"{name}: {len(subscriber.duplicates_created)} message.created arrived twice",
    )
    resets = [c for c in subscriber.controls if c[1] == "stream.reset"]
    verdict.expect(not resets, f"{name}: {len(resets)} stream.reset events, first {resets[:1]}")
    verdict.note(
        f"{name}: {len(seqs)} events up to seq {subscriber.last}, {len(subscriber.connects)} connects"
    )


def contiguity(seqs: list[int], start: int, head: int) -> str | None:
    """None when `seqs` is exactly start..head, once each, in order; else what is wrong, with counts."""
    if seqs == list(range(start, head + 1)):
        return None
    counts = Counter(seqs)
    doubled = sorted(s for s, n in counts.items() if n > 1)
    missing = sorted(set(range(start, head + 1)) - counts.keys())
    disorder = next((i for i in range(1, len(seqs)) if seqs[i] <= seqs[i - 1]), None)
    return (
        f"expected seqs {start}..{head} once each in order; saw {len(seqs)} "
        f"(first {seqs[:1]}, last {seqs[-1:]}); {len(missing)} missing (e.g. {missing[:5]}), "
        f"{len(doubled)} doubled (e.g. {doubled[:5]}), first out of order at index {disorder}"
    )


# --- what workers did, from the log ----------------------------------------------------------


async def read_log(replicas: Replicas, queue: str) -> list[dict[str, Any]]:
    """The queue's whole event log through `GET …/events`, from whichever replica answers."""
    log: list[dict[str, Any]] = []
    replica = 0
    for _ in range(100_000):
        response = await replicas.call(
            "read", replica, "GET", f"/api/v1/queues/{queue}/events", params={"after": len(log), "limit": 200}
        )
        if response is None or response.status_code != 200:
            replica = replicas.other(replica)
            continue
        page = response.json()
        log += page["items"]
        if not page["has_more"]:
            return log
    raise AssertionError("the event log could not be read")


def check_consumption(verdict: Verdict, log: list[dict[str, Any]], stored: list[Stored]) -> None:
    """Each message acked exactly once or dead; no claim while another lease on it was live."""
    history: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in log:
        if event["type"].startswith("message."):
            history[event["data"]["id"]].append(event)
    status = {s.id: s.status for s in stored}
    acks = {mid: [e["type"] for e in events].count("message.acked") for mid, events in history.items()}
    twice = [mid for mid, n in acks.items() if n > 1]
    unfinished = [mid for mid in status if acks.get(mid, 0) == 0 and status[mid] != "dead"]
    overlaps = [mid for mid, events in history.items() if _overlap(events)]
    dead = sum(1 for s in status.values() if s == "dead")
    claims = sum(1 for e in log if e["type"] == "message.claimed")
    verdict.note(f"consumption: {len(status)} messages, {claims} claims, {dead} dead")
    verdict.expect(not twice, f"{len(twice)} messages acked more than once, e.g. {twice[:3]}")
    verdict.expect(
        not unfinished, f"{len(unfinished)} messages neither acked nor dead, e.g. {unfinished[:3]}"
    )
    verdict.expect(
        not overlaps, f"{len(overlaps)} messages claimed while a lease was live, e.g. {overlaps[:3]}"
    )


def _overlap(events: list[dict[str, Any]]) -> bool:
    lease_until: datetime | None = None
    for event in events:
        at = datetime.fromisoformat(event["at"])
        if event["type"] == "message.claimed" and lease_until is not None and at < lease_until:
            return True
        if event["type"] in ("message.claimed", "message.extended"):
            lease_until = datetime.fromisoformat(event["data"]["lease_expires_at"])
        elif event["type"] in ("message.acked", "message.retrying", "message.released", "message.dead"):
            lease_until = None
    return False


# --- what clients were answered --------------------------------------------------------------


def check_no_500(verdict: Verdict, calls: list[Call]) -> None:
    errors = [c for c in calls if c.status is not None and c.status >= 500 and c.status != 503]
    by_kind = Counter(f"{c.kind} {c.status}" for c in errors)
    verdict.expect(not errors, f"{len(errors)} answers were 5xx other than 503: {dict(by_kind)}")


def check_unavailable_answers(verdict: Verdict, calls: list[Call]) -> None:
    """Every 503 has an integer Retry-After and the `unavailable` code."""
    answers = [c for c in calls if c.status == 503 and c.kind != "readyz"]  # /readyz need not say when
    bad = [c for c in answers if not (c.retry_after or "").isdigit()]
    verdict.expect(not bad, f"{len(bad)} 503s without an integer Retry-After, e.g. {show(bad[:2])}")
    wrong = [c for c in answers if c.code != "unavailable"]
    verdict.expect(
        not wrong, f"{len(wrong)} 503s whose error code is not 'unavailable', e.g. {show(wrong[:2])}"
    )


def check_healthz(verdict: Verdict, calls: list[Call]) -> None:
    health = [c for c in calls if c.kind == "healthz"]
    bad = [c for c in health if c.status != 200]
    verdict.expect(
        not bad, f"/healthz answered other than 200 {len(bad)} of {len(health)} times: {histogram(bad)}"
    )


def first_success_after(calls: list[Call], replica: int, after: float, kinds: set[str]) -> float | None:
    """When the first 2xx of these kinds on this replica, sent at or after `after`, was answered."""
    answered = [
        c.ended
        for c in calls
        if c.replica == replica and c.kind in kinds and c.started >= after and c.status and c.status < 300
    ]
    return min(answered, default=None)


def says_down(call: Call) -> bool:
    """A /readyz 503 `unavailable`, naming the database or the writer as down."""
    checks = call.checks or {}
    down = "down" in (checks.get("database"), checks.get("writer"))
    return call.status == 503 and call.state == "unavailable" and down


def is_ready(call: Call) -> bool:
    """A /readyz 200 `ready` with every check `ok`."""
    checks = call.checks or {}
    return (
        call.status == 200
        and call.state == "ready"
        and checks.get("database") == checks.get("writer") == "ok"
    )


def check_drained(verdict: Verdict, counts: dict[str, int] | None, within: float) -> None:
    left = None if counts is None else counts.get("pending", 0) + counts.get("processing", 0)
    verdict.expect(
        left == 0, f"the queue did not drain within {within:.0f} s after the load stopped: {counts}"
    )


def readyz_between(calls: list[Call], replica: int, start: float, end: float) -> list[Call]:
    return [c for c in calls if c.kind == "readyz" and c.replica == replica and start <= c.started <= end]
