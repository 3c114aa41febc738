"""SQL is the source of truth, the broker only delivers: put back on the queue what SQL says should run
but nothing carries, and end batches whose completion window has passed.

- items `running` whose lease expired (their worker died) go back to `queued`;
- items `queued` for longer than a grace period that no message in the broker names (Redis restarted
  without persistence, a message dropped) are sent again;
- batches past `expires_at` end `expired`: finished results stay, queued items become `expired`.
A duplicate message this may create is harmless: claiming an item is a conditional update.
Runs on worker start, every `reconcile_interval_s` in each worker, and as `gristmill reconcile`. A pass is
bounded: it reads only batches that can still run, at most PAGE_ITEMS items of each kind, and the broker a
slice at a time; the scan for lost messages goes on from where the last pass stopped (a keyset cursor).
Every "now" here is the database's clock: a reconciler on a host whose clock runs fast must not take
leases that are still live, nor one whose clock runs slow leave a dead worker's items waiting.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import literal_column, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnClause

from schema import store
from schema.db import db_now, get_sessionmaker
from schema.errors import ErrorCode
from schema.queue import Queue, broker_lists, queue_for
from schema.settings import EMBEDDED_BROKER, Settings
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, Item

log = logging.getLogger(__name__)


Route = tuple[str, str, str, int]  # (batch id, model, kind, priority): where and how its items are sent
PAGE_ITEMS = 50_000  # items one pass examines for each kind of work: a pass costs the same at 10k or 10M items
# Inline, not a bound parameter, so that the planner sees ix_items_queued's predicate holds (a keyset page
# in time proportional to the page, however many items there are).
QUEUED: ColumnClause[str] = literal_column(f"'{ItemStatus.queued.value}'")
FINAL_BATCH = [BatchStatus.completed, BatchStatus.failed, BatchStatus.cancelled]  # no item of these can run


@dataclass
class Report:
    expired_batches: list[str] = field(default_factory=list)
    leases_expired: int = 0
    requeued: int = 0
    # Keyset cursor of the scan for queued items no message carries: the next pass looks past this item
    # id; 0 when this pass reached the last waiting item (the next one starts over).
    resume_after: int = 0


def reconcile(settings: Settings, queue: Queue, resume_after: int = 0, page: int = PAGE_ITEMS) -> Report:
    """One bounded pass: at most `page` dead leases returned and `page` waiting items checked against the
    broker, from item id `resume_after` on. Pass the report's `resume_after` to the next call."""
    report = Report()
    make_session = get_sessionmaker(settings.database_url)
    with make_session() as session, session.begin():
        report.expired_batches = expire_due(session)
    with make_session() as session, session.begin():
        dead = _return_dead_leases(session, page)
    report.leases_expired = sum(len(ids) for ids in dead.values())
    with make_session() as session:
        orphans, report.resume_after = _queued_without_message(session, settings, dead, resume_after, page)
    for (batch_id, model, kind, priority), ids in [*dead.items(), *orphans.items()]:
        queue.send_chunks(batch_id, model, kind, ids, priority)
        report.requeued += len(ids)
    if report.expired_batches or report.leases_expired or report.requeued:
        log.warning("reconciled: %s", report)
    return report


def reconcile_all(settings: Settings, queue: Queue) -> Report:
    """Passes until the scan has covered every waiting item: what `gristmill reconcile` runs."""
    total = Report()
    while True:
        report = reconcile(settings, queue, total.resume_after)
        total.expired_batches += report.expired_batches
        total.leases_expired += report.leases_expired
        total.requeued += report.requeued
        total.resume_after = report.resume_after
        if not report.resume_after and report.leases_expired < PAGE_ITEMS:
            return total


def expire_due(session: Session) -> list[str]:
    """End every batch past its completion window: its queued items become `expired`."""
    now = db_now(session)
    due = list(session.scalars(
        update(Batch).where(Batch.status == BatchStatus.in_progress, Batch.expires_at < now)
        .values(status=BatchStatus.expired, expired_at=now).returning(Batch.id)
        .execution_options(synchronize_session=False)))
    for batch_id in due:
        expired = session.execute(
            update(Item).where(Item.batch_id == batch_id, Item.status.in_([ItemStatus.queued, ItemStatus.waiting]))
            .values(status=ItemStatus.expired, finished_at=now, last_error="batch expired before this item ran",
                    error_code=ErrorCode.batch_expired.value)
            .returning(Item.parent_id).execution_options(synchronize_session=False)).all()
        store.count(session, batch_id, expired=sum(1 for (parent,) in expired if parent is None))
    return due


def _return_dead_leases(session: Session, page: int) -> dict[Route, list[int]]:
    """Queue again the items whose worker stopped renewing its claim; their message died with it."""
    lease_over = (Item.status == ItemStatus.running) & (Item.lease_expires_at < db_now(session))
    # Only batches that can still run: ix_items_batch_status finds their running items, and the items of
    # finished batches (almost all rows, in time) are never read.
    due = (select(Item.id).where(Item.batch_id.in_(select(Batch.id).where(Batch.status.not_in(FINAL_BATCH))),
                                 lease_over).order_by(Item.id).limit(page))
    returned = session.execute(
        update(Item).where(Item.id.in_(due.scalar_subquery()), lease_over)
        .values(status=ItemStatus.queued, lease_id=None, lease_expires_at=None, interrupted=True,
                last_error="its worker stopped; queued again", error_code=ErrorCode.engine_error.value)
        .returning(Item.id, Item.batch_id).execution_options(synchronize_session=False)).all()
    return _by_route(session, returned)


def _queued_without_message(session: Session, settings: Settings, exclude: dict[Route, list[int]],
                            after: int, page: int) -> tuple[dict[Route, list[int]], int]:
    """The next `page` items past id `after` queued longer than the grace, less those a message carries;
    and where the next pass goes on (0: this page was the last)."""
    # Items alone, in id order: an index scan of ix_items_queued that stops after the page (a join here
    # had PostgreSQL read and sort every queued item). Their batches are checked after.
    waiting = session.execute(
        select(Item.id, Item.batch_id)
        .where(Item.status == QUEUED, Item.id > after, Item.enqueued_at < db_now(session, -settings.requeue_grace_s))
        .order_by(Item.id).limit(page)).all()
    if not waiting:
        return {}, 0
    resume_after = waiting[-1][0] if len(waiting) == page else 0
    routes = _routes(session, {b for _, b in waiting}, [BatchStatus.in_progress, BatchStatus.cancelling])
    carried = ids_in_broker(settings, {queue_for(m, k) for _, m, k, _ in routes.values()},
                            within=(waiting[0][0], waiting[-1][0])) if routes else set()
    carried.update(i for ids in exclude.values() for i in ids)
    lost = [(i, b) for i, b in waiting if b in routes and i not in carried]
    return _by_route(session, lost, routes), resume_after


def _routes(session: Session, batch_ids: set[str], statuses: list[BatchStatus] | None = None) -> dict[str, Route]:
    """Where each batch's chunks go; only batches in `statuses`, if given."""
    query = select(Batch.id, Batch.model, Batch.kind, Batch.priority).where(Batch.id.in_(batch_ids))
    rows = session.execute(query.where(Batch.status.in_(statuses)) if statuses else query).all() if batch_ids else []
    return {b: (b, m, k, p) for b, m, k, p in rows}


def _by_route(session: Session, items: Sequence[tuple[int, str]],
              routes: dict[str, Route] | None = None) -> dict[Route, list[int]]:
    """(item id, batch id) pairs grouped by where their batch's chunks go, in id (input) order."""
    routes = routes if routes is not None else _routes(session, {b for _, b in items})
    by_route: dict[Route, list[int]] = {}
    for item_id, batch_id in items:
        by_route.setdefault(routes[batch_id], []).append(item_id)
    return by_route


def ids_in_broker(settings: Settings, queues: set[str], within: tuple[int, int]) -> set[int]:
    """Item ids from `within[0]` to `within[1]` named by any message waiting in these queues or delivered
    but not yet acknowledged. Messages are read a slice at a time and only ids in the range are kept, so
    memory stays bounded however much the broker holds."""
    low, high = within
    ids: set[int] = set()
    for raw in _messages(settings, queues):
        ids.update(i for i in _item_ids(raw) if low <= i <= high)
    return ids


def _messages(settings: Settings, queues: set[str], slice_size: int = 1000) -> Iterator[bytes | str]:
    if settings.broker_url == EMBEDDED_BROKER:
        folder = settings.broker_folder / "queue"
        yield from (p.read_bytes() for p in Path(folder).glob("*.msg")) if folder.exists() else ()
        return
    client = redis.Redis.from_url(settings.broker_url)
    for key in (key for q in queues for key in broker_lists(q)):
        start = 0
        while batch := client.lrange(key, start, start + slice_size - 1):  # type: ignore[misc]
            yield from batch
            start += slice_size
    for _, value in client.hscan_iter("unacked", count=slice_size):
        yield json.dumps(json.loads(value)[0]).encode()


def _item_ids(raw: bytes | str) -> list[int]:
    try:
        message: dict[str, Any] = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return [int(i) for i in args[1]]
    except (ValueError, KeyError, IndexError, TypeError):
        return []  # not one of our chunk messages
