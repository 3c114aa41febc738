"""Timing statistics of a batch: queue wait, engine time, throughput, percentiles, and the series the
charts draw (producer.charts): histograms, a timeline of finished chunks, errors by code; a classification
batch's answers per label, its calibration warning and latest evaluation (producer.evaluation)."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from producer import evaluation
from schema.db import seconds_between
from schema.errors import ErrorCode
from schema.states import ItemStatus
from schema.tables import Batch, EngineBatch, Item, Result

HISTOGRAM_BINS = 20
TIMELINE_BUCKETS = 40  # about this many points on a timeline, at a round bucket width
ERROR_EXAMPLES = 3


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "max": max(values, default=None)}


def histogram(values: list[float], bins: int = HISTOGRAM_BINS) -> dict[str, list[Any]]:
    """Equal-width bins from the smallest value to the largest (the last bin includes it)."""
    if not values:
        return {"edges": [], "counts": []}
    low, high = min(values), max(values)
    if high == low:
        return {"edges": [low, high], "counts": [len(values)]}
    width = (high - low) / bins
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / width), bins - 1)] += 1
    return {"edges": [low + i * width for i in range(bins + 1)], "counts": counts}


def round_width(seconds: float) -> float:
    """The smallest of 0.1, 0.2, 0.5, 1, 2, 5, 10, ... seconds at least `seconds` long."""
    width = 0.1
    while width < seconds:
        for step in (2, 2.5, 2):
            width *= step
            if width >= seconds:
                break
    return width


def timeline(session: Session, batch_id: str, start: Any) -> dict[str, Any]:
    """Items and output tokens finished per bucket, from the chunks' records (one row per engine call,
    not per item), with bucket starts in seconds after the batch's first item started."""
    chunks = session.execute(select(EngineBatch.finished_at, EngineBatch.n_items, EngineBatch.completion_tokens)
                             .where(EngineBatch.batch_id == batch_id)).all()
    offsets = [(max(seconds_between(start, end) or 0.0, 0.0), n, tokens) for end, n, tokens in chunks]
    if start is None or not offsets:
        return {"bucket_s": None, "t_s": [], "items": [], "output_tokens": []}
    width = round_width(max(t for t, _, _ in offsets) / TIMELINE_BUCKETS)
    buckets = int(max(t for t, _, _ in offsets) // width) + 1
    items, tokens = [0] * buckets, [0] * buckets
    for t, n, out in offsets:
        items[int(t // width)] += n
        tokens[int(t // width)] += out
    return {"bucket_s": width, "t_s": [i * width for i in range(buckets)], "items": items, "output_tokens": tokens}


def errors(session: Session, batch_id: str) -> list[dict[str, Any]]:
    """Failed items by error code, most frequent first, with a few examples of each."""
    failed = (Item.batch_id == batch_id, Item.status == ItemStatus.failed, Item.parent_id.is_(None))  # not windows
    codes = session.execute(select(Item.error_code, func.count()).where(*failed).group_by(Item.error_code)
                            .order_by(func.count().desc())).all()
    return [{"code": code or ErrorCode.engine_error.value, "count": count, "examples": [
        {"custom_id": custom_id, "message": message} for custom_id, message in session.execute(
            select(Item.custom_id, Item.last_error).where(*failed, Item.error_code.is_(code) if code is None
                                                          else Item.error_code == code)
            .order_by(Item.line).limit(ERROR_EXAMPLES))]} for code, count in codes]


def summarise(session: Session, batch_id: str) -> dict[str, Any]:
    batch = session.get(Batch, batch_id)
    assert batch is not None
    waits = [w for (w,) in session.execute(select(Item.queue_wait_s).where(
        Item.batch_id == batch_id, Item.queue_wait_s.is_not(None))) if w is not None]
    engine_times = [e for (e,) in session.execute(select(EngineBatch.engine_s).where(EngineBatch.batch_id == batch_id))]
    first_start, last_finish = session.execute(
        select(func.min(Item.started_at), func.max(Item.finished_at)).where(
            Item.batch_id == batch_id, Item.started_at.is_not(None))).one()
    prompt_tokens, completion_tokens, truncated_items, truncated_tokens = session.execute(
        select(func.coalesce(func.sum(Result.prompt_tokens), 0), func.coalesce(func.sum(Result.completion_tokens), 0),
               func.count().filter(Result.truncated_tokens > 0), func.coalesce(func.sum(Result.truncated_tokens), 0))
        .where(Result.batch_id == batch_id)).one()
    workers = session.execute(
        select(EngineBatch.worker_host, EngineBatch.engine, EngineBatch.model).where(
            EngineBatch.batch_id == batch_id).distinct()).all()
    run_s = seconds_between(first_start, last_finish)
    end = batch.completed_at or batch.cancelled_at or batch.failed_at or batch.expired_at
    figures = {
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
        "prompt_tokens_per_s": prompt_tokens / run_s if run_s else None,
        "total_tokens": int(prompt_tokens + completion_tokens),
        "truncated_items": int(truncated_items),  # answered from a document cut to fit the context
        "truncated_tokens": int(truncated_tokens),
        "total_tokens_per_s": (prompt_tokens + completion_tokens) / run_s if run_s else None,
        "items_per_s": (batch.succeeded + batch.failed) / run_s if run_s else None,
        "workers": [{"host": h, "engine": e, "model": m} for h, e, m in workers],
        "errors": errors(session, batch_id),
        "histograms": {"queue_wait_s": histogram(waits), "engine_call_s": histogram(engine_times)},
        "timeline": timeline(session, batch_id, first_start),
    }
    return {**figures, **evaluation.summary(session, batch)} if batch.kind == "classify" else figures
