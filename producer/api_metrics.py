"""The Prometheus metrics `gristmill serve` shows at /metrics: its own requests, and the mill's state read
at scrape time from SQL (batch counters, not item scans) and the broker (messages per queue).

Several uvicorn workers (`serve --workers N`) share their request metrics through prometheus_client's
multi-process mode: `gristmill serve` points PROMETHEUS_MULTIPROC_DIR at a fresh folder before they start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from schema import workers
from schema.db import get_sessionmaker
from schema.queue import Queue, queue_for
from schema.settings import Settings
from schema.states import TERMINAL_BATCH
from schema.tables import Batch

log = logging.getLogger("gristmill.api")
REQUESTS = Counter("gristmill_http_requests", "HTTP API requests", ["method", "route", "status"])
REQUEST_SECONDS = Histogram("gristmill_http_request_seconds", "HTTP API request latency", ["method", "route"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
OUTCOMES = {"succeeded": Batch.succeeded, "failed": Batch.failed, "cancelled": Batch.cancelled,
            "expired": Batch.expired}


def exposition(settings: Settings, queue: Queue) -> bytes:
    mill = CollectorRegistry(auto_describe=False)
    mill.register(MillCollector(settings, queue))
    return generate_latest(_requests_registry()) + generate_latest(mill)


def _requests_registry() -> CollectorRegistry:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


class MillCollector(Collector):
    def __init__(self, settings: Settings, queue: Queue) -> None:
        self.settings, self.queue = settings, queue

    def collect(self) -> Iterator[Any]:
        with get_sessionmaker(self.settings.database_url)() as session:
            totals = session.execute(select(Batch.kind, Batch.model, *(func.sum(c) for c in OUTCOMES.values()),
                                            func.sum(Batch.cached)).group_by(Batch.kind, Batch.model)).all()
            states = session.execute(select(Batch.status, func.count()).group_by(Batch.status)).all()
            open_queues = session.execute(select(Batch.model, Batch.kind).distinct()
                                          .where(Batch.status.not_in(TERMINAL_BATCH))).all()
        items = CounterMetricFamily("gristmill_batch_items", "Items finished, from the batches' counters in SQL",
                                    labels=["kind", "model", "outcome"])
        cached = CounterMetricFamily("gristmill_cache_hits", "Items answered from the result cache (SQL)",
                                     labels=["kind", "model"])
        for kind, model, *counts, hits in totals:
            for outcome, count in zip(OUTCOMES, counts, strict=True):
                items.add_metric([kind, model, outcome], count or 0)
            cached.add_metric([kind, model], hits or 0)
        batches = GaugeMetricFamily("gristmill_batches", "Batches by state", labels=["status"])
        for status, count in states:
            batches.add_metric([status], count)
        yield from (items, cached, batches, self._workers(), self._queues(open_queues))

    def _workers(self) -> GaugeMetricFamily:
        live = GaugeMetricFamily("gristmill_workers", "Live workers (heartbeat in SQL)", labels=["model", "engine"])
        for (model, engine), count in sorted(workers.live_counts(self.settings).items()):
            live.add_metric([model, engine], count)
        return live

    def _queues(self, open_queues: list[Any]) -> GaugeMetricFamily:
        """Messages waiting in each queue that an open batch uses (a broker away: left out)."""
        depth = GaugeMetricFamily("gristmill_queue_depth", "Chunk messages waiting in the broker", labels=["queue"])
        try:
            with self.queue.connection() as conn:
                channel = conn.default_channel
                for model, kind in open_queues:
                    name = queue_for(model, kind)
                    try:
                        depth.add_metric([name], channel.queue_declare(name, passive=True).message_count)
                    except Exception:  # noqa: BLE001  # not declared yet: nothing waits in it
                        depth.add_metric([name], 0)
        except Exception as exc:  # noqa: BLE001  # the broker is away; /readyz says so
            log.warning("queue depths left out of /metrics: the broker did not answer (%s)", type(exc).__name__)
        return depth
