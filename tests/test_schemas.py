"""The API's shapes: MessageOut's fast JSON path must say exactly what the model says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from models import MessageStatus, NewMessage, Priority
from schemas import JSON, MessageOut

NOW = datetime(2026, 11, 23, 23, 59, 1, 123456, tzinfo=UTC)


def message(**changes: object) -> NewMessage:
    fields: dict[str, object] = {
        "id": "01a20ad1-93b1-7000-a913-1539a846fa2f",
        "queue_id": 1,
        "body": '{"n":1,"text":"ação","big":100000000000000000000,"x":1.5e-7,"list":[null,true]}',
        "content_type": JSON,
        "type": "order.paid",
        "priority": Priority.high,
        "headers": {"trace": "abc"},
        "idempotency_key": None,
        "available_at": NOW,
        "created_at": NOW,
        "updated_at": NOW,
    }
    return NewMessage(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "row",
    [
        message(),
        message(body='plain text, "quoted" and ünïcode', content_type="text/plain; charset=utf-8"),
        message(available_at=NOW.astimezone(timezone(timedelta(hours=2))) + timedelta(days=1)),
        message(
            status=MessageStatus.dead,
            attempts=5,
            last_error="disk full",
            finished_at=NOW,
            lease_id="L",
            lease_expires_at=NOW,
            idempotency_key="k-1",
            priority=Priority.low,
        ),
    ],
    ids=["json", "text", "zoned-time", "dead"],
)
@pytest.mark.parametrize("deleted_at", [None, NOW], ids=["live", "deleted"])
def test_json_of_is_the_models_json(row: NewMessage, deleted_at: datetime | None) -> None:
    assert (
        MessageOut.json_of(row, "orders", deleted_at)
        == MessageOut.of(row, "orders", deleted_at).model_dump_json()
    )
