"""Timing statistics of a batch: queue wait, engine time, throughput, percentiles."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schema.db import seconds_between
from schema.tables import Batch, EngineBatch, Item, Result


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "max": max(values, default=None)}


def summarise(session: Session, batch_id: str) -> dict[str, Any]:
    batch = session.get(Batch, batch_id)
    assert batch is not None
    waits = [w for (w,) in session.execute(select(Item.queue_wait_s).where(
        Item.batch_id == batch_id, Item.queue_wait_s.is_not(None))) if w is not None]
    engine_times = [e for (e,) in session.execute(select(EngineBatch.engine_s).where(EngineBatch.batch_id == batch_id))]
    first_start, last_finish = session.execute(
        select(func.min(Item.started_at), func.max(Item.finished_at)).where(
            Item.batch_id == batch_id, Item.started_at.is_not(None))).one()
    prompt_tokens, completion_tokens = session.execute(
        select(func.coalesce(func.sum(Result.prompt_tokens), 0), func.coalesce(func.sum(Result.completion_tokens), 0))
        .where(Result.batch_id == batch_id)).one()
    workers = session.execute(
        select(EngineBatch.worker_host, EngineBatch.engine, EngineBatch.model).where(
            EngineBatch.batch_id == batch_id).distinct()).all()
    run_s = seconds_between(first_start, last_finish)
    end = batch.completed_at or batch.cancelled_at or batch.failed_at or batch.expired_at
    return {
        "batch_id": batch_id,
        "status": batch.status,
        "items": batch.total,
        "succeeded": batch.succeeded,
        "failed": batch.failed,
        "wall_s": seconds_between(batch.created_at, end),
        "run_s": run_s,  # first item started to last item finished
        "queue_wait_s": _spread(waits),
        "engine_call_s": _spread(engine_times),
        "engine_calls": len(engine_times),
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
        "output_tokens_per_s": completion_tokens / run_s if run_s else None,
        "items_per_s": (batch.succeeded + batch.failed) / run_s if run_s else None,
        "workers": [{"host": h, "engine": e, "model": m} for h, e, m in workers],
    }
