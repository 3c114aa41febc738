"""The schedule commands of the CLI: `gristmill beat` and `gristmill schedule list|run|backfill`.

Each reads `--schedules FILE`, else GRISTMILL_SCHEDULES, else ./schedules.toml.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from producer import api, slots
from producer.scheduler import Beat, Scheduler
from producer.schedules import Schedule, load, schedules_path
from producer.service import Service
from schema.db import aware
from schema.errors import GristmillError
from schema.settings import EMBEDDED_BROKER, Settings


def add_commands(sub: Any) -> None:
    beat = sub.add_parser("beat", help="fire due schedules (safe to run two: one holds the lease, one waits)")
    _file_flag(beat)
    beat.add_argument("--tick", type=float, default=5.0, help="seconds between looks at the clock")
    schedule = sub.add_parser("schedule", help="scheduled jobs").add_subparsers(dest="action", required=True)
    listing = schedule.add_parser("list", help="each schedule's next and last run, its batch and counts")
    _file_flag(listing)
    listing.add_argument("--check", action="store_true", help="exit 1 when a schedule is late or its last run failed")
    run = schedule.add_parser("run", help="run one now; prints only its batch id")
    _file_flag(run)
    run.add_argument("name")
    run.add_argument("--force", action="store_true",
                     help="run even if its newest slot has run, as a manual run, answering nothing from the cache")
    run.add_argument("--wait", action="store_true", help="until it ends (embedded defaults: running it here)")
    backfill = schedule.add_parser("backfill", help="run the slots of a date range that have no run")
    _file_flag(backfill)
    backfill.add_argument("name")
    backfill.add_argument("--from", dest="start", type=date.fromisoformat, required=True, metavar="YYYY-MM-DD")
    backfill.add_argument("--to", dest="end", type=date.fromisoformat, required=True, metavar="YYYY-MM-DD")
    backfill.add_argument("--dry-run", action="store_true", help="list the slots, run nothing")


def _file_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedules", help="the schedules file (default: GRISTMILL_SCHEDULES or ./schedules.toml)")


def cmd_beat(args: argparse.Namespace, settings: Settings) -> int:
    path = schedules_path(args.schedules)
    load(path)  # a broken file is an error now, not a log line later
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"gristmill beat: {path}, tick {args.tick:g} s", file=sys.stderr)
    Beat(Service(settings), path, tick_s=args.tick, lease_s=settings.beat_lease_s).run(stop)
    return 0


RunWorker = Callable[[Settings, str | None, Callable[[], bool]], object]  # a worker in this process, until done


def cmd_schedule(args: argparse.Namespace, settings: Settings, run_worker: RunWorker) -> int:
    """`run_worker`: from the CLI, the composition root (producer/ does not import worker/)."""
    schedules = load(schedules_path(args.schedules))
    scheduler = Scheduler(Service(settings), schedules)
    if args.action == "run":
        return _run(args, scheduler, schedules, settings, run_worker)
    return {"list": _list, "backfill": _backfill}[args.action](args, scheduler, schedules, settings)


def _list(args: argparse.Namespace, scheduler: Scheduler, schedules: dict[str, Schedule], _: Settings) -> int:
    now = datetime.now(UTC)
    scheduler.finish_ended()  # runs whose batch ended since (when no beat runs, e.g. after `schedule run`)
    last = scheduler.last_runs()
    trouble = 0
    print(f"{'name':<20} {'next run':<22} {'last slot':<22} {'status':<10} {'items':>6} {'new':>5} {'changed':>7} "
          f"{'cached':>6} {'failed':>6} {'saved s':>7}  batch")
    for name, schedule in schedules.items():
        run = last.get(name)
        upcoming = slots.upcoming(schedule.cron, schedule.zone, now) if schedule.enabled else None
        late = scheduler.is_late(schedule, run, now)
        status = "late" if late else (run.status if run else "-")
        trouble += late or bool(run and run.status == "failed")
        print(f"{name:<20} {_local(upcoming, schedule) if upcoming else 'disabled':<22} "
              f"{_local(run.slot, schedule) if run else '-':<22} {status:<10} {run.items if run else 0:>6} "
              f"{run.new if run else 0:>5} {run.changed if run else 0:>7} {run.unchanged if run else 0:>6} "
              f"{run.failed if run else 0:>6} {run.engine_s_saved if run else 0:>7.1f}  "
              f"{(run.batch_id or '-') if run else '-'}" + (f"  error: {run.error}" if run and run.error else ""))
    return 1 if args.check and trouble else 0


def _run(args: argparse.Namespace, scheduler: Scheduler, schedules: dict[str, Schedule], settings: Settings,
         run_worker: RunWorker) -> int:
    schedule = _named(schedules, args.name)
    now = datetime.now(UTC)
    slot = None if args.force else slots.latest(schedule.cron, schedule.zone, now)
    run = scheduler.fire(schedule, slot or now, manual=slot is None, cache=not args.force)
    if run is None:
        raise GristmillError(f"schedule {schedule.name!r} has run for its slot {_local(slot, schedule)} already; "
                             f"--force runs it again")
    if run.batch_id is None:
        if run.status == "failed":
            raise GristmillError(f"schedule {schedule.name!r}: {run.error}")
        print(f"schedule {schedule.name!r}: no items", file=sys.stderr)
        return 0
    print(run.batch_id)
    if not args.wait:
        return 0
    if settings.broker_url == EMBEDDED_BROKER:  # no worker runs on the embedded defaults: one runs here
        service, batch_id = scheduler.service, run.batch_id
        run_worker(settings, schedule.model, lambda: service.status(batch_id).done)
    else:
        api.open_batch(run.batch_id, settings).wait()
    finished = scheduler.finish(run.id)
    print(f"schedule {schedule.name!r}: run {finished.status}; {finished.items} items, {finished.new} new, "
          f"{finished.changed} changed, {finished.unchanged} from the cache ({finished.engine_s_saved:.1f} engine "
          f"seconds saved), {finished.failed} failed"
          + (f"; {finished.error}" if finished.error else ""), file=sys.stderr)
    return 0 if finished.status == "succeeded" else 1


def _backfill(args: argparse.Namespace, scheduler: Scheduler, schedules: dict[str, Schedule], _: Settings) -> int:
    schedule = _named(schedules, args.name)
    start = datetime.combine(args.start, time(), schedule.zone)
    end = datetime.combine(args.end + timedelta(days=1), time(), schedule.zone)
    wanted = list(slots.slots(schedule.cron, schedule.zone, start - timedelta(microseconds=1), end))
    for slot in wanted:
        if args.dry_run:
            print(_local(slot, schedule))
            continue
        run = scheduler.fire(schedule, slot, since=_data_start(schedule, slot))
        print(f"{_local(slot, schedule)}  {'has a run already' if run is None else f'{run.status} {run.batch_id}'}")
    return 0


def _data_start(schedule: Schedule, slot: datetime) -> datetime:
    """A backfilled slot reads the rows of its own interval: since the slot before it."""
    return slots.latest(schedule.cron, schedule.zone, slot - timedelta(seconds=1)) or slot - timedelta(days=1)


def _named(schedules: dict[str, Schedule], name: str) -> Schedule:
    if name not in schedules:
        raise GristmillError(f"no schedule named {name!r}; the file has {', '.join(schedules) or 'none'}")
    return schedules[name]


def _local(moment: datetime | None, schedule: Schedule) -> str:
    if moment is None:
        return "-"
    return aware(moment).astimezone(schedule.zone).strftime("%Y-%m-%d %H:%M %Z")
