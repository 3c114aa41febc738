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

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    Insert,
    String,
    Update,
    and_,
    bindparam,
    case,
    insert,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from schema.db import among, built_once, db_now, rows_json, rows_table, seconds
from schema.errors import ErrorCode
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, EngineBatch, Item, Result, table_of

log = logging.getLogger(__name__)
# The statements every chunk runs on its items are Core, on the table: the ORM's bulk-DML layer costs as
# much Python per statement as building one, and they use nothing of it.
ITEMS = table_of(Item)


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
    rows = session.execute(_claim(session, lease_s), {"ids": item_ids, "of_batch": batch_id, "host": host,
                                                      "lease": secrets.token_hex(8)}).all()
    return sorted((Claimed(*row) for row in rows), key=lambda c: c.id)


@built_once
def _claim(dialect: str, lease_s: float) -> Update:
    now, item = db_now(dialect), ITEMS.c
    runnable = or_(
        item.status == ItemStatus.queued,
        and_(item.status == ItemStatus.running, item.lease_expires_at < now),  # owner died, or was cut off
    )
    return (
        update(ITEMS)
        .where(among(dialect, item.id, param="ids"), item.batch_id == bindparam("of_batch"), runnable)
        .values(
            status=ItemStatus.running,
            attempts=item.attempts + 1,
            interrupted=case((item.status == ItemStatus.running, True), else_=item.interrupted),
            started_at=now,
            worker_host=bindparam("host"),
            lease_id=bindparam("lease"),
            lease_expires_at=db_now(dialect, lease_s),
        )
        .returning(item.id, item.custom_id, item.request, item.enqueued_at, item.attempts, item.last_error,
                   item.interrupted, item.error_code, item.cache_key, item.parent_id, item.round, item.lease_id,
                   item.started_at)
    )


def holding(claimed: list[Claimed]):  # type: ignore[no-untyped-def]
    """SQL condition: the item is running under the lease this worker's claim gave it (one lease for
    all the items of a claim; a CASE on the item id for items of several)."""
    leases = {c.lease for c in claimed}
    lease = leases.pop() if len(leases) == 1 else case({c.id: c.lease for c in claimed}, value=Item.id)
    return (Item.status == ItemStatus.running) & (Item.lease_id == lease)


def record_engine_batch(session: Session, batch_id: str, host: str, engine: str, model: str,
                        outcomes: list[Outcome], started: datetime, finished: datetime) -> int:
    return session.execute(_RECORD_ENGINE_BATCH, {
        "batch_id": batch_id, "worker_host": host, "engine": engine, "model": model, "n_items": len(outcomes),
        "started_at": started, "finished_at": finished, "engine_s": (finished - started).total_seconds(),
        "prompt_tokens": sum(o.prompt_tokens for o in outcomes),
        "completion_tokens": sum(o.completion_tokens for o in outcomes),
    }).scalar_one()


_RECORD_ENGINE_BATCH = insert(table_of(EngineBatch)).returning(EngineBatch.id)  # Core: one row, no ORM bulk mode


def insert_ignore(session: Session, table: Any, rows: list[dict[str, Any]], key: str = "item_id") -> None:
    """Insert rows, skipping those whose `key` exists: a repeat of the same chunk inserts nothing.
    executemany, not one multi-row VALUES: its SQL is compiled and parsed once, not per chunk."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(table).on_conflict_do_nothing(index_elements=[key]), rows)


# What write_outcomes joins per item: the claim's lease (fencing) and the outcome's values.
OUTCOME_COLUMNS = {"id": BigInteger, "lease": String, "status": String, "error": String, "error_code": String,
                   "tokens_per_s": Float}
RESULT_COLUMNS = {"item_id": BigInteger, "custom_id": String, "output_text": String, "finish_reason": String,
                  "prompt_tokens": BigInteger, "completion_tokens": BigInteger, "truncated_tokens": BigInteger}


@dataclass
class Written:
    succeeded: list[Outcome]  # the outcomes that succeeded now (their results are stored)
    ended: dict[str, int]  # what to add to the batch's counters (`count`): its items that ended now


# 'running' as a subquery, not a constant: PostgreSQL would read the constant in statistics taken when the
# batch was submitted (none running then), plan for one running item, and compare every running item with
# every outcome (a nested loop: 318 ms for 1,024 outcomes); for a value it cannot see it plans the lookup
# by primary key (19 ms; EXPLAIN ANALYZE, 1,024 outcomes, 50,000 items).
_RUNNING = select(literal(ItemStatus.running.value)).scalar_subquery()


def write_outcomes(session: Session, batch_id: str, outcomes: list[Outcome], *, engine: str, model: str,
                   engine_batch_id: int, started: datetime, finished: datetime) -> Written:
    """Finish the items still running under this claim's lease, then store results for exactly those.
    A repeat of the same chunk, or a late run of items another worker has taken over, changes nothing.
    Two statements whatever the chunk's size: per-item values come as a joined table of rows
    (`rows_table`), the queue wait is computed in SQL. The caller counts `ended` last in its
    transaction: from that update to the commit the batch's row is locked, and every chunk of the
    batch needs that lock."""
    engine_s = (finished - started).total_seconds()
    moved: dict[int, str] = dict(session.execute(_finish(session), {
        "v": rows_json([_outcome_row(o, engine_s) for o in outcomes]), "chunk_engine_s": engine_s,
        "by_engine": engine, "by_model": model, "chunk_id": engine_batch_id}).all())
    if len(moved) < len(outcomes):  # fenced off: the reconciler requeued them when the lease ran out
        log.warning("batch %s: %d of %d results discarded: their lease was lost (this worker was cut off past it, "
                    "and the items went back to the queue or to another worker)", batch_id,
                    len(outcomes) - len(moved), len(outcomes),
                    extra={"batch_id": batch_id, "discarded": len(outcomes) - len(moved)})
    succeeded = [o for o in outcomes if moved.get(o.item.id) == ItemStatus.succeeded]
    if succeeded:
        session.execute(_insert_results(session), {"of_batch": batch_id, "finished": finished, "r": rows_json([
            (o.item.id, o.item.custom_id, o.text, o.finish_reason, o.prompt_tokens, o.completion_tokens,
             o.truncated_tokens) for o in succeeded])})
    documents = {o.item.id for o in outcomes if o.item.parent_id is None}  # windows are not the batch's items
    failed = sum(1 for item_id, status in moved.items() if status == ItemStatus.failed and item_id in documents)
    return Written(succeeded, {"succeeded": sum(1 for o in succeeded if o.item.id in documents), "failed": failed})


@built_once
def _finish(dialect: str) -> Update:
    v, item = rows_table(dialect, "v", OUTCOME_COLUMNS), ITEMS.c
    wait = seconds(dialect, item.enqueued_at, item.started_at)  # both in the database's clock
    return (
        update(ITEMS)
        .where(item.id == v.c.id, item.status == _RUNNING, item.lease_id == v.c.lease)
        .values(status=v.c.status, last_error=v.c.error, error_code=v.c.error_code, tokens_per_s=v.c.tokens_per_s,
                queue_wait_s=case((wait < 0, 0.0), else_=wait), finished_at=db_now(dialect),
                engine_s=bindparam("chunk_engine_s", type_=Float()), engine=bindparam("by_engine"),
                model=bindparam("by_model"), engine_batch_id=bindparam("chunk_id"), lease_expires_at=None)
        .returning(item.id, item.status)
    )


@built_once
def _insert_results(dialect: str) -> Insert:
    """One INSERT ... SELECT from the rows; an item's result that exists already stays."""
    r = rows_table(dialect, "r", RESULT_COLUMNS)
    insert_ = pg_insert if dialect == "postgresql" else sqlite_insert
    rows = select(*r.c, bindparam("of_batch", type_=String()).label("batch_id"),
                  bindparam("finished", type_=DateTime(timezone=True)).label("created_at"))
    # WHERE true: SQLite parses `ON CONFLICT` after `INSERT ... SELECT` only when the SELECT has a WHERE.
    return (insert_(table_of(Result)).from_select([*RESULT_COLUMNS, "batch_id", "created_at"], rows.where(true()))
            .on_conflict_do_nothing(index_elements=["item_id"]))


def count(session: Session, batch_id: str, **moved: int) -> None:
    """Add items that just reached a terminal state to the batch's counters (same transaction)."""
    increments = {name: getattr(Batch, name) + n for name, n in moved.items() if n}
    if increments:
        session.execute(update(Batch).where(Batch.id == batch_id).values(increments))


def _outcome_row(o: Outcome, engine_s: float) -> tuple[Any, ...]:
    status = ItemStatus.waiting if o.windows is not None else ItemStatus.failed if o.error else ItemStatus.succeeded
    return (
        o.item.id,
        o.item.lease,
        status.value,
        o.error,
        (o.error_code or ErrorCode.engine_error.value) if o.error else None,
        o.completion_tokens / engine_s if engine_s > 0 and not o.error else None,
    )


def release(session: Session, claimed: list[Claimed], error: str, refund_attempt: bool = False,
            code: ErrorCode = ErrorCode.engine_error) -> None:
    """Hand claimed items back to the queue, keeping the error for the record; `refund_attempt` when
    the claim did not really try them (a chunk split before running)."""
    session.execute(
        update(Item)
        .where(among(session, Item.id, [c.id for c in claimed]), holding(claimed))
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
        .where(among(session, Item.id, [c.id for c in claimed]), Item.batch_id == batch_id, holding(claimed))
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


COUNTERS = ("succeeded", "failed", "cancelled", "expired")  # a batch's counts of its items that ended


def close_if_done(session: Session, batch_id: str, **ended: int) -> None:
    """Add `ended` (items that just reached a terminal state, by counter) to the batch's counts, and move
    the batch on once every item has ended: `completed`, or `cancelled` if it was cancelling. One
    statement, run after every chunk: each column keeps its value unless its case applies."""
    session.execute(_close_if_done(session), {"of_batch": batch_id, **{f"add_{n}": ended.get(n, 0) for n in COUNTERS}})


@built_once
def _close_if_done(dialect: str) -> Update:
    now, added = db_now(dialect), {n: getattr(Batch, n) + bindparam(f"add_{n}", type_=BigInteger()) for n in COUNTERS}
    # in an UPDATE every expression reads the row as it was: the counts after this one are `added`
    all_ended = added["succeeded"] + added["failed"] + added["cancelled"] + added["expired"] >= Batch.total
    running = all_ended & (Batch.status == BatchStatus.in_progress)
    cancelling = all_ended & (Batch.status == BatchStatus.cancelling)
    return update(Batch).where(Batch.id == bindparam("of_batch")).values(
        **added,
        status=case((running, BatchStatus.completed), (cancelling, BatchStatus.cancelled), else_=Batch.status),
        finalizing_at=case((running, now), else_=Batch.finalizing_at),
        completed_at=case((running, now), else_=Batch.completed_at),
        cancelled_at=case((cancelling, now), else_=Batch.cancelled_at))
