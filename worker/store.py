"""The worker's SQL writes: claim a chunk, record results idempotently, keep batch counts and state true.

Every state change is conditional (`... WHERE status = 'running'`), results are upserted on the item's
primary key, and batch counts are recomputed from the items: a redelivered or duplicate chunk can
neither create a second result nor count an item twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from schema.db import utcnow
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, EngineBatch, Item, Result


@dataclass
class Claimed:
    id: int
    custom_id: str
    request: dict[str, Any]
    enqueued_at: datetime | None


@dataclass
class Outcome:
    """What happened to one claimed item."""

    item: Claimed
    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def claim(session: Session, batch_id: str, item_ids: list[int], host: str, lease_s: float) -> list[Claimed]:
    """Mark the chunk's runnable items running under a lease; items another worker holds are skipped."""
    now = utcnow()
    runnable = or_(
        Item.status == ItemStatus.queued,
        and_(Item.status == ItemStatus.running, Item.lease_expires_at < now),  # owner died
    )
    stmt = (
        update(Item)
        .where(Item.id.in_(item_ids), Item.batch_id == batch_id, runnable)
        .values(
            status=ItemStatus.running,
            attempts=Item.attempts + 1,
            started_at=now,
            worker_host=host,
            lease_expires_at=now + timedelta(seconds=lease_s),
        )
        .returning(Item.id, Item.custom_id, Item.request, Item.enqueued_at)
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(stmt).all()
    session.commit()
    return sorted((Claimed(*row) for row in rows), key=lambda c: c.id)


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


def _insert(session: Session):  # type: ignore[no-untyped-def]
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def write_outcomes(session: Session, batch_id: str, outcomes: list[Outcome], *, engine: str, model: str,
                   engine_batch_id: int, started: datetime, finished: datetime) -> None:
    """Upsert results and finish the items in one transaction; a repeat of the same chunk changes nothing."""
    ok = [o for o in outcomes if o.error is None]
    if ok:
        rows = [{"item_id": o.item.id, "batch_id": batch_id, "custom_id": o.item.custom_id,
                 "output_text": o.text, "finish_reason": o.finish_reason, "prompt_tokens": o.prompt_tokens,
                 "completion_tokens": o.completion_tokens, "created_at": finished} for o in ok]
        session.execute(_insert(session)(Result).on_conflict_do_nothing(index_elements=["item_id"]), rows)
    engine_s = (finished - started).total_seconds()
    finish = (
        update(Item.__table__)
        .where(Item.__table__.c.id == bindparam("b_id"), Item.__table__.c.status == ItemStatus.running)
        .values(status=bindparam("b_status"), last_error=bindparam("b_error"), finished_at=finished,
                engine_s=engine_s, queue_wait_s=bindparam("b_wait"), tokens_per_s=bindparam("b_tps"),
                engine=engine, model=model, engine_batch_id=engine_batch_id, lease_expires_at=None)
    )
    session.execute(finish, [_finish_params(o, started, engine_s) for o in outcomes])
    session.commit()


def _finish_params(o: Outcome, started: datetime, engine_s: float) -> dict[str, Any]:
    wait = None
    if o.item.enqueued_at is not None:
        enq = o.item.enqueued_at if o.item.enqueued_at.tzinfo else o.item.enqueued_at.replace(tzinfo=started.tzinfo)
        wait = max(0.0, (started - enq).total_seconds())
    return {
        "b_id": o.item.id,
        "b_status": ItemStatus.failed if o.error else ItemStatus.succeeded,
        "b_error": o.error,
        "b_wait": wait,
        "b_tps": o.completion_tokens / engine_s if engine_s > 0 and not o.error else None,
    }


def release(session: Session, item_ids: list[int], error: str) -> None:
    """Hand claimed items back to the queue (the chunk will be retried), keeping the error for the record."""
    session.execute(
        update(Item)
        .where(Item.id.in_(item_ids), Item.status == ItemStatus.running)
        .values(status=ItemStatus.queued, last_error=error, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def fail_open_items(session: Session, batch_id: str, item_ids: list[int], error: str) -> None:
    session.execute(
        update(Item)
        .where(Item.id.in_(item_ids), Item.batch_id == batch_id,
               Item.status.in_([ItemStatus.queued, ItemStatus.running]))
        .values(status=ItemStatus.failed, last_error=error, finished_at=utcnow(), lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def refresh_batch(session: Session, batch_id: str) -> str:
    """Recompute the batch's counts from its items and move it on when nothing is left to run."""
    counts = dict(session.execute(
        select(Item.status, func.count()).where(Item.batch_id == batch_id).group_by(Item.status)
    ).all())
    batch = session.get(Batch, batch_id, with_for_update=True)
    if batch is None:
        return ""
    batch.succeeded = counts.get(ItemStatus.succeeded, 0)
    batch.failed = counts.get(ItemStatus.failed, 0)
    open_items = counts.get(ItemStatus.queued, 0) + counts.get(ItemStatus.running, 0)
    now = utcnow()
    if batch.status == BatchStatus.in_progress and open_items == 0:
        batch.finalizing_at = now  # results are already in SQL; finalizing is instantaneous
        batch.status, batch.completed_at = BatchStatus.completed, now
    elif batch.status == BatchStatus.cancelling and counts.get(ItemStatus.running, 0) == 0:
        batch.status, batch.cancelled_at = BatchStatus.cancelled, now
    session.commit()
    return batch.status
