"""A worker's Prometheus metrics, served by `gristmill worker --metrics-port PORT` (prometheus_client's
default registry, so metrics an engine registers there show too).

Counters count what this worker did since it started; Prometheus' rate() and increase() make them
per-second figures. The engine's busy fraction is rate(gristmill_engine_busy_seconds_total).
"""

from __future__ import annotations

import collections
from datetime import datetime

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from schema import store
from schema.db import seconds_between

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

ITEMS = Counter("gristmill_items", "Items this worker finished, by outcome (succeeded, or the error code)",
                ["kind", "model", "outcome"])
PROMPT_TOKENS = Counter("gristmill_prompt_tokens", "Prompt tokens of the items this worker finished", ["kind", "model"])
OUTPUT_TOKENS = Counter("gristmill_output_tokens", "Output tokens of the items this worker finished", ["kind", "model"])
CHUNK_SECONDS = Histogram("gristmill_chunk_seconds", "Engine time of a chunk", ["kind", "model"],
                          buckets=LATENCY_BUCKETS)
QUEUE_WAIT_SECONDS = Histogram("gristmill_item_queue_wait_seconds", "From enqueued to its chunk's start",
                               ["kind", "model"], buckets=LATENCY_BUCKETS)
ITEM_SECONDS = Histogram("gristmill_item_seconds", "From enqueued to finished, per item", ["kind", "model"],
                         buckets=LATENCY_BUCKETS)
CACHE_HITS = Counter("gristmill_cache_hits", "Claimed items answered from the result cache", ["kind", "model"])
RETRIES = Counter("gristmill_chunk_retries", "Chunks given back to the queue, by reason", ["kind", "model", "reason"])
REQUEUES = Counter("gristmill_reconciler_requeues", "Items the reconciler sent again (their message was lost)")
ENGINE_BUSY = Counter("gristmill_engine_busy_seconds", "Time the engine spent in steps")
CHUNKS_IN_FLIGHT = Gauge("gristmill_chunks_in_flight", "Chunks this worker is running")
ENGINE_SEQUENCES = Gauge("gristmill_engine_sequences", "running: requests in the engine; waiting: chunks handed "
                                                       "to the engine loop, not yet in it", ["state"])


def serve(port: int) -> None:
    start_http_server(port)


def activity() -> tuple[int, float]:
    """Chunks in flight now and the engine's busy seconds so far (what the heartbeat reports)."""
    chunks = REGISTRY.get_sample_value("gristmill_chunks_in_flight") or 0.0
    return int(chunks), REGISTRY.get_sample_value("gristmill_engine_busy_seconds_total") or 0.0


def finished(kind: str, model: str, outcomes: list[store.Outcome], succeeded: list[store.Outcome],
             started: datetime, finished_at: datetime) -> None:
    """A chunk's outcomes written; `succeeded`: those the write finished (a late repeat finishes none).
    Counters grow once per chunk, not per item: a label lookup costs about as much as an item's SQL."""
    CHUNK_SECONDS.labels(kind, model).observe((finished_at - started).total_seconds())
    done = {o.item.id for o in succeeded}
    counted = [o for o in outcomes if o.error is not None or o.item.id in done]
    for code, n in collections.Counter(o.error_code or ("engine_error" if o.error else "succeeded") for o in counted).items():
        ITEMS.labels(kind, model, code).inc(n)
    PROMPT_TOKENS.labels(kind, model).inc(sum(o.prompt_tokens for o in counted))
    OUTPUT_TOKENS.labels(kind, model).inc(sum(o.completion_tokens for o in counted))
    # a chunk's items mostly share their enqueue time: each distinct one is observed once, weighted
    for enqueued_at, times in collections.Counter(o.item.enqueued_at for o in counted if o.item.enqueued_at).items():
        wait, total = seconds_between(enqueued_at, started), seconds_between(enqueued_at, finished_at)  # SQLite's: no zone
        observe(QUEUE_WAIT_SECONDS.labels(kind, model), max(wait or 0.0, 0.0), times)
        observe(ITEM_SECONDS.labels(kind, model), max(total or 0.0, 0.0), times)


def observe(histogram: Histogram, value: float, times: int) -> None:
    """`histogram.observe(value)` `times` times, at the cost of once (2 observations per item cost as much
    as the item's SQL). prometheus_client has no weighted observe: this adds to the histogram's sum and
    bucket as its `observe` does (tests/test_metrics.py checks that both agree)."""
    histogram._sum.inc(value * times)
    for bound, bucket in zip(histogram._upper_bounds, histogram._buckets, strict=True):
        if value <= bound:
            bucket.inc(times)
            return


def gave_up(kind: str, model: str, count: int, code: str) -> None:
    ITEMS.labels(kind, model, code).inc(count)
