"""Schedules run: firing a slot (one run per schedule and slot, by a unique row in SQL), finishing a run
once its batch ends (sinks, the items it saw), and the beat that does both, safe to run twice.

A run: its row is inserted first (a second beat, or a slot fired again, finds it taken and stops); the
source is read (an SQL source from the watermark: the last successful run's start less its lag), the
items go in as one batch through the service core (the result cache answers what is unchanged), and
when the batch ends the sink gets the results. Only then is the run `succeeded`, which is what moves
the watermark; a run that fails (source, batch or sink) leaves it where it was, so the next run reads
those rows again.

The beat: every tick it takes or renews a lease in SQL (`beat_locks`); the holder fires due slots and
finishes ended runs, a standby waits for the lease to lapse. The lease saves work; the unique run row is
what makes a double firing harmless.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from producer import sinks, slots, sources
from producer.schedules import Schedule, SqlSource, load
from producer.service import Service
from schema import cache
from schema.db import aware, get_sessionmaker, utcnow
from schema.errors import GristmillError, InputError
from schema.states import TERMINAL_BATCH, BatchStatus
from schema.tables import Batch, BeatLock, ScheduleItem, ScheduleRun

log = logging.getLogger("gristmill.beat")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STALE_START = timedelta(minutes=10)  # a run stuck in `started` this long lost its firing process


class Scheduler:
    def __init__(self, service: Service, schedules: dict[str, Schedule]) -> None:
        self.service, self.schedules = service, schedules
        self._sessions = get_sessionmaker(service.settings.database_url)

    # --- firing ---------------------------------------------------------------------------------

    def fire_due(self, now: datetime) -> list[ScheduleRun]:
        fired = []
        for schedule in self.schedules.values():
            if not schedule.enabled:
                continue
            last = self._last_slot(schedule.name)
            for slot in slots.due(schedule.cron, schedule.zone, schedule.catch_up, last, now, schedule.look_back):
                run = self.fire(schedule, slot)
                if run is not None:
                    fired.append(run)
        return fired

    def fire(self, schedule: Schedule, slot: datetime, manual: bool = False, since: datetime | None = None,
             cache: bool = True) -> ScheduleRun | None:
        """Run the schedule for this slot; None when the slot has a run already."""
        run = self._claim(schedule, slot, manual)
        if run is None:
            return None
        try:
            since = since if since is not None else self.watermark(schedule)
            items = sources.read(schedule.source, since)
            batch_id = self._submit(schedule, items, cache) if items else None
        except (GristmillError, OSError) as exc:
            return self._end(run.id, "failed", error=str(exc))
        seen = self._seen(schedule.name)
        new = sum(1 for i in items if i.id not in seen)
        changed = sum(1 for i in items if i.id in seen and seen[i.id] != i.content_hash)
        with self._sessions() as session, session.begin():
            row = session.get_one(ScheduleRun, run.id)
            row.batch_id, row.since, row.items, row.new, row.changed = batch_id, since, len(items), new, changed
            row.status = "running"
        self._save_items(schedule, items)
        log.info("schedule %s: slot %s fired batch %s (%d items: %d new, %d changed)", schedule.name,
                 slot.isoformat(), batch_id, len(items), new, changed)
        return self.finish(run.id) if batch_id is None else self._run(run.id)

    def _claim(self, schedule: Schedule, slot: datetime, manual: bool) -> ScheduleRun | None:
        try:
            with self._sessions() as session, session.begin():
                run = ScheduleRun(schedule=schedule.name, slot=slot, manual=manual, status="started",
                                  started_at=utcnow(), items=0, new=0, changed=0, unchanged=0, failed=0,
                                  engine_s_saved=0.0)
                session.add(run)
            return run
        except IntegrityError:
            return None  # fired already (another beat, or a restart)

    def _submit(self, schedule: Schedule, items: list[sources.SourceItem], cache: bool) -> str:
        lines = (json.dumps({"custom_id": i.id, "text": i.text}).encode() + b"\n" for i in items)
        return self.service.submit(lines, name=f"schedule {schedule.name}", task=schedule.kind, model=schedule.model,
                                   metadata={"schedule": schedule.name}, cache=cache, priority=schedule.priority,
                                   **schedule.spec)

    def watermark(self, schedule: Schedule) -> datetime:
        """An SQL source reads rows since the last successful run's start, less its lag."""
        if not isinstance(schedule.source, SqlSource):
            return EPOCH
        with self._sessions() as session:
            last = session.scalar(select(func.max(ScheduleRun.started_at)).where(
                ScheduleRun.schedule == schedule.name, ScheduleRun.status == "succeeded"))
        return EPOCH if last is None else aware(last) - timedelta(seconds=schedule.source.lag_s)

    # --- finishing ------------------------------------------------------------------------------

    def finish_ended(self) -> list[ScheduleRun]:
        """Finish every run whose batch has ended; fail runs whose firing process died before submitting."""
        with self._sessions() as session:
            running = list(session.scalars(select(ScheduleRun.id).join(Batch, Batch.id == ScheduleRun.batch_id)
                                           .where(ScheduleRun.status == "running", Batch.status.in_(TERMINAL_BATCH))))
            stale = list(session.scalars(select(ScheduleRun.id).where(
                ScheduleRun.status == "started", ScheduleRun.started_at < utcnow() - STALE_START)))
        for run_id in stale:
            self._end(run_id, "failed", error="the process firing it stopped before it submitted its batch")
        return [self.finish(run_id) for run_id in running]

    def finish(self, run_id: int) -> ScheduleRun:
        with self._sessions() as session:
            run = session.get_one(ScheduleRun, run_id)
            batch = session.get(Batch, run.batch_id) if run.batch_id else None
        schedule = self.schedules.get(run.schedule)
        if batch is not None and batch.status != BatchStatus.completed:
            return self._end(run_id, "failed", error=f"batch {batch.id} ended {batch.status}")
        try:
            if batch is not None and schedule is not None:
                sinks.deliver(self.service, schedule, batch.id, aware(run.slot))
        except (GristmillError, InputError) as exc:
            return self._end(run_id, "failed", error=str(exc))
        return self._end(run_id, "succeeded")

    def _end(self, run_id: int, status: str, error: str | None = None) -> ScheduleRun:
        with self._sessions() as session, session.begin():
            run = session.get_one(ScheduleRun, run_id)
            run.status, run.error, run.finished_at = status, error, utcnow()
            batch = session.get(Batch, run.batch_id) if run.batch_id else None
            if batch is not None:
                run.unchanged, run.failed = batch.cached, batch.failed
                run.engine_s_saved = cache.engine_s_saved(session, batch.id)
        if error:
            log.error("schedule %s: run %d failed: %s", run.schedule, run_id, error)
        return run

    def _run(self, run_id: int) -> ScheduleRun:
        with self._sessions() as session:
            return session.get_one(ScheduleRun, run_id)

    # --- what the schedule has seen ---------------------------------------------------------------

    def _seen(self, name: str) -> dict[str, str]:
        with self._sessions() as session:
            return dict(session.execute(select(ScheduleItem.item_id, ScheduleItem.content_hash)
                                        .where(ScheduleItem.schedule == name)).all())

    def _save_items(self, schedule: Schedule, items: list[sources.SourceItem]) -> None:
        """The content hashes of this run's items (a glob source: exactly these; SQL: these added)."""
        with self._sessions() as session, session.begin():
            if not isinstance(schedule.source, SqlSource):
                session.execute(delete(ScheduleItem).where(ScheduleItem.schedule == schedule.name))
            else:
                session.execute(delete(ScheduleItem).where(ScheduleItem.schedule == schedule.name,
                                                           ScheduleItem.item_id.in_([i.id for i in items])))
            session.add_all(ScheduleItem(schedule=schedule.name, item_id=i.id, content_hash=i.content_hash)
                            for i in items)

    def _last_slot(self, name: str) -> datetime | None:
        with self._sessions() as session:
            last = session.scalar(select(func.max(ScheduleRun.slot)).where(
                ScheduleRun.schedule == name, ScheduleRun.manual.is_(False)))
        return aware(last) if last is not None else None

    # --- reading ----------------------------------------------------------------------------------

    def last_runs(self) -> dict[str, ScheduleRun]:
        with self._sessions() as session:
            newest = (select(ScheduleRun.schedule, func.max(ScheduleRun.id).label("id"))
                      .group_by(ScheduleRun.schedule).subquery())
            return {r.schedule: r for r in session.scalars(select(ScheduleRun).join(newest, newest.c.id == ScheduleRun.id))}

    def is_late(self, schedule: Schedule, run: ScheduleRun | None, now: datetime) -> bool:
        """Past its deadline: the newest slot's run has not succeeded `deadline_min` after the slot."""
        if schedule.deadline_min is None or not schedule.enabled:
            return False
        slot = slots.latest(schedule.cron, schedule.zone, now)
        if slot is None or now - slot < timedelta(minutes=schedule.deadline_min):
            return False
        return run is None or run.status != "succeeded" or aware(run.slot) < slot


# --- the beat -------------------------------------------------------------------------------------


@dataclass
class Beat:
    """Fires due slots and finishes ended runs every `tick_s`, while it holds the lease."""

    service: Service
    path: Path
    tick_s: float = 5.0
    lease_s: float = 30.0
    holder: str = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, stop: threading.Event) -> None:
        schedules: dict[str, Schedule] = {}
        while not stop.is_set():
            try:
                schedules = load(self.path)  # read every tick: an edit applies without a restart
            except InputError as exc:
                log.error("schedules file: %s (keeping the schedules read before)", exc)
            try:
                self.tick(schedules, utcnow())
            except Exception:  # a database away for a while must not end the beat: the next tick retries
                log.exception("beat: this tick failed")
            stop.wait(self.tick_s)
        self.release()

    def tick(self, schedules: dict[str, Schedule], now: datetime) -> list[ScheduleRun]:
        if not self.hold(now):
            return []
        scheduler = Scheduler(self.service, schedules)
        scheduler.finish_ended()
        return scheduler.fire_due(now)

    def hold(self, now: datetime) -> bool:
        """Take or renew the lease; False while another live beat holds it."""
        expires = now + timedelta(seconds=self.lease_s)
        sessions = get_sessionmaker(self.service.settings.database_url)
        with sessions() as session, session.begin():
            taken = session.execute(update(BeatLock).where(
                BeatLock.name == "beat", (BeatLock.holder == self.holder) | (BeatLock.expires_at < now))
                .values(holder=self.holder, expires_at=expires)).rowcount
        if taken:
            return True
        try:
            with sessions() as session, session.begin():
                session.add(BeatLock(name="beat", holder=self.holder, expires_at=expires))
            log.info("beat %s holds the lease", self.holder)
            return True
        except IntegrityError:
            return False  # another beat holds it

    def release(self) -> None:
        with get_sessionmaker(self.service.settings.database_url)() as session, session.begin():
            session.execute(delete(BeatLock).where(BeatLock.name == "beat", BeatLock.holder == self.holder))
