"""The Celery task. Thin: the work is in worker.executor, which tests can call directly."""

from __future__ import annotations

from celery import Celery, Task
from celery.exceptions import Reject

from schema.db import is_disconnect
from schema.queue import RUN_CHUNK
from worker import executor, metrics, runtime

MAX_RETRIES = 10  # then the reconciler takes over: items stay queued in SQL


def bind(app: Celery) -> None:
    """Register the chunk task on the worker's app (explicitly: importing this module does nothing)."""
    app.task(name=RUN_CHUNK, bind=True, acks_late=True, reject_on_worker_lost=True)(run_chunk)


def run_chunk(self: Task, batch_id: str, item_ids: list[int]) -> dict[str, int]:
    """Run one chunk of a batch's items on this worker's engine.

    Any failure retries the chunk with exponential backoff; the retry finds its items tried once and
    splits the chunk, so failures narrow down to the item at fault (see worker.executor). A chunk
    that cannot reach the database goes back to the broker at once, for a worker that can.
    """
    rt = runtime.current()
    try:
        with metrics.CHUNKS_IN_FLIGHT.track_inprogress():
            return executor.run_chunk(rt, batch_id, item_ids)
    except Exception as exc:
        if is_disconnect(exc):
            if rt.database is not None:
                rt.database.lost()
            raise Reject(f"the database is out of reach ({type(exc).__name__})", requeue=True) from exc
        # engine or broker: transient until attempts say otherwise
        raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries), max_retries=MAX_RETRIES) from exc
