"""The admin commands through the real CLI: `db upgrade` over an old database that holds rows,
`cancel` of a queued batch, and `reconcile` (lost messages requeued, overdue batches expired)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import JSON, DateTime, bindparam, create_engine, inspect, select, text, update
from sqlalchemy.types import TypeEngine

from producer import api
from schema import store
from schema.db import MIGRATIONS, get_sessionmaker
from schema.outputs import OutputLine
from schema.queue import RUN_CHUNK, Queue, broker_lists, queue_for
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, Item, Result
from tests.conftest import cli_env, gristmill, messages_waiting
from worker.reconciler import reconcile

CHAT = {"method": "POST", "url": "/v1/chat/completions"}


def write_docs(tmp_path: Path, n: int, *extra: dict[str, Any]) -> Path:
    path = tmp_path / "docs.jsonl"
    lines = [{"custom_id": f"d{i}", **CHAT, "body": {"messages": [{"role": "user", "content": f"doc {i}"}]}}
             for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in [*lines, *extra]))
    return path


def items_of(url: str, batch_id: str) -> list[Item]:
    with get_sessionmaker(url)() as session:
        return list(session.scalars(select(Item).where(Item.batch_id == batch_id).order_by(Item.line)))


def batch_row(url: str, batch_id: str) -> Batch:
    with get_sessionmaker(url)() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        return batch


# --- db upgrade -------------------------------------------------------------------------------------

def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection_url"] = url
    return cfg


T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_TYPES: dict[str, TypeEngine[Any]] = {"params": JSON(), "metadata": JSON(), "errors": JSON(), "request": JSON(), "body": JSON(),
          **{name: DateTime(timezone=True) for name in (
              "expires_at", "created_at", "in_progress_at", "finalizing_at", "completed_at", "started_at",
              "finished_at", "enqueued_at")}}


def insert(conn: Any, table: str, row: dict[str, Any]) -> None:
    """Plain INSERT of the first revision's columns (no ORM model: the tables may have moved on since)."""
    sql = text(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + c for c in row)})")
    conn.execute(sql.bindparams(*[bindparam(c, type_=_TYPES[c]) for c in row if c in _TYPES]), row)


def fill_first_revision(url: str) -> None:
    """One completed batch of two items (one succeeded, with a result and an engine call; one failed)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        insert(conn, "batches", {
            "id": "batch_old", "kind": "generate", "endpoint": "/v1/chat/completions", "model": "old-model",
            "params": {"sampling": {"max_tokens": 16}}, "status": "completed", "input_file": "old.jsonl",
            "metadata": {"team": "ops"}, "errors": [], "total": 2, "succeeded": 1, "failed": 1, "cancelled": 0,
            "expired": 0, "completion_window_s": 86400, "expires_at": T0 + timedelta(days=1), "created_at": T0,
            "in_progress_at": T0, "finalizing_at": T0 + timedelta(seconds=9),
            "completed_at": T0 + timedelta(seconds=9)})
        insert(conn, "engine_batches", {
            "id": 7, "batch_id": "batch_old", "worker_host": "gpu-1", "engine": "vllm", "model": "old-model",
            "n_items": 2, "started_at": T0 + timedelta(seconds=1), "finished_at": T0 + timedelta(seconds=8),
            "engine_s": 7.0, "prompt_tokens": 10, "completion_tokens": 4})
        for item_id, status, error in ((1, "succeeded", None), (2, "failed", "engine_error: boom")):
            insert(conn, "items", {
                "id": item_id, "batch_id": "batch_old", "line": item_id, "custom_id": f"old-{item_id}",
                "endpoint": "/v1/chat/completions", "request": {"messages": [{"role": "user", "content": "hi"}]},
                "body": {"messages": [{"role": "user", "content": "hi"}]}, "status": status, "attempts": 1,
                "interrupted": False, "last_error": error, "enqueued_at": T0,
                "started_at": T0 + timedelta(seconds=1), "finished_at": T0 + timedelta(seconds=8),
                "queue_wait_s": 1.0, "engine_s": 7.0, "tokens_per_s": 0.5 if error is None else None,
                "worker_host": "gpu-1", "engine": "vllm", "model": "old-model", "engine_batch_id": 7})
        insert(conn, "results", {
            "item_id": 1, "batch_id": "batch_old", "custom_id": "old-1", "output_text": "still here, \"kept\"",
            "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 4,
            "created_at": T0 + timedelta(seconds=8)})
    engine.dispose()


def test_db_upgrade_from_first_revision_keeps_rows(db_url: str, settings_for, tmp_path: Path) -> None:
    cfg = alembic_config(db_url)
    scripts = ScriptDirectory.from_config(cfg)
    first, head = scripts.get_base(), scripts.get_current_head()
    assert first is not None and head is not None and first != head
    command.upgrade(cfg, first)
    fill_first_revision(db_url)
    engine = create_engine(db_url)
    assert "workers" not in inspect(engine).get_table_names()

    settings = settings_for(db_url)
    proc = gristmill("db", "upgrade", settings=settings, cwd=tmp_path)
    assert "is at the latest schema" in proc.stderr
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == head
        assert {"classifications", "workers"} <= set(inspect(conn).get_table_names())
        items = conn.execute(text("SELECT id, custom_id, status, last_error FROM items ORDER BY id")).all()
        assert [tuple(r) for r in items] == [(1, "old-1", "succeeded", None), (2, "old-2", "failed", "engine_error: boom")]
        assert conn.scalar(text("SELECT output_text FROM results WHERE item_id = 1")) == "still here, \"kept\""
        assert conn.scalar(text("SELECT engine_s FROM engine_batches WHERE id = 7")) == 7.0
    engine.dispose()

    # The old rows read through today's code: status, export and stats.
    handle = api.open_batch("batch_old", settings)
    info = handle.status()
    assert info.status == BatchStatus.completed and info.metadata == {"team": "ops"}
    out = tmp_path / "old.out.jsonl"
    counts = handle.results(out)
    assert (counts.succeeded, counts.failed) == (1, 1)
    lines = [OutputLine.model_validate_json(line) for line in out.read_text().splitlines()]
    assert lines[0].response is not None
    assert lines[0].response.body.choices[0].message.content == "still here, \"kept\""  # type: ignore[union-attr]
    assert lines[1].error is not None and lines[1].error.message == "engine_error: boom"
    assert handle.stats()["engine_call_s"]["p50"] == 7.0

    again = gristmill("db", "upgrade", settings=settings, cwd=tmp_path)  # a no-op at head
    assert again.returncode == 0
    with create_engine(db_url).connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == head
        assert conn.scalar(text("SELECT count(*) FROM items")) == 2


# --- cancel -----------------------------------------------------------------------------------------

def test_cancel_queued_batch(db_url: str, settings_for, tmp_path: Path) -> None:
    settings = settings_for(db_url)
    unrunnable = {"custom_id": "other", **CHAT, "body": {"model": "gpt-4o", "messages": [{"role": "user",
                                                                                           "content": "x"}]}}
    handle = api.submit(write_docs(tmp_path, 5, unrunnable), settings=settings)  # no worker: all stay queued
    assert handle.status().status == BatchStatus.in_progress

    proc = gristmill("cancel", handle.id, settings=settings, cwd=tmp_path)
    assert proc.stdout.strip() == "cancelled"
    batch = batch_row(db_url, handle.id)
    assert batch.status == BatchStatus.cancelled and batch.cancelled_at is not None
    assert (batch.total, batch.cancelled, batch.failed, batch.succeeded) == (6, 5, 1, 0)
    items = items_of(db_url, handle.id)
    assert [i.status for i in items] == [ItemStatus.cancelled] * 5 + [ItemStatus.failed]
    assert all(i.finished_at is not None for i in items)

    again = gristmill("cancel", handle.id, settings=settings, cwd=tmp_path, check=False)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"error: batch {handle.id} is cancelled; only a running batch can be cancelled"]


@pytest.mark.parametrize("fresh", [False, True], ids=["other-batches", "fresh-database"])
def test_cancel_unknown_batch(fresh: bool, db_url: str, settings_for, tmp_path: Path) -> None:
    settings = settings_for(db_url)
    if not fresh:
        api.submit(write_docs(tmp_path, 2), settings=settings)  # a database with tables and another batch
    proc = gristmill("cancel", "batch_nope", settings=settings, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: no batch with id 'batch_nope'")
    if not fresh:
        assert batch_row(db_url, api.list_batches(5, settings)[0].id).status == BatchStatus.in_progress


# --- reconcile --------------------------------------------------------------------------------------

def ids_in_redis(url: str, queue: str) -> dict[str, set[int]]:
    """Item ids the chunk messages waiting in a Redis queue carry, by batch (decoded here, not by gristmill)."""
    carried: dict[str, set[int]] = {}
    client = redis.Redis.from_url(url)
    for raw in (m for key in broker_lists(queue) for m in client.lrange(key, 0, -1)):
        message = json.loads(raw)
        assert message["headers"]["task"] == RUN_CHUNK
        assert message["properties"]["body_encoding"] == "base64"
        args = json.loads(base64.b64decode(message["body"]))[0]
        carried.setdefault(args[0], set()).update(args[1])
    client.close()
    return carried


def age_items(url: str, batch_id: str, seconds: float) -> None:
    with get_sessionmaker(url)() as session, session.begin():
        session.execute(update(Item).where(Item.batch_id == batch_id).values(
            enqueued_at=datetime.now(UTC) - timedelta(seconds=seconds)))


def test_reconcile_requeues_lost_messages(db_url: str, redis_url: str, settings_for, tmp_path: Path) -> None:
    # A model (so a queue) of its own: a test run elsewhere on the same Redis db neither sees nor adds to it.
    settings = settings_for(db_url, broker_url=redis_url, chunk_size=4, requeue_grace_s=60,
                            model=f"reconcile-{uuid.uuid4().hex[:8]}")
    handle = api.submit(write_docs(tmp_path, 10), settings=settings)
    queue = queue_for(settings.model, "generate")
    ids = [i.id for i in items_of(db_url, handle.id)]
    assert ids_in_redis(redis_url, queue) == {handle.id: set(ids)}
    client = redis.Redis.from_url(redis_url)
    client.delete(*broker_lists(queue))  # Redis restarted without persistence: the messages are gone
    assert messages_waiting(client, queue) == 0

    young = gristmill("reconcile", settings=settings, cwd=tmp_path)  # within the grace period: left alone
    assert "0 items requeued" in young.stderr
    assert messages_waiting(client, queue) == 0

    age_items(db_url, handle.id, 120)
    with get_sessionmaker(db_url)() as session, session.begin():  # and a worker died holding two of them
        session.execute(update(Item).where(Item.id.in_(ids[:2])).values(
            status=ItemStatus.running, attempts=1, lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    proc = gristmill("reconcile", settings=settings, cwd=tmp_path)
    assert "0 batches expired, 2 dead leases returned, 10 items requeued" in proc.stderr
    assert ids_in_redis(redis_url, queue) == {handle.id: set(ids)}
    assert messages_waiting(client, queue) == 3  # 2 returned leases in one chunk, 8 orphans in chunks of 4
    items = items_of(db_url, handle.id)
    assert all(i.status == ItemStatus.queued and i.lease_expires_at is None for i in items)
    assert [i.interrupted for i in items] == [True, True] + [False] * 8

    settled = gristmill("reconcile", settings=settings, cwd=tmp_path)  # the broker carries them all now
    assert "0 items requeued" in settled.stderr and messages_waiting(client, queue) == 3
    client.close()


def test_reconcile_pages_through_lost_messages(db_url: str, redis_url: str, settings_for, tmp_path: Path) -> None:
    """A pass handles at most a page of items and says where the next goes on, so a pass costs the same
    however many items wait; passes one after another cover them all, then start over."""
    settings = settings_for(db_url, broker_url=redis_url, chunk_size=4, requeue_grace_s=60,
                            model=f"reconcile-{uuid.uuid4().hex[:8]}")
    handle = api.submit(write_docs(tmp_path, 10), settings=settings)
    queue = queue_for(settings.model, "generate")
    ids = [i.id for i in items_of(db_url, handle.id)]
    client = redis.Redis.from_url(redis_url)
    client.delete(*broker_lists(queue))
    age_items(db_url, handle.id, 120)
    with get_sessionmaker(db_url)() as session, session.begin():  # 4 dead leases: more than one page
        session.execute(update(Item).where(Item.id.in_(ids[:4])).values(
            status=ItemStatus.running, attempts=1, lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)))

    passes, resume_after = [], 0
    for _ in range(5):
        report = reconcile(settings, Queue(settings), resume_after, page=3)
        passes.append((report.leases_expired, report.requeued, report.resume_after))
        resume_after = report.resume_after
    # Pass 1: 3 of the 4 leases, and ids 0-2 scanned (all just returned); pass 2: the last lease, ids 3-5
    # (3 was just returned: 2 orphans); pass 3: ids 6-8; pass 4: id 9, the end; pass 5 starts over, ids
    # 0-2 are carried now.
    assert passes == [(3, 3, ids[2]), (1, 3, ids[5]), (0, 3, ids[8]), (0, 1, 0), (0, 0, ids[2])]
    assert ids_in_redis(redis_url, queue) == {handle.id: set(ids)}
    client.close()


def test_reconcile_expires_overdue_batch(db_url: str, settings_for, tmp_path: Path) -> None:
    settings = settings_for(db_url)
    overdue = api.submit(write_docs(tmp_path, 4), settings=settings, completion_window="1h")
    current = api.submit(write_docs(tmp_path, 2), settings=settings, completion_window="1h")
    first = items_of(db_url, overdue.id)[0]
    sessions = get_sessionmaker(db_url)
    with sessions() as session, session.begin():  # one item finished before the window passed
        claimed = store.claim(session, overdue.id, [first.id], "host", 60)
        now, later = datetime.now(UTC), datetime.now(UTC) + timedelta(seconds=1)
        eb = store.record_engine_batch(session, overdue.id, "host", "null", "m", [], now, later)
        written = store.write_outcomes(session, overdue.id, [store.Outcome(claimed[0], text="done", completion_tokens=1)],
                                       engine="null", model="m", engine_batch_id=eb, started=now, finished=later)
        store.count(session, overdue.id, **written.ended)
        session.execute(update(Batch).where(Batch.id == overdue.id).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))

    proc = gristmill("reconcile", settings=settings, cwd=tmp_path)
    assert proc.stderr.strip().splitlines()[-1].startswith("1 batches expired")
    batch = batch_row(db_url, overdue.id)
    assert batch.status == BatchStatus.expired and batch.expired_at is not None
    assert (batch.succeeded, batch.expired) == (1, 3)
    items = items_of(db_url, overdue.id)
    assert [i.status for i in items] == [ItemStatus.succeeded] + [ItemStatus.expired] * 3
    assert all("expired" in (i.last_error or "") for i in items[1:])
    with sessions() as session:
        assert session.scalar(select(Result.output_text).where(Result.item_id == first.id)) == "done"
    assert batch_row(db_url, current.id).status == BatchStatus.in_progress
    assert {i.status for i in items_of(db_url, current.id)} == {ItemStatus.queued}

    out = tmp_path / "expired.jsonl"
    overdue.results(out)
    codes = [OutputLine.model_validate_json(line).error for line in out.read_text().splitlines()]
    assert codes[0] is None and [c.code for c in codes[1:] if c] == ["batch_expired"] * 3


def test_a_command_logs_to_its_file_unless_verbose(settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`schedule run` logs the firing at INFO: into the log file, not onto the terminal; with -v (before
    or after the command) onto the terminal."""
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "schedules.toml").write_text('[[schedule]]\nname = "s"\ncron = "0 6 * * *"\nsource = { glob = "*.txt" }\n'
                                             'task = { kind = "generate" }\n')
    quiet = settings_for(f"sqlite:///{tmp_path / 'a.db'}")
    proc = gristmill("schedule", "run", "s", "--force", settings=quiet, cwd=tmp_path)
    assert proc.stdout.startswith("batch_") and "INFO" not in proc.stderr + proc.stdout
    assert "schedule s: slot" in (quiet.home / "gristmill.log").read_text()
    for args in (["-v", "schedule", "run", "s", "--force"], ["schedule", "run", "s", "--force", "-v"]):
        loud = settings_for(f"sqlite:///{tmp_path / (args[0] + '.db')}")
        assert "INFO gristmill.beat: schedule s: slot" in gristmill(*args, settings=loud, cwd=tmp_path).stderr
    unwritable = subprocess.run([sys.executable, "-m", "producer.cli", "status"], cwd=tmp_path, text=True,
                                capture_output=True, check=False,
                                env={**cli_env(quiet), "GRISTMILL_LOG_FILE": "/proc/no/x.log"})
    assert unwritable.returncode == 0 and "cannot write the log file /proc/no/x.log" in unwritable.stderr
