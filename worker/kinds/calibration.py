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
from collections.abc import Hashable

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


def known(key: Hashable) -> list[float] | None:
    """The prior remembered for `key`, or None."""
    with _lock:
        prior = _priors.get(key)
        if prior is not None:
            _priors.move_to_end(key)
        return prior


def remember(key: Hashable, prior: list[float]) -> None:
    """Keep `prior` for `key` (the least recently used are dropped past MAX_PRIORS)."""
    with _lock:
        _priors[key] = prior
        while len(_priors) > MAX_PRIORS:
            _priors.popitem(last=False)


def clear_priors() -> None:
    """Forget every remembered prior (benchmarks time the estimate; tests start clean)."""
    with _lock:
        _priors.clear()
