"""Schedules: the file's validation, slots across DST, catch-up after a beat was down, one run per slot with
two beats, incremental re-runs through the result cache, an SQL source with a watermark and a sink table.

The engine is not the subject: runs execute in process on the no-inference engine (one that counts what
reaches it), or through a real worker process on the holding engine."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine, select, text

from producer import slots
from producer.scheduler import Beat, Scheduler
from producer.schedules import load
from producer.service import Service
from schema.db import get_sessionmaker
from schema.errors import InputError
from schema.queue import Queue
from schema.tables import BeatLock, Item, ScheduleRun
from tests.conftest import MODEL, REPO, cli_env
from tests.fault_engine import CountingEngine
from worker import executor
from worker.engine_loop import EngineLoop
from worker.runtime import Runtime

BERLIN = ZoneInfo("Europe/Berlin")


def write(path: Path, text_: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_)
    return path


def schedules_file(tmp_path: Path, body: str) -> Path:
    return write(tmp_path / "schedules.toml", body)


def execute(settings: Any, batch_id: str) -> int:
    """Run the batch's queued items in process; how many requests reached the engine."""
    engine = CountingEngine(MODEL)
    loop = EngineLoop(engine)
    try:
        with get_sessionmaker(settings.database_url)() as session:
            ids = list(session.scalars(select(Item.id).where(Item.batch_id == batch_id, Item.status == "queued")))
        if ids:
            executor.run_chunk(Runtime(settings, engine, loop, queue=Queue(settings)), batch_id, ids)
    finally:
        loop.close()
    return engine.received


@pytest.mark.parametrize(("entry", "field", "message"), [
    ('cron = "61 * * * *"', "cron", "not a 5-field cron expression"),
    ('timezone = "Mars/Olympus"', "timezone", "not an IANA time zone"),
    ('task = { kind = "generate", max_tokenz = 5 }', "task.max_tokenz", "not a flag of task kind 'generate'"),
    ('task = { kind = "classify", labels = ["only"] }', "task", "at least two labels"),
    ('task = { kind = "sort" }', "task.kind", "use one of"),
    ('source = { sql = "SELECT 1" }', "source", "give url_env"),
    ('priority = "urgent"', "priority", "priority must be high, normal, low or a level 0-9"),
])
def test_a_bad_schedule_names_itself_and_the_field(tmp_path: Path, entry: str, field: str, message: str) -> None:
    table = {"cron": 'cron = "0 3 * * *"', "timezone": 'timezone = "UTC"', "task": 'task = { kind = "generate" }',
             "source": 'source = { glob = "docs/*.txt" }', "priority": 'priority = "low"'}
    table[entry.split(" =")[0]] = entry
    path = schedules_file(tmp_path, '[[schedule]]\nname = "nightly"\n' + "\n".join(table.values()) + "\n")
    with pytest.raises(InputError) as bad:
        load(path)
    assert "schedule 'nightly'" in str(bad.value) and bad.value.field == field
    assert message in str(bad.value), str(bad.value)


def test_dst_spring_forward_and_fall_back() -> None:
    """02:30 Europe/Berlin: 29 March 2026 has no 02:30 (skipped); 25 October has two (fires once)."""
    march = list(slots.slots("30 2 * * *", BERLIN, datetime(2026, 3, 27, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC)))
    assert [s.astimezone(BERLIN).day for s in march] == [27, 28, 30]
    october = list(slots.slots("30 2 * * *", BERLIN, datetime(2026, 10, 24, tzinfo=UTC),
                               datetime(2026, 10, 26, tzinfo=UTC)))
    assert october == [datetime(2026, 10, 24, 0, 30, tzinfo=UTC), datetime(2026, 10, 25, 0, 30, tzinfo=UTC)]
    # a beat ticking through the repeated hour fires the slot once, whichever 02:30 its last tick saw
    last = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    for minutes in range(0, 120, 5):
        now = last + timedelta(minutes=minutes)
        assert slots.due("30 2 * * *", BERLIN, "all", last, now, timedelta(hours=24)) == []


def test_catch_up_after_the_beat_was_down(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Down over three hourly slots, then back: latest runs one, all three, none zero."""
    write(tmp_path / "docs" / "a.txt", "hello")
    body = "".join(f'[[schedule]]\nname = "{p}"\ncron = "0 * * * *"\ncatch_up = "{p}"\nsource = {{ glob = "docs/*.txt" }}\n'
                   f'task = {{ kind = "generate", max_tokens = 4 }}\n' for p in ("latest", "all", "none"))
    settings = settings_for(sqlite_url)
    scheduler = Scheduler(Service(settings), load(schedules_file(tmp_path, body)))
    start = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    assert {r.schedule for r in scheduler.fire_due(start)} == {"latest", "all", "none"}  # on time: each fires
    back = start + timedelta(hours=3, minutes=20)  # 09:00, 10:00, 11:00 missed
    fired = [(r.schedule, r.slot.hour) for r in scheduler.fire_due(back)]
    assert sorted(fired) == [("all", 9), ("all", 10), ("all", 11), ("latest", 11)]
    assert scheduler.fire_due(back) == []  # fired once: a second look finds the slots taken
    with get_sessionmaker(sqlite_url)() as session:
        assert session.query(ScheduleRun).count() == 7


def test_two_beats_fire_each_slot_once(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write(tmp_path / "docs" / "a.txt", "hello")
    path = schedules_file(tmp_path, '[[schedule]]\nname = "minutely"\ncron = "* * * * *"\ncatch_up = "all"\n'
                                    'source = { glob = "docs/*.txt" }\ntask = { kind = "generate" }\n')
    service = Service(settings_for(sqlite_url))
    schedules = load(path)
    one, two = Beat(service, path, holder="one", lease_s=30), Beat(service, path, holder="two", lease_s=30)
    now = datetime.now(UTC).replace(second=5, microsecond=0)
    assert len(one.tick(schedules, now)) == 1 and two.tick(schedules, now) == []  # two waits for the lease
    assert one.tick(schedules, now + timedelta(seconds=25)) == []  # renewed; no new slot yet
    assert two.tick(schedules, now + timedelta(seconds=50)) == []  # one still holds it
    later = now + timedelta(minutes=2)  # one died after its last tick: its lease lapsed
    assert [r.slot.replace(tzinfo=UTC) for r in two.tick(schedules, later)] == [  # SQLite keeps no zone
        now.replace(second=0) + timedelta(minutes=m) for m in (1, 2)]  # none missed, none twice
    assert one.tick(schedules, later) == []  # back, but two holds the lease now
    with get_sessionmaker(sqlite_url)() as session:
        assert session.scalar(select(BeatLock.holder)) == "two"


def test_beat_processes_take_over(pg_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two real `gristmill beat` processes: one holds the lease and fires; killed, the other takes over; the
    runs in SQL are one per slot with none missed (about two minutes: cron slots are minutes)."""
    write(tmp_path / "docs" / "a.txt", "hello")
    path = schedules_file(tmp_path, '[[schedule]]\nname = "minutely"\ncron = "* * * * *"\ncatch_up = "all"\n'
                                    'source = { glob = "docs/*.txt" }\ntask = { kind = "generate" }\n')
    settings = settings_for(pg_url)
    Service(settings)  # the schema
    env = {**cli_env(settings), "GRISTMILL_BEAT_LEASE_S": "4"}
    beats = [subprocess.Popen([sys.executable, "-m", "producer.cli", "beat", "--schedules", str(path), "--tick", "0.5"],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    sessions = get_sessionmaker(pg_url)
    try:
        def runs() -> list[datetime]:
            with sessions() as session:
                return list(session.scalars(select(ScheduleRun.slot).order_by(ScheduleRun.slot)))

        deadline = time.monotonic() + 75
        while not runs():
            assert time.monotonic() < deadline, "no beat fired"
            time.sleep(0.5)
        with sessions() as session:
            holder = session.scalar(select(BeatLock.holder))
        killed = next(b for b in beats if holder and holder.endswith(f":{b.pid}"))
        killed.kill()
        first = runs()[-1]
        deadline = time.monotonic() + 75
        while runs()[-1] == first:
            assert time.monotonic() < deadline, "the standby did not take over"
            time.sleep(0.5)
        fired = runs()
        assert fired == sorted(set(fired))  # one run per slot
        assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(fired))  # none missed
        with sessions() as session:
            assert session.scalar(select(BeatLock.holder)) != holder
    finally:
        for beat in beats:
            beat.kill()
            beat.wait()


def test_incremental_reruns_cost_only_what_changed(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    docs = tmp_path / "docs"
    for n in range(200):
        write(docs / f"{n:03d}.txt", f"document {n}")
    path = schedules_file(tmp_path, '[[schedule]]\nname = "digest"\ncron = "0 6 * * *"\nsource = { glob = "docs/*.txt" }\n'
                                    'task = { kind = "generate", system = "Summarise.", max_tokens = 8, temperature = 0 }\n')
    settings = settings_for(sqlite_url)
    scheduler = Scheduler(Service(settings), load(path))
    schedule = scheduler.schedules["digest"]

    def run_once(cache: bool = True) -> tuple[ScheduleRun, int]:
        run = scheduler.fire(schedule, datetime.now(UTC), manual=True, cache=cache)
        assert run is not None and run.batch_id is not None
        reached = execute(settings, run.batch_id)
        return scheduler.finish(run.id), reached

    first, reached = run_once()
    assert (first.status, first.items, first.new, reached) == ("succeeded", 200, 200, 200)
    for n in range(10):
        write(docs / f"{n:03d}.txt", f"document {n}, revised")
    for n in range(200, 205):
        write(docs / f"{n:03d}.txt", f"document {n}")
    for n in range(197, 200):
        (docs / f"{n:03d}.txt").unlink()
    second, reached = run_once()
    assert (second.items, second.new, second.changed, second.unchanged, reached) == (202, 5, 10, 187, 15)
    assert second.failed == 0 and second.engine_s_saved > 0  # what the 187 cost when they were computed
    assert run_once()[1] == 0  # nothing changed: nothing reaches the engine

    for changed in ("max_tokens = 9", 'model = "another-model"'):  # what decides the answer voids every key
        other = Scheduler(Service(settings), load(schedules_file(tmp_path, path.read_text().replace(
            "max_tokens = 8", changed))))
        run = other.fire(other.schedules["digest"], datetime.now(UTC), manual=True)
        assert run is not None and run.batch_id is not None
        with get_sessionmaker(sqlite_url)() as session:
            assert session.query(Item).filter_by(batch_id=run.batch_id, cached=True).count() == 0


def test_sql_source_watermark_and_sink(pg_url: str, settings_for, tmp_path: Path,  # type: ignore[no-untyped-def]
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Tickets in a real PostgreSQL table, labels upserted into a sink table there; the watermark moves
    only when a run succeeds (a sink that fails leaves it, and the next run reads those rows again)."""
    users = create_engine(pg_url)
    with users.begin() as conn:
        conn.execute(text("CREATE TABLE tickets (id integer PRIMARY KEY, body text, updated_at timestamptz)"))
        conn.execute(text("INSERT INTO tickets SELECT n, 'ticket ' || n, now() - interval '1 day' "
                          "FROM generate_series(1, 6) AS n"))
    monkeypatch.setenv("TICKETS_DB_URL", pg_url)
    path = schedules_file(tmp_path, '[[schedule]]\nname = "tickets"\ncron = "30 2 * * *"\n'
                                    'source = { sql = "SELECT id, body AS text FROM tickets WHERE updated_at >= :since", '
                                    'url_env = "TICKETS_DB_URL", lag_s = 0 }\n'
                                    'task = { kind = "generate", max_tokens = 4 }\n'
                                    'sink = { sql_table = "ticket_out", url_env = "TICKETS_DB_URL", jsonl = "out/{name}-{date}.jsonl" }\n')
    settings = settings_for(pg_url)
    scheduler = Scheduler(Service(settings), load(path))
    schedule = scheduler.schedules["tickets"]

    def run_once() -> ScheduleRun:
        run = scheduler.fire(schedule, datetime.now(UTC), manual=True)
        assert run is not None
        if run.batch_id:
            execute(settings, run.batch_id)
        return scheduler.finish(run.id)

    first = run_once()
    assert (first.status, first.items) == ("succeeded", 6)
    with users.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ticket_out WHERE output_text = 'ok'")).scalar() == 6
    assert len((tmp_path / "out").glob("tickets-*.jsonl").__next__().read_text().splitlines()) == 6
    with users.begin() as conn:
        conn.execute(text("UPDATE tickets SET body = 'ticket 2, again', updated_at = now() WHERE id = 2"))
        conn.execute(text("ALTER TABLE ticket_out RENAME COLUMN output_text TO gone"))  # the sink will fail
    failed = run_once()
    assert (failed.status, failed.items) == ("failed", 1) and "ticket_out" in (failed.error or "")
    with users.begin() as conn:
        conn.execute(text("ALTER TABLE ticket_out RENAME COLUMN gone TO output_text"))
    retried = run_once()  # the watermark did not move: ticket 2 is read again
    assert (retried.status, retried.items, retried.since) == ("succeeded", 1, failed.since)
    assert run_once().items == 0  # now it has moved past it
    with users.connect() as conn:
        assert conn.execute(text("SELECT batch_id FROM ticket_out WHERE id = '2'")).scalar() == retried.batch_id
    users.dispose()


def test_schedule_commands(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write(tmp_path / "docs" / "a.txt", "hello")
    path = schedules_file(tmp_path, '[[schedule]]\nname = "digest"\ncron = "0 6 * * *"\ntimezone = "Europe/Berlin"\n'
                                    'deadline_min = 1\nsource = { glob = "docs/*.txt" }\ntask = { kind = "generate" }\n'
                                    'priority = 2\n')
    env = {**cli_env(settings_for(sqlite_url)), "GRISTMILL_SCHEDULES": str(path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, check=False)

    listed = cli("schedule", "list", "--check")
    assert listed.returncode == 1 and "late" in listed.stdout  # today's 06:00 slot has no run
    ran = cli("schedule", "run", "digest")
    assert ran.returncode == 0 and ran.stdout.strip().startswith("batch_")
    again = cli("schedule", "run", "digest")
    assert again.returncode == 1 and "--force" in again.stderr
    dry = cli("schedule", "backfill", "digest", "--from", "2026-11-01", "--to", "2026-11-03", "--dry-run")
    assert dry.stdout.split("\n")[:3] == [f"2026-11-0{d} 06:00 CET" for d in (1, 2, 3)]
    missing = cli("schedule", "run", "nope")
    assert missing.returncode == 1 and "no schedule named 'nope'" in missing.stderr
    with get_sessionmaker(sqlite_url)() as session:
        assert session.query(ScheduleRun).count() == 1
    status = json.loads(cli("status", "--json", ran.stdout.strip()).stdout)
    assert status["request_counts"]["cached"] == 0 and status["priority"] == 2
    env["GRISTMILL_ENGINE"] = "tests.fault_engine:HoldingEngine"  # the embedded defaults: it runs in process
    waited = cli("schedule", "run", "digest", "--force", "--wait")
    assert waited.returncode == 0 and "run succeeded; 1 items, 0 new, 0 changed" in waited.stderr, waited.stderr
