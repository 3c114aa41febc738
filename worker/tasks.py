"""Celery tasks. Thin: the work is in worker.executor, which tests can call directly."""

from __future__ import annotations

from celery import Task

from schema.errors import GristmillError
from worker import executor, runtime
from worker.celery_app import RUN_CHUNK, app

MAX_RETRIES = 3


@app.task(name=RUN_CHUNK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_chunk(self: Task, batch_id: str, item_ids: list[int]) -> dict[str, int]:
    """Run one chunk of a batch's items on this worker's engine; retry with backoff if the engine fails."""
    try:
        return executor.run_chunk(runtime.current(), batch_id, item_ids)
    except (GristmillError, RuntimeError, OSError) as exc:
        if self.request.retries >= MAX_RETRIES:
            executor.give_up(runtime.current(), batch_id, item_ids, f"{type(exc).__name__}: {exc}")
            raise
        raise self.retry(exc=exc, countdown=2 ** (self.request.retries + 1), max_retries=MAX_RETRIES) from exc
