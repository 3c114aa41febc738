"""Storing a parsed batch: the batch row and all its items in one transaction, then one task per chunk.

SQL holds everything before the broker sees a message, so the broker only delivers: a batch that could
not be enqueued is marked failed, and the reconciler re-sends what the broker lost.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec
from sqlalchemy import insert, select, text, update
from sqlalchemy.orm import Session

from schema import cache, store
from schema.db import db_clock, get_engine, get_sessionmaker, utcnow
from schema.errors import BrokerError
from schema.inputs import ParsedItem
from schema.kinds.base import Stored
from schema.queue import DEFAULT_PRIORITY, Queue, batched
from schema.settings import Settings, redact
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, Item

INSERT_ROWS_PER_STATEMENT = 5000
ANALYZE_AFTER_ITEMS = 1000


@dataclass(frozen=True)
class NewBatch:
    """Everything a batch row records besides its items."""

    kind: str
    model: str
    project: str
    params: dict[str, Any]  # the kind's spec
    input_file: str
    metadata: dict[str, Any]
    window_s: int
    request_key: str | None = None  # see Batch.request_key
    priority: int = DEFAULT_PRIORITY  # 0-9, 9 most urgent (schema.queue)


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def refresh_planner_stats(settings: Settings, n_items: int) -> None:
    """ANALYZE the items table after a large insert. With statistics from before it, PostgreSQL claimed
    each chunk by scanning the batch's (batch_id, status) index instead of the primary key: measured
    at 100,000 items, 52 ms per claim instead of 4, and the worker's claims saturated the database.
    Only the columns claims and the reconciler filter on: at 100,000 items 0.12 s instead of 0.8-1.0 s for
    every column (the JSON ones are wide); autovacuum's ANALYZE covers the rest later."""
    engine = get_engine(settings.database_url)
    if engine.dialect.name == "postgresql" and n_items >= ANALYZE_AFTER_ITEMS:
        with engine.connect() as conn:  # its own short transaction: ANALYZE locks out other ANALYZEs
            conn.execute(text("ANALYZE items (id, batch_id, status)"))
            conn.commit()


def store_batch(settings: Settings, batch_id: str, new: NewBatch, items: Iterator[ParsedItem],
                key: Callable[[Any], str | None] | None = None, stored: list[Stored] | None = None,
                admit: Callable[[int], None] | None = None) -> int:
    """The batch row and every item row as `items` are read, in one transaction (PostgreSQL: COPY), with
    the rows the kind stores beside them (Kind.prepare): an InputError from a line, or `admit(n_items)`
    refusing them at the end (a quota), stores nothing, and memory holds no more than a line's items.
    `key(request)`: each item's cache key (schema.cache), and items whose key has a cached answer are
    stored answered. Returns how many were."""
    if get_engine(settings.database_url).dialect.name == "sqlite":
        # SQLite has one writer at a time: read the whole input before taking the lock, so workers'
        # writes do not wait for the parsing (an SQLite database is one host's, batches are smaller).
        items = iter(list(items))
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        now = db_clock(session)  # the clock the reconciler judges the completion window by
        head = next(items)  # an empty input raised InputError already
        batch = Batch(
            id=batch_id, kind=new.kind, project=new.project, endpoint=head.endpoint, model=new.model,
            params=new.params,
            status=BatchStatus.in_progress, input_file=new.input_file, metadata_=new.metadata, errors=[],
            total=0, succeeded=0, failed=0, cancelled=0,
            completion_window_s=new.window_s, expires_at=now + timedelta(seconds=new.window_s), expired=0,
            created_at=now, in_progress_at=now, request_key=new.request_key, priority=new.priority,
        )
        for row in stored or []:
            store.insert_ignore(session, row.table, [row.row], key=row.key)
        session.add(batch)
        session.flush()
        counted = Counter[str]()

        def rows() -> Iterator[dict[str, Any]]:
            for item in itertools.chain([head], items):
                counted["total"] += 1
                counted["failed"] += item.error is not None
                yield _item_row(batch_id, item, now, key(item.request) if key and item.error is None else None)

        if session.get_bind().dialect.name == "postgresql":
            _copy_items(session, rows())
        else:
            for chunk in batched(rows(), INSERT_ROWS_PER_STATEMENT):
                session.execute(insert(Item), chunk)  # executemany: a few statements, not one per item
        if admit is not None:
            admit(counted["total"])
        session.execute(update(Batch).where(Batch.id == batch_id).values(total=counted["total"],
                                                                         failed=counted["failed"]))
        hits = len(cache.answer(session, batch_id, cache.keys_answered(session, batch_id), ItemStatus.queued,
                                now)) if key else 0
    refresh_planner_stats(settings, counted["total"])
    return hits


def store_invalid(settings: Settings, batch_id: str, new: NewBatch, endpoint: str, errors: list[dict[str, Any]]) -> None:
    """A batch whose input failed validation, recorded as `failed` with the problems, no items (what
    OpenAI's Batch API does; the CLI and Python API raise InputError instead)."""
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        now = db_clock(session)
        session.add(Batch(
            id=batch_id, kind=new.kind, project=new.project, endpoint=endpoint, model=new.model, params=new.params,
            status=BatchStatus.failed, input_file=new.input_file, metadata_=new.metadata, errors=errors, total=0,
            succeeded=0, failed=0, cancelled=0, expired=0, completion_window_s=new.window_s,
            expires_at=now + timedelta(seconds=new.window_s), created_at=now, failed_at=now,
            request_key=new.request_key, priority=new.priority))


ITEM_COLUMNS = ("batch_id", "line", "custom_id", "endpoint", "request", "body", "status", "last_error",
                "error_code", "attempts", "interrupted", "enqueued_at", "finished_at", "cache_key")


def _item_row(batch_id: str, item: ParsedItem, now: Any, cache_key: str | None) -> dict[str, Any]:
    return {
        "cache_key": cache_key,
        "batch_id": batch_id, "line": item.line, "custom_id": item.custom_id, "endpoint": item.endpoint,
        "request": item.request.model_dump(exclude_none=True), "body": item.body,
        "status": ItemStatus.failed if item.error else ItemStatus.queued,
        "last_error": item.error, "error_code": str(item.error_code) if item.error_code else None,
        "attempts": 0, "interrupted": False, "enqueued_at": now,
        "finished_at": now if item.error else None,
    }


def _copy_items(session: Session, rows: Iterator[dict[str, Any]]) -> None:
    """PostgreSQL's COPY: the fastest way in, in the same transaction as the batch row."""
    raw = session.connection().connection.driver_connection
    assert raw is not None  # a live connection: the batch row was just flushed on it
    with raw.cursor() as cursor, cursor.copy(f"COPY items ({', '.join(ITEM_COLUMNS)}) FROM STDIN") as copy:
        for row in rows:
            row["request"], row["body"] = _json_text(row["request"]), _json_text(row["body"])
            copy.write_row([row[column] for column in ITEM_COLUMNS])


def _json_text(value: Any) -> str:
    return msgspec.json.encode(value).decode()  # 5x json.dumps; the same JSON values (as UTF-8, not escaped)


def enqueue(settings: Settings, queue: Queue, batch_id: str, model: str, kind: str,
            priority: int = DEFAULT_PRIORITY) -> None:
    """Send one task per chunk of queued item ids; SQL already holds everything, the broker only delivers."""
    make_session = get_sessionmaker(settings.database_url)
    try:
        with make_session() as session:  # the ids streamed from SQL (a server-side cursor on PostgreSQL)
            ids = session.scalars(select(Item.id).where(Item.batch_id == batch_id, Item.status == ItemStatus.queued)
                                  .order_by(Item.line).execution_options(yield_per=10_000))
            queue.send_chunks(batch_id, model, kind, ids, priority)
    except Exception as exc:  # kombu raises many kinds; all mean "not delivered"
        _mark_failed(settings, batch_id, f"could not enqueue on {redact(settings.broker_url)}: {type(exc).__name__}")
        raise BrokerError(f"batch {batch_id} was stored but could not be enqueued on "
                          f"{redact(settings.broker_url)}: {type(exc).__name__}: {redact(str(exc))} (is the broker "
                          f"running? check GRISTMILL_BROKER_URL)") from exc
    with make_session() as session, session.begin():
        store.close_if_done(session, batch_id)  # a batch whose every line failed validation ends now


def _mark_failed(settings: Settings, batch_id: str, message: str) -> None:
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        batch = session.get(Batch, batch_id)
        if batch is not None:
            batch.status, batch.failed_at = BatchStatus.failed, utcnow()
            batch.errors = [*batch.errors, {"code": "enqueue_failed", "message": message}]
