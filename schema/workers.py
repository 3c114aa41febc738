"""Live workers in SQL: each records what its engine can run at once and which task kinds it serves, and
refreshes a heartbeat, so a producer can size chunks for the engines that will run them before any of
them sees a message, and refuse a batch no live worker can run."""

from __future__ import annotations

import logging

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from schema.db import db_clock, db_now, get_sessionmaker
from schema.settings import Settings
from schema.tables import Worker

log = logging.getLogger(__name__)


def register(settings: Settings, worker_id: str, model: str, engine: str, max_num_seqs: int,
             kinds: list[str]) -> None:
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        now = db_clock(session)
        session.merge(Worker(id=worker_id, model=model, engine=engine, max_num_seqs=max_num_seqs, kinds=kinds,
                             started_at=now, seen_at=now))


def heartbeat(settings: Settings, worker_id: str, chunks_in_flight: int = 0, busy_fraction: float | None = None) -> None:
    """Alive, and how busy: what the dashboard's workers page shows."""
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        session.execute(update(Worker).where(Worker.id == worker_id).values(
            seen_at=db_now(session), chunks_in_flight=chunks_in_flight, busy_fraction=busy_fraction))


def live(settings: Settings) -> list[Worker]:
    """Every live worker, by model then id."""
    with get_sessionmaker(settings.database_url)() as session:
        return list(session.scalars(select(Worker).where(_live(settings, session)).order_by(Worker.model, Worker.id)))


def unregister(settings: Settings, worker_id: str) -> None:
    try:
        with get_sessionmaker(settings.database_url)() as session, session.begin():
            session.execute(delete(Worker).where(Worker.id == worker_id))
    except Exception:  # noqa: BLE001  # the database is away: the row ages out with its heartbeat
        log.warning("could not remove worker %s from the workers table", worker_id)


def _live(settings: Settings, session: Session):  # type: ignore[no-untyped-def]
    """A worker is live while its heartbeat (every `reconcile_interval_s`) is at most three beats old, by
    the database's clock (heartbeats are stamped with it)."""
    return Worker.seen_at >= db_now(session, -3 * settings.reconcile_interval_s)


def capacity(settings: Settings, model: str) -> int | None:
    """The most sequences a live worker's engine for `model` runs at once; None when none is live."""
    with get_sessionmaker(settings.database_url)() as session:
        return session.scalar(select(func.max(Worker.max_num_seqs)).where(Worker.model == model, _live(settings, session)))


def kinds_served(settings: Settings, model: str) -> set[str] | None:
    """The task kinds the live workers of `model` serve together; None when none is live (or none has
    said: a worker from before workers recorded their kinds has an empty list)."""
    with get_sessionmaker(settings.database_url)() as session:
        rows = [kinds for kinds in session.scalars(select(Worker.kinds).where(Worker.model == model, _live(settings, session)))
                if kinds]
    return {kind for kinds in rows for kind in kinds} if rows else None


def live_models(settings: Settings) -> set[str]:
    """The models some live worker runs."""
    with get_sessionmaker(settings.database_url)() as session:
        return set(session.scalars(select(Worker.model).where(_live(settings, session)).distinct()))


def live_counts(settings: Settings) -> dict[tuple[str, str], int]:
    """Live workers by (model, engine)."""
    with get_sessionmaker(settings.database_url)() as session:
        rows = session.execute(select(Worker.model, Worker.engine, func.count()).where(_live(settings, session))
                               .group_by(Worker.model, Worker.engine)).all()
    return {(model, engine): count for model, engine, count in rows}
