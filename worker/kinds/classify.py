"""Classification, the execution: label scoring (calibrated or not), guided choice, multi-label yes/no,
or a classification head, run on the thread that owns the engine; the answer becomes the item's result
(its label as the text) and a row of the classifications table, written in the same transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import numpy as np
from sqlalchemy.orm import Session

from schema import store
from schema.db import utcnow
from schema.errors import ErrorCode
from schema.jobs import Windows
from schema.kinds.classify import Classification, ClassifyRequest
from schema.tables import Classification as ClassificationRow
from worker.engines.base import (
    CLASSIFY_HEAD,
    HIDDEN_STATES,
    SCORE_LABELS,
    Engine,
    HeadClassifier,
    HiddenStates,
    LabelScorer,
)
from worker.engines.labels import LabelLogprobs, LabelQuery
from worker.kinds import calibration, classify_prompt, probe
from worker.kinds.base import Ran, Runner, bounded
from worker.runtime import Runtime


@dataclass
class ClassifyResult:
    """One request's answer, or its error; token counts for the timing statistics."""

    classification: Classification | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_code: ErrorCode = ErrorCode.engine_error  # why, when `error` is set


def classify(engine: Engine, requests: list[ClassifyRequest],
             probes: Mapping[str, probe.Trained] | None = None) -> list[ClassifyResult]:
    """One result per request, in order; a request that cannot run fails alone. `probes`: those the
    requests of method probe name, learned (worker.kinds.probe.trained)."""
    results: list[ClassifyResult | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(_route(engine, request), []).append(index)
    runners: dict[str, Callable[[Any, list[ClassifyRequest]], list[ClassifyResult]]] = {
        "head": _heads, "choice": _choices, "multi": _multi_label, "score": _scores, "unlabeled": _unlabeled,
        "probe": lambda e, r: _probes(e, r, probes or {}), "no_hidden_states": _no_hidden_states}
    for route, indices in groups.items():
        for index, result in zip(indices, runners[route](engine, [requests[i] for i in indices]), strict=True):
            results[index] = result
    return [r if r is not None else ClassifyResult(error="not run") for r in results]


def _route(engine: Engine, request: ClassifyRequest) -> str:
    if request.method == "probe":
        return "probe" if HIDDEN_STATES in engine.capabilities else "no_hidden_states"
    if CLASSIFY_HEAD in engine.capabilities:
        return "head"
    if request.labels is None:  # submission lets this through only for classification-head models
        return "unlabeled"
    if request.method == "choice":
        return "choice"
    return "multi" if request.multi_label else "score"


def _labels(request: ClassifyRequest) -> list[str]:
    assert request.labels is not None, "routed to _unlabeled"
    return request.labels


def _unlabeled(engine: Engine, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
    return [ClassifyResult(error=f"the request has no labels and {engine.model_name} is not a classification model",
                           error_code=ErrorCode.invalid_request) for _ in requests]


# --- label scoring ------------------------------------------------------------------------------


def _scores(engine: LabelScorer, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
    """Every label scored under each of the request's wordings; the wordings' probabilities (each
    calibrated on its own prior) averaged."""
    asked = [(r, wording) for r in requests for wording in classify_prompt.wordings(r)]
    queries = [classify_prompt.single_label(r, _labels(r), wording) for r, wording in asked]
    priors = {_single_key(engine, r, wording): (r, wording, None) for r, wording in asked if r.calibrate}
    scored = iter(_score_with_priors(engine, queries, priors))
    results = []
    for request in requests:
        parts = {wording: next(scored) for wording in classify_prompt.wordings(request)}
        tokens = sum(part.prompt_tokens for part in parts.values())
        if failed := next((part for part in parts.values() if part.error is not None), None):
            results.append(ClassifyResult(prompt_tokens=tokens, error=failed.error, error_code=failed.error_code))
            continue
        raws = {wording: calibration.normalise(part.totals) for wording, part in parts.items()}
        finals = [_calibrated(raw, _single_key(engine, request, wording)) for wording, raw in raws.items()] \
            if request.calibrate else list(raws.values())
        results.append(ClassifyResult(_answer(_labels(request), calibration.average(finals),
                                              calibration.average(list(raws.values())), "score", request.calibrate),
                                      tokens))
    return results


def _score_with_priors(engine: LabelScorer, queries: list[LabelQuery],
                       priors: Mapping[Hashable, tuple[ClassifyRequest, str, str | None]]) -> list[LabelLogprobs]:
    """The queries' label scores. The content-free queries of each prior not known yet ride along in the
    same engine call (no extra round trip), and their prior is remembered."""
    missing = {key: _content_free(request, wording, label) for key, (request, wording, label) in priors.items()
               if calibration.known(key) is None}
    extra = [query for content_free in missing.values() for query in content_free]
    scored = engine.label_logprobs(queries + extra)
    tail = iter(scored[len(queries):])
    for key, content_free in missing.items():
        calibration.remember(key, _prior([next(tail) for _ in content_free], len(content_free[0].labels)))
    return scored[: len(queries)]


def _content_free(request: ClassifyRequest, wording: str, label: str | None) -> list[LabelQuery]:
    """The request's prompt with each content-free text; `label`: the multi-label yes/no question."""
    labels = _labels(request)
    if label is None:
        return [classify_prompt.single_label(request, labels, wording, text) for text in classify_prompt.CONTENT_FREE]
    return [classify_prompt.yes_no(request, labels, label, wording, text) for text in classify_prompt.CONTENT_FREE]


def _prior(scored: list[LabelLogprobs], size: int) -> list[float]:
    usable = [calibration.normalise(s.totals) for s in scored if s.error is None]
    if not usable:  # only when the labels alone overflow the context: then nothing is divided out
        return [1.0 / size] * size
    return calibration.average(usable)


def _calibrated(raw: list[float], key: Hashable) -> list[float]:
    prior = calibration.known(key)
    return calibration.calibrate(raw, prior) if prior is not None else raw


def _single_key(engine: Engine, request: ClassifyRequest, wording: str) -> Hashable:
    return (engine.name, engine.model_name, "single", *_prompt_key(request, wording))


def _yes_no_key(engine: Engine, request: ClassifyRequest, wording: str, label: str) -> Hashable:
    return (engine.name, engine.model_name, "yes_no", *_prompt_key(request, wording), label)


def _prompt_key(request: ClassifyRequest, wording: str) -> tuple[Hashable, ...]:
    """What shapes a prompt apart from its text, and so the model's bias: the wording, the labels, the
    layout and template, and the few-shot examples."""
    examples = request.examples
    shots = hashlib.sha256(repr([(e.text, e.answers()) for e in examples]).encode()).hexdigest() if examples else None
    return wording, tuple(_labels(request)), request.layout, request.template, shots


def _answer(labels: list[str], final: list[float], raw: list[float] | None, method: str,
            calibrated: bool) -> Classification:
    best = max(range(len(labels)), key=lambda i: final[i])
    return Classification(label=labels[best], probabilities=dict(zip(labels, final, strict=True)),
                          raw_probabilities=dict(zip(labels, raw, strict=True)) if raw is not None else None,
                          method=method, calibrated=calibrated)  # type: ignore[arg-type]


# --- multi-label: each label on its own, yes or no --------------------------------------------


def _multi_label(engine: LabelScorer, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
    """Each label's yes against no, under each wording; P(yes) averaged over the wordings."""
    asked = [(r, label, wording) for r in requests for label in _labels(r) for wording in classify_prompt.wordings(r)]
    queries = [classify_prompt.yes_no(r, _labels(r), label, wording) for r, label, wording in asked]
    priors = {_yes_no_key(engine, r, wording, label): (r, wording, label) for r, label, wording in asked
              if r.calibrate}
    scored = iter(_score_with_priors(engine, queries, priors))
    results = []
    for request in requests:
        labels, wordings = _labels(request), classify_prompt.wordings(request)
        answers = {(label, wording): next(scored) for label in labels for wording in wordings}
        tokens = sum(a.prompt_tokens for a in answers.values())
        if failed := next((a for a in answers.values() if a.error is not None), None):
            results.append(ClassifyResult(prompt_tokens=tokens, error=failed.error, error_code=failed.error_code))
            continue
        raw = {key: calibration.normalise(a.totals)[0] for key, a in answers.items()}  # P(yes) against P(no)
        final = {(label, wording): _calibrated([p, 1.0 - p], _yes_no_key(engine, request, wording, label))[0]
                 if request.calibrate else p for (label, wording), p in raw.items()}
        answer = _answer(labels, calibration.average([[final[label, w] for label in labels] for w in wordings]),
                         calibration.average([[raw[label, w] for label in labels] for w in wordings]), "score",
                         request.calibrate)
        answer.labels = [label for label in labels if answer.probabilities[label] >= request.threshold]
        results.append(ClassifyResult(answer, tokens))
    return results


# --- guided choice and classification heads --------------------------------------------------


def _choices(engine: LabelScorer, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
    """Guided choice generates one label: under the request's first wording (an answer, not a probability,
    does not average)."""
    queries = [classify_prompt.single_label(r, _labels(r), classify_prompt.wordings(r)[0]) for r in requests]
    results = []
    for query, choice in zip(queries, engine.choose(queries), strict=True):
        if choice.label is None:
            results.append(ClassifyResult(prompt_tokens=choice.prompt_tokens, error=choice.error or "no label",
                                          error_code=choice.error_code))
            continue
        one_hot = [1.0 if label == choice.label else 0.0 for label in query.labels]  # no usable probability
        results.append(ClassifyResult(_answer(query.labels, one_hot, None, "choice", False),
                                      choice.prompt_tokens, choice.completion_tokens))
    return results


def _heads(engine: HeadClassifier, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
    labels = engine.head_labels
    results = []
    for request, scores in zip(requests, engine.classify_texts([r.text for r in requests]), strict=True):
        if scores.error is not None:
            results.append(ClassifyResult(prompt_tokens=scores.prompt_tokens, error=scores.error,
                                          error_code=scores.error_code))
        elif request.labels is not None and sorted(request.labels) != sorted(labels):
            results.append(ClassifyResult(error=f"the model classifies into {labels}, not {request.labels}",
                                          error_code=ErrorCode.invalid_request))
        elif request.multi_label:
            results.append(ClassifyResult(error_code=ErrorCode.unsupported,
                                          error="multi-label needs a generative model; this one is a "
                                                "single-label classifier"))
        else:
            results.append(ClassifyResult(_answer(labels, scores.probabilities, scores.probabilities, "head",
                                                  False), scores.prompt_tokens))
    return results


# --- probes: a classifier on hidden states -----------------------------------------------------


def _probes(engine: HiddenStates, requests: list[ClassifyRequest],
            probes: Mapping[str, probe.Trained]) -> list[ClassifyResult]:
    """Each probe's texts in one engine call (one forward pass each), then the probe's regression."""
    results: list[ClassifyResult] = [ClassifyResult() for _ in requests]
    by_probe: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        by_probe.setdefault(request.probe or "", []).append(index)
    for probe_id, indices in by_probe.items():
        learned = probes[probe_id]
        embedded = engine.hidden_states([requests[i].text for i in indices], learned.layer)
        read = [(i, e) for i, e in zip(indices, embedded, strict=True) if e.error is None]
        found = probe.apply(learned, np.array([e.vector for _, e in read])) if read else []
        for (index, e), p in zip(read, found, strict=True):
            answer = _answer(learned.labels, p, None, "probe", False)
            if learned.multi_label:
                answer.labels = [label for label, q in zip(learned.labels, p, strict=True)
                                 if q >= requests[index].threshold]
            results[index] = ClassifyResult(answer, e.prompt_tokens)
        for index, e in zip(indices, embedded, strict=True):
            if e.error is not None:
                results[index] = ClassifyResult(prompt_tokens=e.prompt_tokens, error=e.error, error_code=e.error_code)
    return results


def _no_hidden_states(engine: Engine, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
    return [ClassifyResult(error=f"the {engine.name} engine of {engine.model_name} gives no hidden states to a probe",
                           error_code=ErrorCode.unsupported) for _ in requests]


# --- the kind's runner --------------------------------------------------------------------------


@dataclass
class ClassifyOutcome(store.Outcome):
    """An outcome whose Result row holds the label; the classification itself goes to its own table."""

    classification: Classification | None = None


class Classify(Runner):
    kind = "classify"
    needs = (frozenset({SCORE_LABELS}), frozenset({CLASSIFY_HEAD}))  # a generative model, or a classifier

    def run(self, runtime: Runtime, claimed: list[store.Claimed]) -> Ran:
        """Classify the claimed items on the engine's own thread (vLLM's LLM is not thread-safe); a text
        too long for the context in a map-reduce batch splits into windows instead (schema.windows)."""
        requests = [ClassifyRequest.model_validate(c.request) for c in claimed]
        engine = runtime.engine
        learned = {r.probe: probe.trained(runtime, r.probe) for r in requests
                   if r.probe and _route(engine, r) == "probe"}  # learned first, by the first chunk that needs it

        def work() -> tuple[dict[int, list[str]], dict[int, ClassifyResult]]:
            splits = {i: texts for i, request in enumerate(requests) if (texts := _windows(engine, request))}
            rest = [i for i in range(len(requests)) if i not in splits]
            return splits, dict(zip(rest, classify(engine, [requests[i] for i in rest], learned), strict=True))

        started = utcnow()
        splits, results = bounded(runtime, runtime.loop.call(work))
        finished = utcnow()
        outcomes: list[store.Outcome] = [
            store.Outcome(item=c, windows=[_window(requests[i], text) for text in splits[i]]) if i in splits
            else _outcome(c, results[i]) for i, c in enumerate(claimed)]
        return outcomes, started, finished

    def stage(self, session: Session, batch_id: str, succeeded: list[store.Outcome], finished: datetime) -> None:
        """Insert the classifications of succeeded outcomes (a repeat of the chunk inserts nothing)."""
        rows = [{"item_id": o.item.id, "batch_id": batch_id, "custom_id": o.item.custom_id,
                 **o.classification.model_dump(), "created_at": finished}
                for o in succeeded if isinstance(o, ClassifyOutcome) and o.classification and o.error is None]
        if rows:
            store.insert_ignore(session, ClassificationRow, rows)


def _outcome(item: store.Claimed, r: ClassifyResult) -> ClassifyOutcome:
    return ClassifyOutcome(item=item, text=r.classification.text() if r.classification else "",
                           prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, error=r.error,
                           error_code=r.error_code, classification=r.classification)


def _windows(engine: Engine, request: ClassifyRequest) -> list[str] | None:
    """The windows of a text too long for the context, when its batch asks for map-reduce: each fits the
    engine's context within the prompt the text is classified in (a classification head reads it alone)."""
    route = _route(engine, request)
    if request.long.long_documents == "fail" or route in ("unlabeled", "probe", "no_hidden_states"):
        return None  # a probe's text longer than the context fails (its reading has no windows yet)
    if route == "head":
        return cast(HeadClassifier, engine).head_windows(request.text, request.long)
    labels = _labels(request)
    wording = max(classify_prompt.wordings(request), key=len)  # the longest question leaves the least room
    if request.multi_label:  # so does the longest yes/no question: its windows fit every label's
        longest = max(labels, key=len)
        return cast(LabelScorer, engine).label_windows(
            lambda text: classify_prompt.yes_no(request, labels, longest, wording, text), request.text, request.long)
    return cast(LabelScorer, engine).label_windows(
        lambda text: classify_prompt.single_label(request, labels, wording, text), request.text, request.long)


def _window(request: ClassifyRequest, text: str) -> dict[str, Any]:
    """A window's request: the item's, with the window's text; sized to fit, so it does not split again."""
    return request.model_copy(update={"text": text, "long": Windows()}).model_dump(mode="json")


RUNNER = Classify()
