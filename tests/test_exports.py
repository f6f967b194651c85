"""CSV and XLSX exports of messages and events against a real server: what a person downloads."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openpyxl
import pytest
from conftest import Server, auth, mint, unique
from tortoise import Tortoise

from exports import BATCH_ROWS, Column, Export, capped, paged, xlsx_response
from models import Event, Message, Queue, new_id, utcnow

MESSAGE_COLUMNS = [
    "id",
    "created_at",
    "status",
    "priority",
    "type",
    "attempts",
    "body",
    "content_type",
    "available_at",
    "finished_at",
    "last_error",
    "idempotency_key",
]
EVENT_COLUMNS = ["seq", "at", "type", "data"]
BOM = b"\xef\xbb\xbf"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
BLUE, RED, YELLOW, GREEN = "FF4472C4", "FFFFC7CE", "FFFFEB9C", "FFC6EFCE"
PRIORITY_COLOURS = {"urgent": RED, "high": RED, "normal": YELLOW, "low": GREEN}
MIB = 1024 * 1024

# Each is published as a text body and must come back unchanged, or neutralised with a `'`.
AWKWARD = [
    "comma, separated, values",
    'say "hello", then ""twice""',
    "line one\nline two\r\nline three",
    "emoji 🐦🚀 and ação",
    '=HYPERLINK("http://example.com","click")',
    "+1+2",
    "-3",
    "@SUM(A1:A2)",
    "\tindented",
    "\rreturned",
    "plain",
]


def messages_url(queue: str) -> str:
    return f"/api/v1/queues/{queue}/messages"


def events_url(queue: str) -> str:
    return f"/api/v1/queues/{queue}/events"


def neutralised(text: str) -> str:
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "content-disposition" not in response.headers
    error = response.json()["error"]
    assert error["code"] == code, error
    return dict(error)


async def create_queue(http: httpx.AsyncClient, **settings: Any) -> str:
    name = unique()
    response = await http.post("/api/v1/queues", json={"name": name, **settings})
    assert response.status_code == 201, response.text
    return name


async def publish_text(http: httpx.AsyncClient, queue: str, body: str, **headers: str) -> dict[str, Any]:
    sent = {"Content-Type": "text/plain; charset=utf-8", **headers}
    response = await http.post(messages_url(queue), content=body.encode(), headers=sent)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def publish_batch(http: httpx.AsyncClient, queue: str, items: list[dict[str, Any]]) -> list[Any]:
    response = await http.post(messages_url(queue) + "/batch", json={"items": items})
    assert response.status_code == 201, response.text
    return list(response.json()["items"])


async def download(http: httpx.AsyncClient, url: str, format: str, **params: Any) -> httpx.Response:
    response = await http.get(url, params={"format": format, **params})
    assert response.status_code == 200, response.text
    return response


def csv_rows(response: httpx.Response) -> list[list[str]]:
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.content.startswith(BOM)
    text = response.content.decode("utf-8-sig")
    return list(csv.reader(io.StringIO(text, newline="")))


def workbook(response: httpx.Response) -> Any:
    assert response.headers["content-type"] == XLSX
    if response.headers.get("content-encoding") != "gzip":  # compressed, its length is not known ahead
        assert int(response.headers["content-length"]) == len(response.content)
    return openpyxl.load_workbook(io.BytesIO(response.content))


def summary(book: Any) -> dict[str, Any]:
    """The Summary sheet as {label: value}, and {"By x": {value: rows}} for each totals block."""
    found: dict[str, Any] = {}
    block: dict[str, int] | None = None
    for row in book["Summary"].iter_rows(values_only=True):
        label, value = (*row, None, None)[:2]
        if label is None:
            block = None
        elif str(label).startswith("By "):
            block = found[label] = {}
        elif block is not None:
            block[label] = value
        else:
            found[label] = value
    return found


def assert_filename(response: httpx.Response, queue: str, table: str, extension: str) -> None:
    disposition = response.headers["content-disposition"]
    match = re.fullmatch(
        rf'attachment; filename="{queue}-{table}-(\d{{8}}T\d{{6}}Z)\.{extension}"', disposition
    )
    assert match, disposition
    stamp = datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=2)


async def listed_ids(http: httpx.AsyncClient, queue: str, **params: Any) -> list[str]:
    response = await http.get(messages_url(queue), params={"limit": 200, **params})
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


# CSV ------------------------------------------------------------------------------------------


async def test_csv_round_trips_awkward_bodies(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    published = [await publish_text(client, queue, body, **{"X-Type": "note"}) for body in AWKWARD]
    structured = {"text": 'a, "b"\nc 🐦', "n": [1, 2.5, None]}
    [as_json] = await publish_batch(client, queue, [{"body": structured, "priority": "urgent"}])

    response = await download(client, messages_url(queue), "csv")
    assert_filename(response, queue, "messages", "csv")
    assert response.content.startswith(BOM + b"id,created_at,status,priority,")
    assert response.content.split(b"\r\n", 1)[0].endswith(b"idempotency_key")
    header, *rows = csv_rows(response)
    assert header == MESSAGE_COLUMNS
    assert [row[0] for row in rows] == [m["id"] for m in [*published, as_json]]
    bodies = [dict(zip(header, row, strict=True))["body"] for row in rows]
    assert bodies[:-1] == [neutralised(body) for body in AWKWARD]
    assert bodies[-1] == json.dumps(structured, separators=(",", ":"), ensure_ascii=False)


# A JSON string is the string itself in a cell; other JSON its compact text; text as published.
SHELL_BODIES = [
    ({"body": 'hello, "world"\n🐦'}, 'hello, "world"\n🐦'),
    ({"body": "=1+1"}, "'=1+1"),
    ({"body": {"a": [1, "b"]}}, '{"a":[1,"b"]}'),
    ({"body": 7}, "7"),
    ({"body": None}, "null"),
]


async def test_a_json_string_body_is_its_string_in_csv_and_xlsx_cells(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    await publish_batch(client, queue, [item for item, _ in SHELL_BODIES])
    quoted = await publish_text(client, queue, '"quoted text"')  # text that looks like JSON stays text
    expected = [cell for _, cell in SHELL_BODIES] + ['"quoted text"']

    header, *rows = csv_rows(await download(client, messages_url(queue), "csv"))
    assert [dict(zip(header, row, strict=True))["body"] for row in rows] == expected
    assert rows[-1][0] == quoted["id"]
    sheet = workbook(await download(client, messages_url(queue), "xlsx"))["Messages"]
    body = MESSAGE_COLUMNS.index("body")
    assert [row[body].value for row in sheet.iter_rows(min_row=2)] == expected
    listed = (await client.get(messages_url(queue))).json()["items"]  # the API keeps JSON as JSON
    assert [m["body"] for m in listed[:-1]] == [item["body"] for item, _ in SHELL_BODIES]


async def test_csv_columns_carry_the_message(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    message = await publish_text(client, queue, "hi", **{"X-Priority": "high", "Idempotency-Key": "k-1"})
    _, values = csv_rows(await download(client, messages_url(queue), "csv"))
    row = dict(zip(MESSAGE_COLUMNS, values, strict=True))
    assert row["id"] == message["id"]
    assert row["status"] == "pending" and row["priority"] == "high" and row["attempts"] == "0"
    assert row["content_type"] == "text/plain; charset=utf-8" and row["idempotency_key"] == "k-1"
    assert row["finished_at"] == "" and row["last_error"] == "" and row["type"] == ""
    for name in ("created_at", "available_at"):
        assert row[name].endswith("Z")
        assert datetime.fromisoformat(row[name]) == datetime.fromisoformat(message[name])


async def test_exports_apply_the_list_filters_and_ignore_paging(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    first = await publish_batch(
        client,
        queue,
        [{"body": i, "type": "a" if i % 2 else "b", "priority": ["low", "high"][i % 2]} for i in range(6)],
    )
    await asyncio.sleep(0.01)
    later = await publish_batch(client, queue, [{"body": "later", "type": "a", "priority": "urgent"}])
    claimed = await client.post(f"/api/v1/queues/{queue}/claim", json={"max": 1})
    assert claimed.json()["items"][0]["id"] == later[0]["id"]  # urgent first
    filters: list[dict[str, str]] = [
        {},
        {"type": "a"},
        {"priority": "high"},
        {"type": "b", "priority": "low"},
        {"status": "processing"},
        {"status": "pending", "type": "a"},
        {"created_after": later[0]["created_at"]},
        {"created_before": later[0]["created_at"]},
        {"created_after": first[0]["created_at"], "priority": "urgent"},
    ]
    for where in filters:
        expected = await listed_ids(client, queue, **where)
        rows = csv_rows(await download(client, messages_url(queue), "csv", **where))[1:]
        assert [row[0] for row in rows] == expected, where
        book = workbook(await download(client, messages_url(queue), "xlsx", **where))
        assert [r[0] for r in book["Messages"].iter_rows(min_row=2, values_only=True)] == expected, where
    paged = await download(client, messages_url(queue), "csv", limit=1, offset=3)
    assert len(csv_rows(paged)) == 1 + 7


async def test_json_stays_the_default(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    await publish_text(client, queue, "one")
    plain = await client.get(messages_url(queue))
    explicit = await client.get(messages_url(queue), params={"format": "json"})
    assert plain.status_code == explicit.status_code == 200
    assert plain.headers["content-type"] == explicit.headers["content-type"] == "application/json"
    assert set(plain.json()) == {"items", "total", "limit", "offset", "has_more"}
    assert plain.json() == explicit.json()
    events = await client.get(events_url(queue), params={"format": "json"})
    assert [e["type"] for e in events.json()["items"]] == ["queue.created", "message.created"]


async def test_unknown_format_is_422(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    for url in (messages_url(queue), events_url(queue)):
        response = await client.get(url, params={"format": "pdf"})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "validation_error"


# XLSX -----------------------------------------------------------------------------------------


async def _mixed_queue(http: httpx.AsyncClient) -> tuple[str, list[dict[str, Any]]]:
    """Six messages, one of each status but pending three times: done, dead, processing."""
    queue = await create_queue(http, max_attempts=1)
    priorities = ["urgent", "high", "normal", "normal", "low", "low"]
    bodies = ["=cmd|' /C calc'!A0", "two", "three", "four", "five", "six"]
    messages = [
        await publish_text(http, queue, body, **{"X-Priority": p})
        for body, p in zip(bodies, priorities, strict=True)
    ]
    for action in ("ack", "nack", None):  # urgent is claimed first, then high, then normal
        [item] = (await http.post(f"/api/v1/queues/{queue}/claim", json={"max": 1})).json()["items"]
        if action:
            url = f"{messages_url(queue)}/{item['id']}/{action}"
            assert (await http.post(url, json={"lease_id": item["lease_id"]})).status_code == 200
    return queue, messages


async def test_xlsx_has_styled_header_priority_colours_and_summary(client: httpx.AsyncClient) -> None:
    queue, messages = await _mixed_queue(client)
    response = await download(client, messages_url(queue), "xlsx")
    assert_filename(response, queue, "messages", "xlsx")
    book = workbook(response)
    assert book.sheetnames == ["Messages", "Summary"]
    sheet = book["Messages"]
    header = sheet[1]
    assert [cell.value for cell in header] == MESSAGE_COLUMNS
    for cell in header:
        assert cell.font.b, cell
        assert cell.fill.fill_type == "solid" and cell.fill.fgColor.rgb == BLUE, cell
    assert sheet.freeze_panes == "A2"
    assert sheet.column_dimensions["A"].width >= 36  # ids
    assert sheet.column_dimensions["G"].width >= 40  # bodies

    rows = list(sheet.iter_rows(min_row=2))
    assert [row[0].value for row in rows] == [m["id"] for m in messages]
    for row in rows:
        priority = row[3]
        assert priority.fill.fgColor.rgb == PRIORITY_COLOURS[priority.value], priority.value
    assert [row[2].value for row in rows] == ["done", "dead", "processing", "pending", "pending", "pending"]
    formula = rows[0][6]
    assert formula.value == "'=cmd|' /C calc'!A0" and formula.data_type == "s"
    assert isinstance(rows[0][1].value, datetime)  # a real date Excel can sort and filter

    totals = summary(book)
    assert totals["Rows"] == 6
    assert totals["Queue"] == queue and totals["Filters"] == "none"
    exported = totals["Exported at (UTC)"].replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - exported) < timedelta(minutes=2)
    assert totals["By status"] == {"pending": 3, "processing": 1, "done": 1, "dead": 1}
    assert totals["By priority"] == {"urgent": 1, "high": 1, "normal": 2, "low": 2}


async def test_xlsx_summary_counts_only_what_the_filters_match(client: httpx.AsyncClient) -> None:
    queue, _ = await _mixed_queue(client)
    book = workbook(await download(client, messages_url(queue), "xlsx", priority="low", status="pending"))
    totals = summary(book)
    assert totals["Rows"] == 2 and totals["Filters"] == "status=pending, priority=low"
    assert totals["By status"] == {"pending": 2, "processing": 0, "done": 0, "dead": 0}
    assert totals["By priority"] == {"urgent": 0, "high": 0, "normal": 0, "low": 2}


# Events ---------------------------------------------------------------------------------------


async def test_event_exports_respect_after(client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    for body in ("=one", "two, three", "four\nfive"):
        await publish_text(client, queue, body)
    logged = (await client.get(events_url(queue), params={"after": 1, "limit": 200})).json()["items"]
    assert [e["seq"] for e in logged] == [2, 3, 4]

    response = await download(client, events_url(queue), "csv", after=1, limit=1)
    assert_filename(response, queue, "events", "csv")
    header, *rows = csv_rows(response)
    assert header == EVENT_COLUMNS
    assert [(int(r[0]), r[2]) for r in rows] == [(e["seq"], e["type"]) for e in logged]
    assert [json.loads(r[3]) for r in rows] == [e["data"] for e in logged]
    assert [datetime.fromisoformat(r[1]) for r in rows] == [datetime.fromisoformat(e["at"]) for e in logged]

    book = workbook(await download(client, events_url(queue), "xlsx", after=1))
    assert book.sheetnames == ["Events", "Summary"]
    assert [c.value for c in book["Events"][1]] == EVENT_COLUMNS
    assert [r[0] for r in book["Events"].iter_rows(min_row=2, values_only=True)] == [2, 3, 4]
    totals = summary(book)
    assert totals["Rows"] == 3 and totals["By type"] == {"message.created": 3}


# Limits and scopes ----------------------------------------------------------------------------


async def test_row_cap_is_a_400_before_any_file(make_server: Any) -> None:
    server: Server = make_server(export_max_rows="5").start()
    async with server.client() as http:
        queue = unique()
        items = [{"body": i, "type": "a" if i < 5 else "b"} for i in range(6)]
        await publish_batch(http, queue, items)  # the queue is created too: 7 events
        for format in ("csv", "xlsx"):
            for url, count in ((messages_url(queue), 6), (events_url(queue), 7)):
                response = await http.get(url, params={"format": format})
                error = assert_error(response, 400, "export_too_large")
                assert error["details"] == {"count": count, "max_rows": 5}
                assert "5" in error["message"]
            assert (await download(http, messages_url(queue), format, type="a")).status_code == 200
            assert (await download(http, events_url(queue), format, after=2)).status_code == 200
        assert len(csv_rows(await download(http, messages_url(queue), "csv", type="a"))) == 1 + 5
        assert (await http.get(messages_url(queue))).json()["total"] == 6  # JSON lists have no cap


async def test_exports_need_subscribe(server: Server, client: httpx.AsyncClient) -> None:
    queue = await create_queue(client)
    await publish_text(client, queue, "secret")
    async with (
        server.client(auth(mint("poster", f"publish:{queue}"))) as poster,
        server.client(auth(mint("reader", f"subscribe:{queue}"))) as reader,
        server.client({}) as nobody,
    ):
        for format in ("csv", "xlsx"):
            for url in (messages_url(queue), events_url(queue)):
                error = assert_error(await poster.get(url, params={"format": format}), 403, "forbidden")
                assert error["details"] == {"needed": f"subscribe:{queue}"}
                assert_error(await nobody.get(url, params={"format": format}), 401, "unauthorized")
                assert (await download(reader, url, format)).status_code == 200
        missing = await client.get(messages_url(unique()), params={"format": "csv"})
        assert_error(missing, 404, "queue_not_found")


# The machinery, in process --------------------------------------------------------------------


@pytest.fixture
async def database() -> AsyncIterator[Queue]:
    await Tortoise.init(db_url="sqlite://:memory:", modules={"pombo": ["models"]})
    await Tortoise.generate_schemas()
    now = utcnow()
    yield await Queue.create(name="q", owner="tester", created_at=now, updated_at=now)
    await Tortoise.close_connections()


async def add_messages(queue: Queue, count: int) -> list[str]:
    now = utcnow()
    made = [
        Message(
            id=new_id(),
            queue_id=queue.id,
            body="x",
            content_type="text/plain",
            **dict.fromkeys(("available_at", "created_at", "updated_at"), now),
        )
        for _ in range(count)
    ]
    await Message.bulk_create(made)
    return [m.id for m in made]


async def test_rows_added_during_an_export_stay_out(database: Queue) -> None:
    ids = await add_messages(database, 2 * BATCH_ROWS + 500)
    query = await capped(Message.filter(queue_id=database.id), "id", 10_000)
    rows = paged(query, "id", ["id", "body"])
    first = [await anext(rows) for _ in range(10)]
    await add_messages(database, 5)
    assert [row[0] for row in [*first, *[row async for row in rows]]] == ids
    newest_first = [row async for row in paged(query, "id", ["id"], descending=True)]
    assert [row[0] for row in newest_first] == ids[::-1]


async def test_paging_a_log_keeps_to_that_log(database: Queue) -> None:
    now, count = utcnow(), BATCH_ROWS + 100
    events = [Event(log=log, seq=n, type="t", data="{}", at=now) for n in range(1, count + 1) for log in "ab"]
    await Event.bulk_create(events)
    query = await capped(Event.filter(log="a", seq__gt=1), "seq", 10_000)
    assert [row async for row in paged(query, "seq", ["log", "seq"])] == [
        ("a", n) for n in range(2, count + 1)
    ]


async def test_a_failed_xlsx_export_leaves_no_temporary_files() -> None:
    async def failing() -> AsyncIterator[list[str]]:
        for n in range(BATCH_ROWS + 10):
            yield [f"row {n}"]
        raise RuntimeError("the database went away")

    before = set(Path(tempfile.gettempdir()).glob("openpyxl*"))
    with pytest.raises(RuntimeError, match="went away"):
        await xlsx_response(Export("q-things", "Things", [Column("name")], failing()))
    assert set(Path(tempfile.gettempdir()).glob("openpyxl*")) - before == set()


# Memory ---------------------------------------------------------------------------------------


def memory(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            found[name] = int(value.split()[0]) * 1024
    return found


def reset_peak(pid: int) -> int:
    """Start a fresh peak (Linux: `5` into clear_refs); the baseline to measure growth from."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return memory(pid)["VmHWM"]  # no reset: growth over the peak so far, a weaker bound
    return memory(pid)["VmRSS"]


async def _stream_to(http: httpx.AsyncClient, url: str, format: str, target: Path) -> int:
    async with http.stream("GET", url, params={"format": format}, timeout=240) as response:
        assert response.status_code == 200
        with target.open("wb") as out:
            async for chunk in response.aiter_bytes():
                out.write(chunk)
    return target.stat().st_size


async def _publish_many(http: httpx.AsyncClient, queue: str, total: int) -> None:
    """`total` messages of about 1 KiB each, 1,000 per batch call, a few calls at a time."""

    async def batch(start: int) -> None:
        items = [
            {
                "body": {"n": n, "text": secrets.token_hex(450)},
                "priority": ["low", "normal", "high", "urgent"][n % 4],
            }
            for n in range(start, start + 1000)
        ]
        await publish_batch(http, queue, items)

    starts = list(range(0, total, 1000))
    for group in range(0, len(starts), 5):
        await asyncio.gather(*(batch(start) for start in starts[group : group + 5]))


@pytest.mark.timeout(300)
async def test_exporting_50000_messages_keeps_memory_bounded(
    make_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "big"
    server: Server = make_server(data_dir).start()
    queue = unique("big")
    async with server.client() as http:
        await _publish_many(http, queue, 50_000)
    server.stop()
    results = {}
    for format in ("csv", "xlsx"):
        # A fresh process each: no memory left behind by publishing or the other export hides a cost.
        server = make_server(data_dir).start()
        assert server.process is not None
        async with server.client() as http:
            baseline = reset_peak(server.process.pid)
            began = time.monotonic()
            size = await _stream_to(http, messages_url(queue), format, tmp_path / f"export.{format}")
            growth = memory(server.process.pid)["VmHWM"] - baseline
            results[format] = (size, growth, time.monotonic() - began)
        server.stop()
    with capsys.disabled():
        for format, (size, growth, seconds) in results.items():
            print(
                f"\n50,000 messages as {format}: {size / MIB:.1f} MiB in {seconds:.1f} s, "
                f"server peak RSS growth {growth / MIB:.1f} MiB"
            )
    csv_size, csv_growth, _ = results["csv"]
    assert csv_size > 40 * MIB
    assert csv_growth < 40 * MIB
    assert results["xlsx"][1] < 40 * MIB
    with (tmp_path / "export.csv").open("rb") as exported:
        assert sum(chunk.count(b"\r\n") for chunk in iter(lambda: exported.read(MIB), b"")) == 50_001
    book = openpyxl.load_workbook(tmp_path / "export.xlsx", read_only=True)
    totals = summary(book)
    book.close()
    assert totals["Rows"] == 50_000
    assert totals["By priority"] == {"urgent": 12_500, "high": 12_500, "normal": 12_500, "low": 12_500}


async def notify(
    http: httpx.AsyncClient, recipient: str, priority: str, title: str, message: str = ""
) -> None:
    body = {
        "recipients": [recipient],
        "type": "note",
        "priority": priority,
        "title": title,
        "message": message,
    }
    assert (await http.post("/api/v1/notifications", json=body)).status_code == 201


async def test_notification_exports_hold_only_the_callers_own_and_are_styled(
    client: httpx.AsyncClient,
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await notify(client, alice, "urgent", "=HYPERLINK(1)", 'a,b "c"\nd 🎉')
    await notify(client, alice, "medium", "second")
    await notify(client, alice, "low", "third")
    await notify(client, bob, "high", "not for alice")
    mine = auth(mint(alice, ""))
    response = await client.get("/api/v1/notifications", params={"format": "csv"}, headers=mine)
    assert response.status_code == 200
    assert re.search(r'filename="notifications-\d{8}T\d{6}Z\.csv"', response.headers["content-disposition"])
    [header, *rows] = csv_rows(response)
    titles = [row[header.index("title")] for row in rows]
    assert titles == ["third", "second", "'=HYPERLINK(1)"]  # newest first, formula neutralised
    assert rows[2][header.index("message")] == 'a,b "c"\nd 🎉'
    unread = await client.get(
        "/api/v1/notifications", params={"format": "csv", "priority": "low"}, headers=mine
    )
    assert [row[header.index("title")] for row in csv_rows(unread)[1:]] == ["third"]
    book = workbook(await client.get("/api/v1/notifications", params={"format": "xlsx"}, headers=mine))
    sheet = book["Notifications"]
    column = [cell.value for cell in sheet[1]].index("priority") + 1
    fills = {sheet.cell(row, column).value: sheet.cell(row, column).fill.fgColor.rgb for row in range(2, 5)}
    assert fills == {"urgent": "FFFFC7CE", "medium": "FFFFEB9C", "low": "FFC6EFCE"}
    assert sheet.cell(1, 1).font.bold
    assert summary(book)["By priority"] == {"urgent": 1, "high": 0, "medium": 1, "low": 1}


async def test_a_notification_export_past_the_cap_is_refused(make_server: Any) -> None:
    server = make_server(export_max_rows="2").start()
    async with server.client() as http:
        for n in range(3):
            await notify(http, "tester", "low", f"n{n}")
        refused = await http.get("/api/v1/notifications", params={"format": "csv"})
    assert_error(refused, 400, "export_too_large")
