"""Exports: rows of a table turned into a CSV or XLSX download, streamed, never whole in memory.

A caller describes its table (`Column`s) and hands over an async iterator of rows; `paged` reads
a query in keyset batches and `capped` refuses an export past the row cap before anything is sent.
Messages and events are the two tables defined here.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import IO, Any, Literal, TypeVar

from fastapi.responses import Response, StreamingResponse

# openpyxl ships no type information.
from openpyxl import Workbook  # type: ignore[import-untyped]
from openpyxl.cell import WriteOnlyCell  # type: ignore[import-untyped]
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE  # type: ignore[import-untyped]
from openpyxl.styles import Font, PatternFill  # type: ignore[import-untyped]
from openpyxl.utils import get_column_letter  # type: ignore[import-untyped]
from tortoise.models import Model
from tortoise.queryset import QuerySet

from errors import bad_request
from event_log import queue_log, utc_text

# The JSON lists' own filters: an export matches its list exactly.
from hub import MessageFilter, filtered_messages
from models import Event, Message, MessageStatus, NotificationPriority, Priority, Queue, utcnow
from notifications import NotificationFilter, filtered_notifications

Format = Literal["json", "csv", "xlsx"]
Cell = str | int | float | datetime | None
Row = Sequence[Cell]
M = TypeVar("M", bound=Model)

CSV_TYPE = "text/csv; charset=utf-8"
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
BATCH_ROWS = 1000  # keys per query
# Rows held at once, what bounds an export's memory: 100 rows of 240 KiB bodies raised the peak
# by about 55 MiB (measured), 1 KiB bodies by about 6 MiB.
FETCH_ROWS = 100
CHUNK_BYTES = 64 * 1024
# Spreadsheets run a cell starting with these as a formula (OWASP "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
RED, YELLOW, GREEN = "FFFFC7CE", "FFFFEB9C", "FFC6EFCE"
PRIORITY_FILLS = {"urgent": RED, "high": RED, "normal": YELLOW, "medium": YELLOW, "low": GREEN}
HEADER_FILL, HEADER_FONT = "FF4472C4", "FFFFFFFF"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
# For a route's `responses=`: OpenAPI shows the downloads beside its JSON.
DOWNLOADS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or with `format=csv|xlsx` a download of every match (paging ignored)",
        "content": {
            CSV_TYPE: {"schema": {"type": "string"}},
            XLSX_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@dataclass(frozen=True)
class Column:
    name: str
    width: float = 14  # characters, in the XLSX sheet
    fills: Mapping[str, str] = field(default_factory=dict)  # cell text → ARGB background
    totals: tuple[str, ...] | None = None  # counted per value in the Summary sheet, these values first
    show: Callable[[Any], Cell] | None = None  # the stored value as a person reads it


@dataclass(frozen=True)
class Export:
    """One table to download: what `csv_response` and `xlsx_response` take."""

    name: str  # file name stem, e.g. "orders-messages"
    sheet: str  # title of the XLSX data sheet
    columns: Sequence[Column]
    rows: AsyncIterator[Row]
    about: Sequence[tuple[str, str]] = ()  # context lines for the Summary sheet
    at: datetime = field(default_factory=utcnow)


async def respond(export: Export, format: Format) -> Response:
    """The download in `format`, csv or xlsx."""
    return await xlsx_response(export) if format == "xlsx" else csv_response(export)


# Reading: keyset batches, capped ---------------------------------------------------------------


async def capped(query: QuerySet[M], key: str, cap: int) -> QuerySet[M]:
    """`query` bounded by its highest `key` now, so rows added meanwhile stay out; past `cap`, a 400."""
    top = await query.order_by(f"-{key}").limit(1).values_list(key, flat=True)
    bound: dict[str, Any] = {f"{key}__lte": top[0]} if top else {f"{key}__in": []}
    bounded = query.filter(**bound)
    count = await bounded.count()
    if count > cap:
        raise bad_request(
            "export_too_large",
            f"{count} rows match, more than the {cap} an export may hold: narrow the filters",
            count=count,
            max_rows=cap,
        )
    return bounded


async def paged(
    query: QuerySet[M], key: str, fields: Sequence[str], descending: bool = False
) -> AsyncIterator[tuple[Any, ...]]:
    """The `fields` of every row of `query` in `key` order, `FETCH_ROWS` at a time.

    Keys first, then their rows by primary key: sorting bare keys (often straight from an index)
    stays cheap, where sorting whole rows again for every batch would not.
    """
    model, pk = query.model, query.model._meta.pk_attr
    order, beyond = (f"-{key}", f"{key}__lt") if descending else (key, f"{key}__gt")
    found = await query.order_by(order).limit(BATCH_ROWS).values_list(key, pk)
    while found:
        for start in range(0, len(found), FETCH_ROWS):
            some = [row[1] for row in found[start : start + FETCH_ROWS]]
            for row in await model.filter(**{f"{pk}__in": some}).order_by(order).values_list(*fields):
                yield row
        if len(found) < BATCH_ROWS:
            return
        after = query.filter(**{beyond: found[-1][0]})
        found = await after.order_by(order).limit(BATCH_ROWS).values_list(key, pk)


# CSV --------------------------------------------------------------------------------------------


def csv_response(export: Export) -> StreamingResponse:
    return StreamingResponse(_csv_chunks(export), media_type=CSV_TYPE, headers=_download(export, "csv"))


async def _csv_chunks(export: Export) -> AsyncIterator[bytes]:
    buffer = io.StringIO()
    # Excel reads UTF-8 only with a byte order mark; `\r\n` and minimal quoting are its dialect.
    buffer.write("\ufeff")
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow([column.name for column in export.columns])
    async for row in _shown(export):
        writer.writerow([_csv_cell(value) for value in row])
        if buffer.tell() >= CHUNK_BYTES:
            yield _drain(buffer)
    yield _drain(buffer)


async def _shown(export: Export) -> AsyncIterator[Row]:
    shows = [column.show for column in export.columns]
    async for row in export.rows:
        yield [value if show is None else show(value) for show, value in zip(shows, row, strict=True)]


def _drain(buffer: io.StringIO) -> bytes:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text.encode()


def _csv_cell(value: Cell) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return utc_text(value.astimezone(UTC))
    return neutralise(value) if isinstance(value, str) else str(value)


def neutralise(text: str) -> str:
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


# XLSX -------------------------------------------------------------------------------------------


async def xlsx_response(export: Export) -> StreamingResponse:
    """Built in a temporary file first (a ZIP is only readable once complete), then streamed."""
    # Nameless, so its space returns when it closes, even after a crash; the stream closes it.
    file = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        await _write_workbook(export, file)
        size = file.seek(0, io.SEEK_END)
        file.seek(0)
    except BaseException:
        file.close()
        raise
    headers = {**_download(export, "xlsx"), "Content-Length": str(size)}
    return StreamingResponse(_file_chunks(file), media_type=XLSX_TYPE, headers=headers)


async def _file_chunks(file: IO[bytes]) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(file.read, CHUNK_BYTES):
            yield chunk
    finally:
        file.close()


async def _write_workbook(export: Export, file: IO[bytes]) -> None:
    book = Workbook(write_only=True)
    sheet = book.create_sheet(_UNSAFE_NAME.sub(" ", export.sheet)[:31])
    tally = _Tally(export.columns)
    try:
        _start_sheet(sheet, export.columns)
        async for batch in _batches(_shown(export)):
            tally.add(batch)
            # openpyxl is CPU work: off the event loop, so streams keep flowing meanwhile.
            await asyncio.to_thread(_append, sheet, export.columns, batch)
        last = get_column_letter(len(export.columns))
        sheet.auto_filter.ref = f"A1:{last}{tally.rows + 1}"
        _write_summary(book.create_sheet("Summary"), export, tally)
        await asyncio.to_thread(book.save, file)
    except BaseException:
        _discard(book)
        raise


async def _batches(rows: AsyncIterator[Row]) -> AsyncIterator[list[Row]]:
    batch: list[Row] = []
    async for row in rows:
        batch.append(row)
        if len(batch) == FETCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def _start_sheet(sheet: Any, columns: Sequence[Column]) -> None:
    """Widths and the frozen header must come before the first row in a write-only sheet."""
    for index, column in enumerate(columns, start=1):
        sheet.column_dimensions[get_column_letter(index)].width = max(column.width, len(column.name) + 2)
    sheet.freeze_panes = "A2"
    sheet.append([_header(sheet, column.name) for column in columns])


def _append(sheet: Any, columns: Sequence[Column], batch: list[Row]) -> None:
    for row in batch:
        sheet.append([_xlsx_cell(sheet, column, value) for column, value in zip(columns, row, strict=True)])


def _xlsx_cell(sheet: Any, column: Column, value: Cell) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None)  # Excel has no time zones: UTC, said in Summary
    if not isinstance(value, str):
        return value
    # Control characters make the file unreadable to Excel: they become U+FFFD.
    text = ILLEGAL_CHARACTERS_RE.sub("\ufffd", neutralise(value))
    if value not in column.fills:
        return text
    cell = WriteOnlyCell(sheet, text)
    cell.fill = _fill(column.fills[value])
    return cell


def _header(sheet: Any, text: str) -> Any:
    cell = WriteOnlyCell(sheet, text)
    cell.font = Font(bold=True, color=HEADER_FONT)
    cell.fill = _fill(HEADER_FILL)
    return cell


@cache
def _fill(argb: str) -> Any:
    return PatternFill(fill_type="solid", fgColor=argb, bgColor=argb)


class _Tally:
    """Rows per value of the totalled columns, counted as they stream past."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.rows = 0
        self.counts = {i: Counter[Cell]() for i, column in enumerate(columns) if column.totals is not None}

    def add(self, batch: list[Row]) -> None:
        self.rows += len(batch)
        for index, counter in self.counts.items():
            counter.update(row[index] for row in batch)


def _write_summary(sheet: Any, export: Export, tally: _Tally) -> None:
    sheet.column_dimensions["A"].width, sheet.column_dimensions["B"].width = 24, 40
    plain = Column("")
    sheet.append(["Exported at (UTC)", _xlsx_cell(sheet, plain, export.at)])
    for label, text in export.about:
        sheet.append([label, _xlsx_cell(sheet, plain, text)])
    sheet.append(["Rows", tally.rows])
    for index, counter in tally.counts.items():
        column = export.columns[index]
        sheet.append([])
        sheet.append([_header(sheet, f"By {column.name}"), _header(sheet, "rows")])
        known = column.totals or ()
        for value in [*known, *sorted(set(counter) - set(known), key=str)]:
            sheet.append([_xlsx_cell(sheet, column, value), counter[value]])


def _discard(book: Any) -> None:
    """An unsaved write-only workbook keeps a temporary file per sheet until exit: remove them now."""
    for sheet in book.worksheets:
        with contextlib.suppress(Exception):  # best effort: the error that got us here matters more
            sheet.close()  # ends its XML stream first, or that would write to the file once it is gone
            sheet._writer.cleanup()


def _download(export: Export, extension: str) -> dict[str, str]:
    stem = _UNSAFE_NAME.sub("_", export.name)
    stamp = export.at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return {
        "Content-Disposition": f'attachment; filename="{stem}-{stamp}.{extension}"',
        "Cache-Control": "no-store",
    }


# The tables: messages and events ---------------------------------------------------------------

TIME_WIDTH = 21
MESSAGE_COLUMNS = (
    Column("id", 38),
    Column("created_at", TIME_WIDTH),
    Column("status", 11, totals=tuple(s.value for s in MessageStatus), show=lambda s: MessageStatus(s).value),
    Column("priority", 10, PRIORITY_FILLS, tuple(p.name for p in Priority), lambda p: Priority(p).name),
    Column("type", 18),
    Column("attempts", 9),
    Column("body", 60),  # a JSON body is stored, and exported, as compact JSON text
    Column("content_type", 26),
    Column("available_at", TIME_WIDTH),
    Column("finished_at", TIME_WIDTH),
    Column("last_error", 40),
    Column("idempotency_key", 24),
)
EVENT_COLUMNS = (
    Column("seq", 10),
    Column("at", TIME_WIDTH),
    Column("type", 20, totals=()),
    Column("data", 80),  # stored as JSON text
)


async def message_export(queue: Queue, where: MessageFilter, cap: int) -> Export:
    query = await capped(filtered_messages(Message.filter(queue_id=queue.id), where), "id", cap)
    # Ids are UUIDv7: id order is creation order, and a unique key to page by.
    rows = paged(query, "id", [column.name for column in MESSAGE_COLUMNS])
    about = (("Queue", queue.name), ("Filters", _described(where)))
    return Export(f"{queue.name}-messages", "Messages", MESSAGE_COLUMNS, rows, about)


async def event_export(queue: Queue, after: int, cap: int) -> Export:
    query = await capped(Event.filter(log=queue_log(queue.name), seq__gt=after), "seq", cap)
    rows = paged(query, "seq", [column.name for column in EVENT_COLUMNS])
    about = (("Queue", queue.name), ("After sequence", str(after)))
    return Export(f"{queue.name}-events", "Events", EVENT_COLUMNS, rows, about)


NOTIFICATION_COLUMNS = (
    Column("id", 38),
    Column("created_at", TIME_WIDTH),
    Column(
        "priority",
        10,
        PRIORITY_FILLS,
        tuple(p.name for p in NotificationPriority),
        lambda p: NotificationPriority(p).name,
    ),
    Column("type", 18, totals=()),
    Column("title", 40),
    Column("message", 60),
    Column("is_read", 8, totals=()),
    Column("read_at", TIME_WIDTH),
    Column("queue", 18),
    Column("message_id", 38),
    Column("action_url", 40),
    Column("expires_at", TIME_WIDTH),
)


async def notification_export(subject: str, where: NotificationFilter, cap: int) -> Export:
    query = await capped(filtered_notifications(subject, where), "id", cap)
    rows = paged(query, "id", [column.name for column in NOTIFICATION_COLUMNS], descending=True)
    return Export("notifications", "Notifications", NOTIFICATION_COLUMNS, rows, (("Recipient", subject),))


def _described(where: MessageFilter) -> str:
    given = {
        "status": where.status.value if where.status is not None else None,
        "type": where.type,
        "priority": where.priority.name if where.priority is not None else None,
        "created_after": utc_text(where.created_after.astimezone(UTC)) if where.created_after else None,
        "created_before": utc_text(where.created_before.astimezone(UTC)) if where.created_before else None,
    }
    return ", ".join(f"{name}={value}" for name, value in given.items() if value is not None) or "none"
