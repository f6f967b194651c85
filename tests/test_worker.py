"""The worker CLI as a user runs it: subprocesses against real servers, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, SECRET, Server, mint, sql, unique

from client import PomboClient
from worker import Worker, WorkerOptions

TOKEN = mint("worker", "admin")


def pombo(server: Server, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "POMBO_URL": server.url, "POMBO_TOKEN": TOKEN, "POMBO_JWT_SECRET": SECRET}
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], env=env, **kwargs)


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return str(path)


async def create_queue(http: httpx.AsyncClient, **settings: Any) -> str:
    name = unique("work")
    response = await http.post("/api/v1/queues", json={"name": name, **settings})
    assert response.status_code == 201, response.text
    return name


async def messages(http: httpx.AsyncClient, queue: str, status: str) -> list[dict[str, Any]]:
    response = await http.get(f"/api/v1/queues/{queue}/messages", params={"status": status, "limit": 200})
    return list(response.json()["items"])


async def wait_done(http: httpx.AsyncClient, queue: str, count: int) -> None:
    async def done() -> bool:
        return len(await messages(http, queue, "done")) == count

    await wait_until(done)


async def wait_until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_publish_work_and_subscribe_end_to_end(sqlite_server: Server, tmp_path: Path) -> None:
    out = tmp_path / "done.txt"
    handler = script(tmp_path, "handle.sh", f'body=$(cat); echo "$POMBO_ATTEMPTS:$body" >> {out}\n')
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
        publish = pombo(sqlite_server, "publish", queue, "hello", stdout=subprocess.PIPE)
        printed, _ = publish.communicate(timeout=30)
        assert publish.returncode == 0
        message_id = printed.decode().strip()
        piped = pombo(sqlite_server, "publish", queue, "--type", "greeting", stdin=subprocess.PIPE)
        piped.communicate(b"from stdin", timeout=30)
        assert piped.returncode == 0
        subscriber = pombo(sqlite_server, "subscribe", queue, "--from-start", stdout=subprocess.PIPE)
        worker = pombo(sqlite_server, "work", queue, "--", handler)

        await wait_done(http, queue, 2)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
        subscriber.send_signal(signal.SIGINT)
        lines, _ = subscriber.communicate(timeout=15)
    assert sorted(out.read_text().splitlines()) == ["1:from stdin", "1:hello"]
    events = [json.loads(line) for line in lines.decode().splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    created = [e["data"]["id"] for e in events if e["type"] == "message.created"]
    assert created[0] == message_id
    assert [e["data"]["id"] for e in events if e["type"] == "message.acked"].count(message_id) == 1


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell without job control starts `cmd &`


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_subscribe_stops_on_sigint_or_sigterm_even_when_started_with_sigint_ignored(
    sqlite_server: Server, signum: signal.Signals
) -> None:
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
    subscriber = pombo(
        sqlite_server, "subscribe", queue, "--from-start", stdout=subprocess.PIPE, preexec_fn=_ignore_sigint
    )
    assert subscriber.stdout is not None
    first = await asyncio.wait_for(asyncio.to_thread(subscriber.stdout.readline), 30)
    assert json.loads(first)["type"] == "queue.created"
    subscriber.send_signal(signum)
    subscriber.communicate(timeout=15)
    assert subscriber.returncode == 0


async def test_headers_reach_the_command_and_one_that_cannot_be_a_variable_is_left_out(
    sqlite_server: Server, tmp_path: Path
) -> None:
    out = tmp_path / "headers.txt"
    handler = script(tmp_path, "handle.sh", f'echo "$POMBO_HEADER_X_TRACE" >> {out}\n')
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
        response = await http.post(
            f"/api/v1/queues/{queue}/messages", json={"body": 1, "headers": {"X-Trace": "t-1"}}
        )
        assert response.status_code == 201, response.text
        # As a message stored before the server refused such names would have it
        await sql(
            sqlite_server,
            "UPDATE messages SET headers = ? WHERE id = ?",
            '{"a=b": "x", "X-Trace": "t-1"}',
            response.json()["id"],
        )
        worker = pombo(sqlite_server, "work", queue, "--", handler)

        await wait_done(http, queue, 1)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    assert out.read_text() == "t-1\n"


async def test_a_failing_command_is_nacked_with_its_last_stderr_line_then_dead(
    make_server: Any, tmp_path: Path
) -> None:
    server = make_server(sweep_seconds="0.2").start()
    failing = script(
        tmp_path, "fail.sh", 'cat >/dev/null; echo "warming up" >&2; echo "disk full" >&2; exit 3\n'
    )
    async with server.client() as http:
        queue = await create_queue(http, max_attempts=3, backoff_base=0.1, backoff_max=0.2)
        await http.post(f"/api/v1/queues/{queue}/messages", content=b"doomed")
        worker = pombo(server, "work", queue, "--", failing, stderr=subprocess.DEVNULL)
        try:

            async def dead() -> bool:
                return len(await messages(http, queue, "dead")) == 1

            await wait_until(dead)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(15)
        [message] = await messages(http, queue, "dead")
        log = (await http.get(f"/api/v1/queues/{queue}/events", params={"limit": 200})).json()["items"]
    assert message["attempts"] == 3
    assert message["last_error"] == "disk full"
    assert [e["type"] for e in log if e["type"] in ("message.retrying", "message.dead")] == [
        "message.retrying",
        "message.retrying",
        "message.dead",
    ]


async def test_sigterm_lets_the_running_command_finish_and_acks_it(
    sqlite_server: Server, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    slow = script(tmp_path, "slow.sh", f"cat >/dev/null; touch {started}; sleep 1.5; exit 0\n")
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
        await http.post(f"/api/v1/queues/{queue}/messages", content=b"slow job")
        worker = pombo(sqlite_server, "work", queue, "--", slow)
        await wait_until(_exists(started))
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 15) == 0
        assert len(await messages(http, queue, "done")) == 1


async def test_a_second_signal_stops_the_command_and_releases_the_message(
    sqlite_server: Server, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    stuck = script(tmp_path, "stuck.sh", f"cat >/dev/null; touch {started}; sleep 60\n")
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
        await http.post(f"/api/v1/queues/{queue}/messages", content=b"stuck job")
        worker = pombo(sqlite_server, "work", queue, "--", stuck, stderr=subprocess.DEVNULL)
        await wait_until(_exists(started))
        worker.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 15) == 0
        [message] = await messages(http, queue, "pending")
    assert message["last_error"] == "worker stopped while running it"


async def test_a_worker_claims_in_batches_and_acks_each_batch_in_one_request(
    sqlite_server: Server, tmp_path: Path
) -> None:
    handler = script(tmp_path, "ok.sh", "cat >/dev/null\n")
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
        await publish_many(http, queue, ["job"] * 12)
        worker = pombo(sqlite_server, "work", queue, "--", handler, stderr=subprocess.DEVNULL)
        try:
            await wait_until(count_is(http, queue, "done", 12))
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(15)
        log = await whole_log(http, queue)
    # One slot claims alone, so each claim and each ack is one transaction: one `at` per request.
    assert batch_sizes(log, "message.claimed") == [10, 2]
    assert batch_sizes(log, "message.acked") == [10, 2]


@pytest.mark.parametrize("batch", [1, 4])
async def test_the_batch_option_sets_how_many_one_claim_takes(
    sqlite_server: Server, tmp_path: Path, batch: int
) -> None:
    handler = script(tmp_path, "ok.sh", "cat >/dev/null\n")
    async with sqlite_server.client() as http, PomboClient(sqlite_server.url, TOKEN) as client:
        queue = await create_queue(http)
        await publish_many(http, queue, ["job"] * 6)
        worker = asyncio.create_task(Worker(client, WorkerOptions(queue, [handler], batch=batch)).run())
        try:
            await wait_until(count_is(http, queue, "done", 6))
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        log = await whole_log(http, queue)
    expected = [1] * 6 if batch == 1 else [4, 2]
    assert batch_sizes(log, "message.claimed") == expected
    assert batch_sizes(log, "message.acked") == expected


async def test_a_failing_message_is_nacked_and_the_rest_of_its_batch_acked(
    sqlite_server: Server, tmp_path: Path
) -> None:
    handler = script(tmp_path, "pick.sh", 'if grep -q bad; then echo "bad input" >&2; exit 1; fi\n')
    async with sqlite_server.client() as http:
        queue = await create_queue(http, max_attempts=1)
        await publish_many(http, queue, ["one", "bad", "two"])
        worker = pombo(sqlite_server, "work", queue, "--", handler, stderr=subprocess.DEVNULL)
        try:
            await wait_until(count_is(http, queue, "done", 2))
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(15)
        [dead] = await messages(http, queue, "dead")
        log = await whole_log(http, queue)
    assert (dead["body"], dead["last_error"]) == ("bad", "bad input")
    assert sorted(m["body"] for m in acked_in(log)) == ["one", "two"]
    assert batch_sizes(log, "message.claimed") == [3]


async def test_sigterm_mid_batch_finishes_the_running_command_and_gives_back_the_rest(
    sqlite_server: Server, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    slow = script(tmp_path, "slow.sh", f"cat >/dev/null; touch {started}; sleep 1.5; exit 0\n")
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
        first, *rest = await publish_many(http, queue, ["a", "b", "c"])
        worker = pombo(sqlite_server, "work", queue, "--", slow, stderr=subprocess.DEVNULL)
        await wait_until(_exists(started))
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 15) == 0
        assert [m["id"] for m in await messages(http, queue, "done")] == [first]
        pending = await messages(http, queue, "pending")
    assert sorted(m["id"] for m in pending) == sorted(rest)
    assert {m["last_error"] for m in pending} == {"worker stopped before running it"}


async def publish_many(http: httpx.AsyncClient, queue: str, bodies: list[str]) -> list[str]:
    items = [{"body": body} for body in bodies]
    response = await http.post(f"/api/v1/queues/{queue}/messages/batch", json={"items": items})
    assert response.status_code == 201, response.text
    return [item["id"] for item in response.json()["items"]]


def count_is(http: httpx.AsyncClient, queue: str, status: str, count: int) -> Any:
    async def check() -> bool:
        return len(await messages(http, queue, status)) == count

    return check


def batch_sizes(log: list[dict[str, Any]], event: str) -> list[int]:
    """How many `event`s each transaction wrote, in order (a transaction's events share `at`)."""
    sizes: dict[str, int] = {}
    for entry in log:
        if entry["type"] == event:
            sizes[entry["at"]] = sizes.get(entry["at"], 0) + 1
    return list(sizes.values())


def acked_in(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry["data"] for entry in log if entry["type"] == "message.acked"]


async def test_a_killed_worker_s_message_comes_back_after_its_visibility_timeout(
    make_server: Any, tmp_path: Path
) -> None:
    server = make_server(sweep_seconds="0.2").start()
    started = tmp_path / "started"
    stuck = script(tmp_path, "stuck.sh", f"cat >/dev/null; touch {started}; sleep 60\n")
    async with server.client() as http:
        queue = await create_queue(http)
        await http.post(f"/api/v1/queues/{queue}/messages", content=b"job")
        worker = pombo(
            server, "work", queue, "--visibility-timeout", "1", "--", stuck, start_new_session=True
        )
        await wait_until(_exists(started))
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its command, mid-message
        worker.wait(5)
        killed_at = time.monotonic()
        claim = await http.post(f"/api/v1/queues/{queue}/claim", json={"wait": 10})
        [again] = claim.json()["items"]
    assert again["attempts"] == 2
    assert 0.3 < time.monotonic() - killed_at < 4


def _exists(path: Path) -> Any:
    async def check() -> bool:
        return path.exists()

    return check


async def drain_5000(servers: list[Server], tmp_path: Path) -> None:
    """Four worker processes drain 5,000 messages: each acked once, no two live leases overlap."""
    handler = script(tmp_path, "ok.sh", "cat >/dev/null\n")
    async with servers[0].client() as http:
        queue = await create_queue(http)
        for start in range(0, 5000, 1000):
            items = [{"body": n} for n in range(start, start + 1000)]
            response = await http.post(f"/api/v1/queues/{queue}/messages/batch", json={"items": items})
            assert response.status_code == 201
        workers = [
            pombo(
                servers[i % len(servers)],
                "work",
                queue,
                "--concurrency",
                "4",
                "--",
                handler,
                stderr=subprocess.DEVNULL,
            )
            for i in range(4)
        ]
        try:

            async def drained() -> bool:
                queue_state = (await http.get(f"/api/v1/queues/{queue}")).json()
                return bool(queue_state["messages"]["done"] == 5000)

            await wait_until(drained, timeout=240)
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker in workers:
                worker.wait(20)
        log = await whole_log(http, queue)
    check_leases(log)


async def whole_log(http: httpx.AsyncClient, queue: str) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = []
    while True:
        page = (
            await http.get(f"/api/v1/queues/{queue}/events", params={"after": len(log), "limit": 200})
        ).json()
        log += page["items"]
        if not page["has_more"]:
            return log


def check_leases(log: list[dict[str, Any]]) -> None:
    by_message: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in log:
        if event["type"].startswith("message."):
            by_message[event["data"]["id"]].append(event)
    assert len(by_message) == 5000
    for history in by_message.values():
        assert [e["type"] for e in history].count("message.acked") == 1
        lease_until: datetime | None = None
        for event in history:
            at = datetime.fromisoformat(event["at"])
            if event["type"] == "message.claimed":
                assert lease_until is None or at >= lease_until, "a claim overlapped a live lease"
            if event["type"] in ("message.claimed", "message.extended"):
                lease_until = datetime.fromisoformat(event["data"]["lease_expires_at"])
            elif event["type"] in ("message.acked", "message.retrying", "message.released", "message.dead"):
                lease_until = None


@pytest.mark.timeout(300)
async def test_four_workers_drain_5000_messages_on_the_embedded_default(
    make_server: Any, tmp_path: Path
) -> None:
    await drain_5000([make_server().start()], tmp_path)


@pytest.mark.timeout(300)
async def test_four_workers_drain_5000_messages_across_two_replicas(
    make_server: Any, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    prefix = unique("test")
    servers = [
        make_server(database_url=pg_url, redis_url=redis_url, redis_prefix=prefix).start() for _ in range(2)
    ]
    await drain_5000(servers, tmp_path)


async def test_subscribe_resumes_after_the_server_restarts(make_server: Any) -> None:
    server = make_server().start()
    async with server.client() as http:
        queue = await create_queue(http)
        subscriber = pombo(server, "subscribe", queue, "--from-start", stdout=subprocess.PIPE)
        await http.post(f"/api/v1/queues/{queue}/messages", json={"body": "before"})
        await asyncio.sleep(1.5)  # the subscriber has both events
    server.stop()
    server.start()  # same port, same data: the subscriber reconnects and resumes
    async with server.client() as http:
        await http.post(f"/api/v1/queues/{queue}/messages", json={"body": "after"})
        await asyncio.sleep(2.5)
    subscriber.send_signal(signal.SIGINT)
    lines, _ = subscriber.communicate(timeout=15)
    events = [json.loads(line) for line in lines.decode().splitlines()]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert [e["data"].get("body") for e in events[1:]] == ["before", "after"]


async def test_a_worker_without_the_consume_scope_stops_with_one_clear_line(sqlite_server: Server) -> None:
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
    env = {**os.environ, "POMBO_URL": sqlite_server.url, "POMBO_TOKEN": mint("reader", f"subscribe:{queue}")}
    command = [sys.executable, str(ROOT / "main.py"), "work", queue, "--", "true"]
    done = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, timeout=30)
    assert done.returncode == 1
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"pombo: cannot claim from {queue}") and "forbidden" in last


async def test_batch_one_leaves_the_rest_of_the_queue_to_other_workers(
    sqlite_server: Server, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    waiting = script(tmp_path, "wait.sh", f"cat >/dev/null; while [ ! -e {gate} ]; do sleep 0.05; done\n")
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
        for n in range(3):
            await http.post(f"/api/v1/queues/{queue}/messages", json={"body": n})
        worker = pombo(sqlite_server, "work", queue, "--batch", "1", "--", waiting)

        async def one_taken() -> bool:
            return len(await messages(http, queue, "processing")) == 1

        await wait_until(one_taken)
        await asyncio.sleep(0.5)  # a worker claiming more would have taken them by now
        assert len(await messages(http, queue, "pending")) == 2
        gate.touch()

        await wait_done(http, queue, 3)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0


@pytest.mark.parametrize("batch", ["0", "101"])
async def test_a_batch_out_of_range_stops_with_the_usage_line(sqlite_server: Server, batch: str) -> None:
    command = [sys.executable, str(ROOT / "main.py"), "work", "q", "--batch", batch, "--", "true"]
    env = {**os.environ, "POMBO_URL": sqlite_server.url, "POMBO_TOKEN": TOKEN}
    done = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, timeout=30)
    assert done.returncode != 0
    assert "--batch 1..100" in done.stderr.decode()


async def test_a_command_reads_a_json_string_as_the_string_and_other_json_compact(
    sqlite_server: Server, tmp_path: Path
) -> None:
    out = tmp_path / "stdin"
    out.mkdir()
    handler = script(tmp_path, "keep.sh", f'cat > {out}/"$POMBO_MESSAGE_ID"\n')
    items = [{"body": 'a "quoted"\nline 🐦'}, {"body": {"file": "/var/log/app.log", "n": [1, 2.5]}}]
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
        response = await http.post(f"/api/v1/queues/{queue}/messages/batch", json={"items": items})
        texted = await http.post(f"/api/v1/queues/{queue}/messages", content=b'"as typed"')
        ids = [m["id"] for m in response.json()["items"]] + [texted.json()["id"]]
        worker = pombo(sqlite_server, "work", queue, "--", handler)
        await wait_done(http, queue, 3)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    stdin = [(out / message_id).read_text() for message_id in ids]
    assert stdin == ['a "quoted"\nline 🐦', '{"file":"/var/log/app.log","n":[1,2.5]}', '"as typed"']


def run_pombo(server: Server, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POMBO_URL": server.url, "POMBO_TOKEN": TOKEN}
    command = [sys.executable, str(ROOT / "main.py"), *args]
    return subprocess.run(command, env=env, input=stdin, capture_output=True, text=True, timeout=30)


async def test_publish_json_sends_the_argument_or_stdin_as_a_json_body(sqlite_server: Server) -> None:
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
        given = await asyncio.to_thread(
            run_pombo, sqlite_server, "publish", queue, "--json", '{"size_gb": 42}', "--type", "backup.done"
        )
        piped = await asyncio.to_thread(
            run_pombo, sqlite_server, "publish", queue, "--json", "--priority", "high", stdin='"just text"\n'
        )
        assert (given.returncode, piped.returncode) == (0, 0), given.stderr + piped.stderr
        first = (await http.get(f"/api/v1/queues/{queue}/messages/{given.stdout.strip()}")).json()
        second = (await http.get(f"/api/v1/queues/{queue}/messages/{piped.stdout.strip()}")).json()
    assert (first["body"], first["content_type"], first["type"]) == (
        {"size_gb": 42},
        "application/json",
        "backup.done",
    )
    assert (second["body"], second["priority"]) == ("just text", "high")


@pytest.mark.parametrize("text", ["{not json", "NaN", ""])
async def test_publish_json_refuses_what_is_not_json_in_one_line(sqlite_server: Server, text: str) -> None:
    async with sqlite_server.client() as http:
        queue = await create_queue(http)
        done = await asyncio.to_thread(run_pombo, sqlite_server, "publish", queue, "--json", stdin=text)
        listed = (await http.get(f"/api/v1/queues/{queue}/messages")).json()
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pombo: --json: the body is not valid JSON: "), lines
    assert listed["total"] == 0


def test_work_help_shows_the_command_it_needs() -> None:
    command = [sys.executable, str(ROOT / "main.py"), "work", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    usage, *rest = done.stdout.splitlines()
    assert usage == "usage: python main.py work QUEUE [options] -- COMMAND [ARGS…]"
    assert any(line.startswith("  python main.py work backups --concurrency 2 -- sh -c ") for line in rest)
