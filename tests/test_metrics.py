"""worker.metrics.observe: a weighted observation is the same as that many of prometheus_client's own."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from worker import metrics


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples if not s.name.endswith("_created")}


@pytest.mark.parametrize("value", [0.0, 0.05, 0.07, 3.0, 4000.0])
def test_a_weighted_observation_equals_repeated_ones(value: float) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    weighted = Histogram("h", "x", ["kind"], buckets=metrics.LATENCY_BUCKETS, registry=ours).labels("a")
    repeated = Histogram("h", "x", ["kind"], buckets=metrics.LATENCY_BUCKETS, registry=theirs).labels("a")
    metrics.observe(weighted, value, 7)
    for _ in range(7):
        repeated.observe(value)
    assert samples(ours) == pytest.approx(samples(theirs))  # the sum: up to rounding
    assert samples(ours)[("h_count", (("kind", "a"),))] == 7
