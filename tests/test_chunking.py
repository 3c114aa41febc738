"""Chunk size follows the engines that will run the chunks: half the largest live worker's
`max_num_seqs` for the model, the configured size when one is set, a fallback before any worker reports."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from schema import workers
from schema.db import get_sessionmaker, upgrade, utcnow
from schema.queue import FALLBACK_CHUNK_SIZE, chunk_size
from schema.tables import Worker


def test_chunk_size_follows_live_workers(db_url: str, settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(db_url)
    upgrade(db_url)
    assert chunk_size(settings, "m") == FALLBACK_CHUNK_SIZE

    workers.register(settings, "w1@host", "m", "vllm", 256)
    workers.register(settings, "w2@host", "m", "transformers", 32)
    workers.register(settings, "w3@host", "other", "vllm", 1024)
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
