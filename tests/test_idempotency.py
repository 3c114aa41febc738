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
from schema.states import BatchStatus, ItemStatus
from schema.tables import Item, Result
from worker import executor
from worker.engine_loop import EngineLoop
from worker.engines import load_engine
from worker.runtime import Runtime


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    loaded = load_engine("smollm2-135m-instruct", "transformers")
    loop = EngineLoop(loaded)
    yield loaded, loop
    loop.close()
    loaded.close()


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
    runtime = Runtime(settings, *engine)
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
    runtime = Runtime(settings, *engine)
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
    runtime = Runtime(settings, *engine)
    assert executor.run_chunk(runtime, batch_id, ids)["split"] == 6
    assert executor.run_chunk(runtime, batch_id, ids[:3])["claimed"] == 3
    assert executor.run_chunk(runtime, batch_id, ids[3:])["claimed"] == 3
    with get_sessionmaker(db_url)() as session:
        attempts = dict(session.execute(select(Item.id, Item.attempts).where(Item.batch_id == batch_id)).all())
    assert [attempts[i] for i in ids] == [2, 2, 2, 1, 1, 1]
    assert result_count(db_url) == 6
    assert api.open_batch(batch_id, settings).status().status == BatchStatus.completed
