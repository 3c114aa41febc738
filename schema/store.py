"""The SQL writes of running a batch: claim a chunk, record results idempotently, keep batch counts true.

Every state change is conditional (`... WHERE status = 'running'`), results are upserted on the item's
primary key, and a batch counter grows only by the items that this very statement moved: a
redelivered or duplicate chunk can neither create a second result nor count an item twice.

A claim is fenced: it gives its items a lease id, and finishing or handing back a running item
requires that id, so a worker that lost its lease (cut off from the network past it, while another
worker took the items over) changes nothing when it comes back. Leases are stamped and judged in the
database's clock (`db_now`), which every host shares. The caller owns the transaction.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Float, String, and_, case, cast, or_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from schema.db import aware, db_now, seconds_between
from schema.errors import ErrorCode
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, EngineBatch, Item, Result

log = logging.getLogger(__name__)


@dataclass
class Claimed:
    id: int
    custom_id: str
    request: dict[str, Any]
    enqueued_at: datetime | None
    attempts: int  # this claim included
    last_error: str | None
    interrupted: bool  # an earlier run of it failed or never ended
    error_code: str | None = None  # of its last failed run
    cache_key: str | None = None  # schema.cache; None: not cached
    parent_id: int | None = None  # a window's document item (map-reduce)
    round: int = 0  # a window's round; a document item's: the round of its windows (0: never split)
    lease: str = ""  # the claim's lease id: what finishing or releasing the item requires
    started_at: datetime | None = None  # when it was claimed, in the database's clock


@dataclass
class Outcome:
    """What happened to one claimed item."""

    item: Claimed
    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated_tokens: int = 0  # document tokens cut to fit the context
    error: str | None = None
    error_code: str | None = None  # schema.errors.ErrorCode, set with `error` (engine_error when not)
    windows: list[dict[str, Any]] | None = None  # too long: the requests of its windows (it waits for them)


def claim(session: Session, batch_id: str, item_ids: list[int], host: str, lease_s: float) -> list[Claimed]:
    """Mark the chunk's runnable items running under a new lease; items another worker holds are skipped."""
    now, lease = db_now(session), secrets.token_hex(8)
    runnable = or_(
        Item.status == ItemStatus.queued,
        and_(Item.status == ItemStatus.running, Item.lease_expires_at < now),  # owner died, or was cut off
    )
    stmt = (
        update(Item)
        .where(Item.id.in_(item_ids), Item.batch_id == batch_id, runnable)
        .values(
            status=ItemStatus.running,
            attempts=Item.attempts + 1,
            interrupted=case((Item.status == ItemStatus.running, True), else_=Item.interrupted),
            started_at=now,
            worker_host=host,
            lease_id=lease,
            lease_expires_at=db_now(session, lease_s),
        )
        .returning(Item.id, Item.custom_id, Item.request, Item.enqueued_at, Item.attempts, Item.last_error,
                   Item.interrupted, Item.error_code, Item.cache_key, Item.parent_id, Item.round, Item.lease_id,
                   Item.started_at)
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(stmt).all()
    return sorted((Claimed(*row) for row in rows), key=lambda c: c.id)


def holding(claimed: list[Claimed]):  # type: ignore[no-untyped-def]
    """SQL condition: the item is running under the lease this worker's claim gave it."""
    leases = {c.id: c.lease for c in claimed}
    return (Item.status == ItemStatus.running) & (Item.lease_id == case(leases, value=Item.id))


def record_engine_batch(session: Session, batch_id: str, host: str, engine: str, model: str,
                        outcomes: list[Outcome], started: datetime, finished: datetime) -> int:
    row = EngineBatch(
        batch_id=batch_id, worker_host=host, engine=engine, model=model, n_items=len(outcomes),
        started_at=started, finished_at=finished, engine_s=(finished - started).total_seconds(),
        prompt_tokens=sum(o.prompt_tokens for o in outcomes),
        completion_tokens=sum(o.completion_tokens for o in outcomes),
    )
    session.add(row)
    session.flush()
    return row.id


def insert_ignore(session: Session, table: Any, rows: list[dict[str, Any]], key: str = "item_id") -> None:
    """Insert rows, skipping those whose `key` exists: a repeat of the same chunk inserts nothing.
    executemany, not one multi-row VALUES: its SQL is compiled and parsed once, not per chunk."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(table).on_conflict_do_nothing(index_elements=[key]), rows)


def write_outcomes(session: Session, batch_id: str, outcomes: list[Outcome], *, engine: str, model: str,
                   engine_batch_id: int, started: datetime, finished: datetime) -> list[Outcome]:
    """Finish the items still running under this claim's lease, then store results for exactly those;
    count them; return the outcomes that succeeded now. A repeat of the same chunk, or a late run of
    items another worker has taken over, changes nothing."""
    engine_s = (finished - started).total_seconds()
    rows = {o.item.id: _outcome_row(o, engine_s) for o in outcomes}

    def per_item(field: int, type_: Any = None):  # type: ignore[no-untyped-def]
        values = case({item_id: row[field] for item_id, row in rows.items()}, value=Item.id)
        # CAST: were every value NULL (a chunk whose items all failed), PostgreSQL would type the CASE as text.
        return cast(values, type_) if type_ is not None else values

    # One statement for the chunk (per-item values by CASE on the primary key); RETURNING says which moved.
    finish = (
        update(Item)
        .where(Item.id.in_(list(rows)), holding([o.item for o in outcomes]))
        .values(status=per_item(0), last_error=per_item(1), queue_wait_s=per_item(2, Float),
                tokens_per_s=per_item(3, Float), error_code=per_item(4, String(32)),
                finished_at=db_now(session), engine_s=engine_s, engine=engine, model=model,
                engine_batch_id=engine_batch_id, lease_expires_at=None)
        .returning(Item.id, Item.status)
        .execution_options(synchronize_session=False)
    )
    moved = dict(session.execute(finish).all())
    if len(moved) < len(rows):  # fenced off: the reconciler requeued them when the lease ran out
        log.warning("batch %s: %d of %d results discarded: their lease was lost (this worker was cut off past it, "
                    "and the items went back to the queue or to another worker)", batch_id, len(rows) - len(moved),
                    len(rows), extra={"batch_id": batch_id, "discarded": len(rows) - len(moved)})
    succeeded = [o for o in outcomes if moved.get(o.item.id) == ItemStatus.succeeded]
    documents = {o.item.id for o in outcomes if o.item.parent_id is None}  # windows are not the batch's items
    if succeeded:
        results = [{"item_id": o.item.id, "batch_id": batch_id, "custom_id": o.item.custom_id,
                    "output_text": o.text, "finish_reason": o.finish_reason, "prompt_tokens": o.prompt_tokens,
                    "completion_tokens": o.completion_tokens, "truncated_tokens": o.truncated_tokens,
                    "created_at": finished} for o in succeeded]
        insert_ignore(session, Result, results)
    failed = sum(1 for item_id, status in moved.items() if status == ItemStatus.failed and item_id in documents)
    count(session, batch_id, succeeded=sum(1 for o in succeeded if o.item.id in documents), failed=failed)
    return succeeded


def count(session: Session, batch_id: str, **moved: int) -> None:
    """Add items that just reached a terminal state to the batch's counters (same transaction)."""
    increments = {name: getattr(Batch, name) + n for name, n in moved.items() if n}
    if increments:
        session.execute(update(Batch).where(Batch.id == batch_id).values(increments))


def _outcome_row(o: Outcome, engine_s: float) -> tuple[Any, ...]:
    started = o.item.started_at and aware(o.item.started_at)
    wait = seconds_between(o.item.enqueued_at, started)  # both in the database's clock
    status = ItemStatus.waiting if o.windows is not None else ItemStatus.failed if o.error else ItemStatus.succeeded
    return (
        status.value,
        o.error,
        None if wait is None else max(0.0, wait),
        o.completion_tokens / engine_s if engine_s > 0 and not o.error else None,
        (o.error_code or ErrorCode.engine_error.value) if o.error else None,
    )


def release(session: Session, claimed: list[Claimed], error: str, refund_attempt: bool = False,
            code: ErrorCode = ErrorCode.engine_error) -> None:
    """Hand claimed items back to the queue, keeping the error for the record; `refund_attempt` when
    the claim did not really try them (a chunk split before running)."""
    session.execute(
        update(Item)
        .where(Item.id.in_([c.id for c in claimed]), holding(claimed))
        .values(status=ItemStatus.queued, lease_id=None, lease_expires_at=None, interrupted=not refund_attempt,
                attempts=Item.attempts - 1 if refund_attempt else Item.attempts,
                last_error=Item.last_error if refund_attempt else error,
                error_code=Item.error_code if refund_attempt else code.value)
        .execution_options(synchronize_session=False)
    )


def fail_claimed(session: Session, batch_id: str, claimed: list[Claimed], error: str, code: str) -> list[int]:
    """Fail the items this claim holds; returns the document items of the windows among them (map-reduce)."""
    failed = session.execute(
        update(Item)
        .where(Item.id.in_([c.id for c in claimed]), Item.batch_id == batch_id, holding(claimed))
        .values(status=ItemStatus.failed, last_error=error, error_code=code, finished_at=db_now(session),
                lease_expires_at=None)
        .returning(Item.id, Item.parent_id)
        .execution_options(synchronize_session=False)
    ).all()
    count(session, batch_id, failed=sum(1 for _, parent in failed if parent is None))
    return sorted({parent for _, parent in failed if parent is not None})


def cancel_queued(session: Session, batch_id: str) -> None:
    """Cancel every item not started yet, and documents waiting for their windows; running items finish
    and keep their results."""
    cancelled = session.execute(
        update(Item)
        .where(Item.batch_id == batch_id, Item.status.in_([ItemStatus.queued, ItemStatus.waiting]))
        .values(status=ItemStatus.cancelled, finished_at=db_now(session), last_error="batch cancelled",
                error_code=ErrorCode.batch_cancelled.value)
        .returning(Item.parent_id)
        .execution_options(synchronize_session=False)
    ).all()
    count(session, batch_id, cancelled=sum(1 for (parent,) in cancelled if parent is None))


def close_if_done(session: Session, batch_id: str) -> None:
    """Move the batch on once every item has ended: `completed`, or `cancelled` if it was cancelling."""
    now = db_now(session)
    ended = Batch.succeeded + Batch.failed + Batch.cancelled + Batch.expired >= Batch.total
    for status, values in (
        (BatchStatus.in_progress, {"status": BatchStatus.completed, "finalizing_at": now, "completed_at": now}),
        (BatchStatus.cancelling, {"status": BatchStatus.cancelled, "cancelled_at": now}),
    ):
        session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == status, ended).values(values))
