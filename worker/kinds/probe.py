"""Probes, the execution: a logistic regression on one hidden layer's output, averaged over a text's tokens
and normalised (the engine's `hidden_states`). The first worker that needs a probe learns it from the
training set in its row (schema.probes) and stores the weights there; applying it is one forward pass
per text, with no label tokens to score.

Learning: the vectors standardised, then scikit-learn's LogisticRegressionCV choosing the L2 strength by
cross-validated accuracy (stratified folds); multi-label: one yes/no regression per label.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from sqlalchemy import update

from schema.db import utcnow
from schema.errors import EngineError
from schema.tables import Probe
from worker.engines.base import HiddenStates
from worker.kinds.base import bounded
from worker.runtime import Runtime, sessions

log = logging.getLogger(__name__)

VERSION = 1  # of the weights' format: a probe stored in another is learned again
FOLDS = 5
STRENGTHS = 10  # values of C tried, log-spaced from 1e-4 to 1e4


@dataclass(frozen=True)
class Trained:
    """A learned probe, as a worker applies it."""

    id: str
    layer: int
    labels: list[str]
    multi_label: bool
    weights: dict[str, Any]


_learned: dict[tuple[str, str], Trained] = {}  # (database, id): a probe never changes once learned


def trained(runtime: Runtime, probe_id: str) -> Trained:
    """The probe, learned now (on this worker's engine) when no worker has yet."""
    key = (runtime.settings.database_url, probe_id)
    if key in _learned:
        return _learned[key]
    with sessions(runtime)() as session:
        probe = session.get(Probe, probe_id)
        if probe is None:
            raise EngineError(f"probe {probe_id} is not in the database")
        if probe.version != VERSION:
            _learn(runtime, session, probe)
            session.refresh(probe)
        result = Trained(probe.id, int(probe.layer or 0), probe.labels, probe.multi_label, probe.weights or {})
    _learned[key] = result
    return result


def _learn(runtime: Runtime, session: Any, probe: Probe) -> None:
    engine = cast(HiddenStates, runtime.engine)
    layer = probe.layer or max(engine.num_hidden_layers // 2, 1)
    texts = [example["text"] for example in probe.training]
    started = time.perf_counter()
    embedded = bounded(runtime, runtime.loop.call(lambda: engine.hidden_states(texts, layer)))
    if failed := next((e for e in embedded if e.error), None):
        raise EngineError(f"probe {probe.id}: a training text cannot be read: {failed.error}")
    answers = [example["labels"] if "labels" in example else [example["label"]] for example in probe.training]
    weights, metrics = fit(np.array([e.vector for e in embedded]), answers, probe.labels, probe.multi_label)
    metrics.update(layer=layer, seconds=round(time.perf_counter() - started, 3))
    # Two workers may learn it at once: the same data gives the same weights, and the first write stays.
    session.execute(update(Probe).where(Probe.id == probe.id, Probe.version.is_distinct_from(VERSION)).values(
        layer=layer, weights=weights, metrics=metrics, version=VERSION, trained_at=utcnow(), trained_by=runtime.host))
    session.commit()
    log.info("probe %s learned from %d texts at layer %d: cross-validated accuracy %.3f", probe.id, len(texts),
             layer, metrics["cv_accuracy"])


def fit(vectors: np.ndarray, answers: list[list[str]], labels: list[str],
        multi_label: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The weights (scaler and regressions) and the training metrics."""
    mean, scale = vectors.mean(0), vectors.std(0) + 1e-6
    x = (vectors - mean) / scale
    targets = ([np.array([label in a for a in answers], dtype=int) for label in labels] if multi_label
               else [np.array([labels.index(a[0]) for a in answers])])
    heads, scores, strengths = [], [], []
    for y in targets:
        head, score, strength = _regression(x, y)
        heads.append(head)
        scores.append(score)
        strengths.append(strength)
    counts = {label: sum(label in a for a in answers) for label in labels}
    metrics = {"cv_accuracy": float(np.mean(scores)), "C": strengths if multi_label else strengths[0],
               "examples": len(answers), "per_label": counts, "dimensions": int(vectors.shape[1])}
    return {"mean": mean.tolist(), "scale": scale.tolist(), "heads": heads}, metrics


def _regression(x: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], float, float | None]:
    """One regression: its coefficients, intercepts and classes, the cross-validated accuracy, the strength."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    classes, counts = np.unique(y, return_counts=True)
    if len(classes) == 1:  # a multi-label label that every example has, or none: a constant answer
        return {"classes": classes.tolist(), "coef": [], "intercept": []}, 1.0, None
    folds = int(min(FOLDS, counts.min()))
    if folds < 2:  # a label with a single example: no cross-validation, the default strength
        model: Any = LogisticRegression(max_iter=2000).fit(x, y)
        score, strength = float(model.score(x, y)), 1.0
    else:
        model = LogisticRegressionCV(Cs=STRENGTHS, cv=StratifiedKFold(folds, shuffle=True, random_state=0),
                                     max_iter=2000).fit(x, y)
        strength = float(np.ravel(model.C_)[0])
        score = float(np.max(np.mean(next(iter(model.scores_.values())), axis=0)))
    return ({"classes": model.classes_.tolist(), "coef": model.coef_.tolist(), "intercept": model.intercept_.tolist()},
            score, strength)


def apply(probe: Trained, vectors: np.ndarray) -> list[list[float]]:
    """Per vector, the probability of each of the probe's labels (multi-label: each one's yes)."""
    x = (vectors - np.array(probe.weights["mean"])) / np.array(probe.weights["scale"])
    columns = [_probabilities(head, x) for head in probe.weights["heads"]]
    if probe.multi_label:  # each head: the classes no (0) and yes (1)
        return np.stack([c[:, -1] if len(c[0]) == 2 else np.full(len(x), float(h["classes"][0]))
                         for c, h in zip(columns, probe.weights["heads"], strict=True)], axis=1).tolist()
    full = np.zeros((len(x), len(probe.labels)))  # a label the training set never had: probability 0
    full[:, probe.weights["heads"][0]["classes"]] = columns[0]
    return full.tolist()


def _probabilities(head: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """The head's probability of each of its classes, as scikit-learn's predict_proba gives them."""
    if not head["coef"]:
        return np.ones((len(x), 1))
    z = x @ np.array(head["coef"]).T + np.array(head["intercept"])
    if z.shape[1] == 1:  # binary: one logit for the second class
        p = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.stack([1.0 - p, p], axis=1)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))
