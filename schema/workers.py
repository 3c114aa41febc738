"""Live workers in SQL: each records what its engine can run at once and refreshes a heartbeat, so a
producer can size chunks for the engines that will run them before any of them sees a message."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, func, select, update

from schema.db import get_sessionmaker, utcnow
from schema.settings import Settings
from schema.tables import Worker

log = logging.getLogger(__name__)


def register(settings: Settings, worker_id: str, model: str, engine: str, max_num_seqs: int) -> None:
    now = utcnow()
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        session.merge(Worker(id=worker_id, model=model, engine=engine, max_num_seqs=max_num_seqs,
                             started_at=now, seen_at=now))


def heartbeat(settings: Settings, worker_id: str) -> None:
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        session.execute(update(Worker).where(Worker.id == worker_id).values(seen_at=utcnow()))


def unregister(settings: Settings, worker_id: str) -> None:
    try:
        with get_sessionmaker(settings.database_url)() as session, session.begin():
            session.execute(delete(Worker).where(Worker.id == worker_id))
    except Exception:  # noqa: BLE001  # the database is away: the row ages out with its heartbeat
        log.warning("could not remove worker %s from the workers table", worker_id)


def capacity(settings: Settings, model: str) -> int | None:
    """The most sequences a live worker's engine for `model` runs at once; None when none is live.
    A worker is live while its heartbeat (every `reconcile_interval_s`) is at most three beats old."""
    live_since = utcnow() - timedelta(seconds=3 * settings.reconcile_interval_s)
    with get_sessionmaker(settings.database_url)() as session:
        return session.scalar(select(func.max(Worker.max_num_seqs))
                              .where(Worker.model == model, Worker.seen_at >= live_since))
