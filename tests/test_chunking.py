"""Chunk size follows the engines that will run the chunks: half the largest live worker's
`max_num_seqs` for the model, the configured size when one is set, a fallback before any worker reports."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from schema import workers
from schema.db import get_sessionmaker, upgrade, utcnow
from schema.queue import FALLBACK_CHUNK_SIZE, chunk_size
from schema.tables import Worker


def test_chunk_size_follows_live_workers(db_url: str, settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(db_url)
    upgrade(db_url)
    assert chunk_size(settings, "m") == FALLBACK_CHUNK_SIZE

    workers.register(settings, "w1@host", "m", "vllm", 256, ["generate", "classify"])
    workers.register(settings, "w2@host", "m", "transformers", 32, ["generate", "classify"])
    workers.register(settings, "w3@host", "other", "vllm", 1024, ["classify"])
    assert chunk_size(settings, "m") == 128  # the largest engine of this model; other models don't count
    assert chunk_size(settings_for(db_url, chunk_size=10), "m") == 10  # configured wins

    with get_sessionmaker(db_url)() as session, session.begin():  # w1 stopped beating: gone
        stale = utcnow() - timedelta(seconds=3 * settings.reconcile_interval_s + 1)
        session.execute(update(Worker).where(Worker.id == "w1@host").values(seen_at=stale))
    assert chunk_size(settings, "m") == 16
    workers.heartbeat(settings, "w1@host")
    assert chunk_size(settings, "m") == 128

    workers.unregister(settings, "w1@host")
    workers.unregister(settings, "w2@host")
    assert chunk_size(settings, "m") == FALLBACK_CHUNK_SIZE


def test_a_kind_no_live_worker_runs_is_refused(sqlite_url: str, settings_for, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Workers record the task kinds their engines serve; a batch the live workers of its model cannot
    run is refused at submission, nothing stored. With no live worker a batch waits for one."""
    from producer.service import Service
    from schema.errors import NotServed

    settings = settings_for(sqlite_url)
    service = Service(settings)
    docs = b'{"id": "a", "text": "hello"}\n'
    assert service.waiting_for_worker("m")
    service.submit(docs, task="classify", model="m", labels=["x", "y"])  # waits in the queue
    workers.register(settings, "head@host", "m", "transformers", 32, ["classify"])  # a classifier
    assert not service.waiting_for_worker("m")
    with pytest.raises(NotServed, match="no live worker of model 'm' runs task 'generate'; they run classify"):
        service.submit(docs, model="m")
    assert len(service.list_batches()) == 1
    service.submit(docs, task="classify", model="m", labels=["x", "y"])


def test_run_cuts_chunks_to_its_own_engine(sqlite_url: str, settings_for, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`gristmill run` stores the batch before its model loads and enqueues it once its worker has
    registered: the chunks fit that engine (128 for 256 sequences), not the fallback size."""
    import json

    from sqlalchemy import select

    from schema.tables import EngineBatch
    from tests.conftest import gristmill

    settings = settings_for(sqlite_url)
    assert not settings.chunk_size  # sized to the engines
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) + "\n"
                                               for i in range(300)))
    gristmill("run", "in.jsonl", "-o", "out.jsonl", "--engine", "bench.null_engine:NullEngine", settings=settings,
              cwd=tmp_path)
    with get_sessionmaker(sqlite_url)() as session:
        sizes = sorted(session.scalars(select(EngineBatch.n_items)))
    assert sizes == [44, 128, 128], sizes
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 300
