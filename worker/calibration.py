"""Contextual calibration (Zhao et al. 2021, "Calibrate Before Use").

A small model prefers some labels whatever the text says. Its answer to content-free inputs ("N/A",
"", "[MASK]") under the same instruction estimates that prior; dividing it out and renormalising
leaves what the text itself adds. Priors are remembered per prompt and label set, so a worker pays
for them once, not once per chunk.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

MAX_PRIORS = 4096

_priors: OrderedDict[Hashable, list[float]] = OrderedDict()
_lock = threading.Lock()


def normalise(logprobs: list[float]) -> list[float]:
    """Softmax: label log-probabilities to probabilities over the labels."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def average(distributions: list[list[float]]) -> list[float]:
    return [sum(column) / len(distributions) for column in zip(*distributions, strict=True)]


def calibrate(probabilities: list[float], prior: list[float]) -> list[float]:
    """p / prior, renormalised; a prior of 0 (underflow) is floored so no label becomes infinite."""
    weights = [p / max(q, 1e-12) for p, q in zip(probabilities, prior, strict=True)]
    total = sum(weights)
    return [w / total for w in weights]


def cached_prior(key: Hashable, estimate: Callable[[], list[float]]) -> list[float]:
    """The prior for `key`, estimated on first use and kept (least recently used dropped first)."""
    with _lock:
        if key in _priors:
            _priors.move_to_end(key)
            return _priors[key]
    prior = estimate()  # outside the lock: it runs the engine
    with _lock:
        _priors[key] = prior
        while len(_priors) > MAX_PRIORS:
            _priors.popitem(last=False)
    return prior


def clear_priors() -> None:
    """Forget every cached prior (benchmarks time the estimate; tests start clean)."""
    with _lock:
        _priors.clear()
