"""SQL is the source of truth, the broker only delivers: put back on the queue what SQL says should run
but nothing carries, and end batches whose completion window has passed.

- items `running` whose lease expired (their worker died) go back to `queued`;
- items `queued` for longer than a grace period that no message in the broker names (Redis restarted
  without persistence, a message dropped) are sent again;
- batches past `expires_at` end `expired`: finished results stay, queued items become `expired`.
A duplicate message this may create is harmless: claiming an item is a conditional update.
Runs on worker start, every `reconcile_interval_s` in each worker, and as `gristmill reconcile`.
Every "now" here is the database's clock: a reconciler on a host whose clock runs fast must not take
leases that are still live, nor one whose clock runs slow leave a dead worker's items waiting.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from schema import store
from schema.db import db_now, get_sessionmaker
from schema.errors import ErrorCode
from schema.queue import Queue, broker_lists, queue_for
from schema.settings import EMBEDDED_BROKER, Settings
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, Item

log = logging.getLogger(__name__)


@dataclass
class Report:
    expired_batches: list[str] = field(default_factory=list)
    leases_expired: int = 0
    requeued: int = 0


def reconcile(settings: Settings, queue: Queue) -> Report:
    report = Report()
    make_session = get_sessionmaker(settings.database_url)
    with make_session() as session, session.begin():
        report.expired_batches = expire_due(session)
    with make_session() as session, session.begin():
        dead = _return_dead_leases(session)
    report.leases_expired = sum(len(ids) for ids in dead.values())
    with make_session() as session:
        orphans = _queued_without_message(session, settings, exclude=dead)
    for (batch_id, model, kind, priority), ids in [*dead.items(), *orphans.items()]:
        queue.send_chunks(batch_id, model, kind, ids, priority)
        report.requeued += len(ids)
    if report.expired_batches or report.leases_expired or report.requeued:
        log.warning("reconciled: %s", report)
    return report


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


Route = tuple[str, str, str, int]  # (batch id, model, kind, priority): where and how its items are sent


def _return_dead_leases(session: Session) -> dict[Route, list[int]]:
    """Queue again the items whose worker stopped renewing its claim; their message died with it."""
    returned = session.execute(
        update(Item).where(Item.status == ItemStatus.running, Item.lease_expires_at < db_now(session))
        .values(status=ItemStatus.queued, lease_id=None, lease_expires_at=None, interrupted=True,
                last_error="its worker stopped; queued again", error_code=ErrorCode.engine_error.value)
        .returning(Item.id, Item.batch_id).execution_options(synchronize_session=False)).all()
    batches = session.execute(select(Batch.id, Batch.model, Batch.kind, Batch.priority)
                              .where(Batch.id.in_({b for _, b in returned}))).all() if returned else []
    routes = {b: (b, m, k, p) for b, m, k, p in batches}
    by_batch: dict[Route, list[int]] = {}
    for item_id, batch_id in returned:
        by_batch.setdefault(routes[batch_id], []).append(item_id)
    return by_batch


def _queued_without_message(session: Session, settings: Settings,
                            exclude: dict[Route, list[int]]) -> dict[Route, list[int]]:
    cutoff = db_now(session, -settings.requeue_grace_s)
    open_batch = Batch.status.in_([BatchStatus.in_progress, BatchStatus.cancelling])
    waiting = (Item.status == ItemStatus.queued) & (Item.enqueued_at < cutoff) & open_batch
    queues = {queue_for(m, k) for m, k in session.execute(select(Batch.model, Batch.kind).where(open_batch).distinct())}
    carried = ids_in_broker(settings, queues) if queues else set()
    # Fast path, the usual case: the broker carries at least as many ids as SQL has waiting.
    waiting_count = session.scalar(select(func.count()).select_from(Item).join(Batch).where(waiting)) or 0
    if waiting_count <= len(carried):
        return {}
    rows = session.execute(
        select(Item.id, Item.batch_id, Batch.model, Batch.kind, Batch.priority).join(Batch, Batch.id == Item.batch_id)
        .where(waiting).order_by(Item.batch_id, Item.line)).all()
    carried.update(i for ids in exclude.values() for i in ids)
    orphans: dict[Route, list[int]] = {}
    for item_id, batch_id, model, kind, priority in rows:
        if item_id not in carried:
            orphans.setdefault((batch_id, model, kind, priority), []).append(item_id)
    return orphans


def ids_in_broker(settings: Settings, queues: set[str]) -> set[int]:
    """Item ids named by any message waiting in these queues or delivered but not yet acknowledged."""
    if settings.broker_url == EMBEDDED_BROKER:
        folder = settings.broker_folder / "queue"
        messages = [p.read_bytes() for p in Path(folder).glob("*.msg")] if folder.exists() else []
    else:
        client = redis.Redis.from_url(settings.broker_url)
        messages = [m for q in queues for key in broker_lists(q) for m in client.lrange(key, 0, -1)]  # type: ignore[misc]
        messages += [json.dumps(json.loads(v)[0]).encode() for v in client.hvals("unacked")]
    ids: set[int] = set()
    for raw in messages:
        ids.update(_item_ids(raw))
    return ids


def _item_ids(raw: bytes) -> list[int]:
    try:
        message: dict[str, Any] = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return [int(i) for i in args[1]]
    except (ValueError, KeyError, IndexError, TypeError):
        return []  # not one of our chunk messages
