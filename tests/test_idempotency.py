"""The same chunk delivered twice, one after the other or at the same time, leaves one result per item."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from producer import api
from schema.db import get_sessionmaker, utcnow
from schema.jobs import SamplingParams
from schema.queue import Queue
from schema.states import BatchStatus, ItemStatus
from schema.tables import Item, Result
from worker import executor
from worker.runtime import Runtime


@pytest.fixture
def engine(transformers_loop):  # type: ignore[no-untyped-def]
    return transformers_loop


def submit_docs(settings, tmp_path: Path, n: int = 6) -> tuple[str, list[int]]:  # type: ignore[no-untyped-def]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Say the number {i}."}) + "\n" for i in range(n)))
    handle = api.submit(path, settings=settings, sampling=SamplingParams(max_tokens=8))
    with get_sessionmaker(settings.database_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id).order_by(Item.line)))
    return handle.id, ids


def result_count(url: str) -> int:
    with get_sessionmaker(url)() as session:
        return session.scalar(select(func.count()).select_from(Result)) or 0


def test_chunk_delivered_twice(db_url: str, settings_for, tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(db_url)
    batch_id, ids = submit_docs(settings, tmp_path)
    runtime = Runtime(settings, *engine, queue=Queue(settings))
    first = executor.run_chunk(runtime, batch_id, ids)
    second = executor.run_chunk(runtime, batch_id, ids)
    assert first == {"claimed": 6, "succeeded": 6, "failed": 0}
    assert second["claimed"] == 0
    assert result_count(db_url) == 6
    info = api.open_batch(batch_id, settings).status()
    assert info.status == BatchStatus.completed and info.request_counts.completed == 6


def test_chunk_delivered_twice_concurrently(db_url: str, settings_for, tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(db_url)
    batch_id, ids = submit_docs(settings, tmp_path)
    runtime = Runtime(settings, *engine, queue=Queue(settings))
    outcomes: list[dict[str, int]] = []
    threads = [threading.Thread(target=lambda: outcomes.append(executor.run_chunk(runtime, batch_id, ids)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(o["claimed"] for o in outcomes) == 6  # each item claimed by exactly one delivery
    assert result_count(db_url) == 6
    assert api.open_batch(batch_id, settings).status().request_counts.completed == 6


def test_redelivery_after_a_dead_worker(db_url: str, settings_for, tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    """A chunk whose worker died mid-run is split in two (to corner a poison item) and then runs; one
    result per item, and the split costs no attempt."""
    settings = settings_for(db_url)
    batch_id, ids = submit_docs(settings, tmp_path)
    with get_sessionmaker(db_url)() as session:
        session.execute(update(Item).where(Item.id.in_(ids[:3])).values(
            status=ItemStatus.running, attempts=1, lease_expires_at=utcnow()))
        session.commit()
    runtime = Runtime(settings, *engine, queue=Queue(settings))
    assert executor.run_chunk(runtime, batch_id, ids)["split"] == 6
    assert executor.run_chunk(runtime, batch_id, ids[:3])["claimed"] == 3
    assert executor.run_chunk(runtime, batch_id, ids[3:])["claimed"] == 3
    with get_sessionmaker(db_url)() as session:
        attempts = dict(session.execute(select(Item.id, Item.attempts).where(Item.batch_id == batch_id)).all())
    assert [attempts[i] for i in ids] == [2, 2, 2, 1, 1, 1]
    assert result_count(db_url) == 6
    assert api.open_batch(batch_id, settings).status().status == BatchStatus.completed


def test_chunk_whose_items_all_fail(db_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every item of a chunk fails in the engine: each is marked failed with its error, none has a
    result (PostgreSQL once typed the chunk's all-NULL rates as text and refused the write)."""
    from schema import store

    settings = settings_for(db_url)
    batch_id, ids = submit_docs(settings, tmp_path, n=3)
    with get_sessionmaker(db_url)() as session, session.begin():
        claimed = store.claim(session, batch_id, ids, "test-host", 60)
    outcomes = [store.Outcome(item=c, error="the prompt is too long") for c in claimed]
    now = utcnow()
    with get_sessionmaker(db_url)() as session, session.begin():
        written = store.write_outcomes(session, batch_id, outcomes, engine="t", model="m",
                                       engine_batch_id=None, started=now, finished=now)  # type: ignore[arg-type]
        store.count(session, batch_id, **written.ended)
        store.close_if_done(session, batch_id)
    with get_sessionmaker(db_url)() as session:
        rows = session.execute(select(Item.status, Item.last_error, Item.tokens_per_s).where(Item.batch_id == batch_id)).all()
    assert rows == [(ItemStatus.failed, "the prompt is too long", None)] * 3
    assert result_count(db_url) == 0
    assert api.open_batch(batch_id, settings).status().request_counts.failed == 3
