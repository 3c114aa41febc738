"""Checking a classification batch: how its answers spread over the labels, a warning when one label takes
nearly all of them while calibration is off, and its answers scored against gold labels (`gristmill
eval`): accuracy, macro-F1, per-label precision/recall/F1, the confusion matrix and the expected
calibration error, stored in `evaluations`; the latest is what `stats` and the dashboard show.

Only a batch's input lines count: a long text's windows have answers of their own (Item.parent_id).
Labels keep the batch's order everywhere, as lists: PostgreSQL's JSONB does not keep a mapping's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select, true
from sqlalchemy.orm import Session

from schema.db import epoch, utcnow
from schema.errors import GristmillError, InputError
from schema.lines import CustomId
from schema.reading import decode_line, read_lines, validate_as
from schema.tables import Batch, Classification, Evaluation, Item

LOPSIDED_SHARE = 0.9  # more of the answers than this on one label, uncalibrated: the warning
MIN_ANSWERS_TO_WARN = 20  # fewer answers than this say little about a bias
ECE_BINS = 10


def classify_params(batch: Batch) -> dict[str, Any]:
    params = batch.params or {}
    return params.get("classify", params)  # batches stored before task kinds kept it under "classify"


# --- what `stats` shows -------------------------------------------------------------------------


def summary(session: Session, batch: Batch) -> dict[str, Any]:
    """What a classification batch adds to its stats: answers per label, the warning, the latest evaluation."""
    params = classify_params(batch)
    counts = label_counts(session, batch)
    warning = None if params.get("multi_label") else calibration_warning(
        counts, params.get("calibrate", True), params.get("method", "score"))
    return {"label_counts": counts, "calibration_warning": warning, "evaluation": latest(session, batch.id)}


def label_counts(session: Session, batch: Batch) -> dict[str, int]:
    """Items per label (multi-label: the items each label applies to), the batch's labels first, in order."""
    params = classify_params(batch)
    if params.get("multi_label"):
        label = _json_elements(session, Classification.labels)
        query = select(label.c.value, func.count()).select_from(Classification).join(label, true())
    else:
        query = select(Classification.label, func.count())
    mine = query.join(Item, Item.id == Classification.item_id).where(
        Classification.batch_id == batch.id, Item.parent_id.is_(None))
    counts: dict[str, int] = dict(session.execute(mine.group_by(query.selected_columns[0])).all())
    order = [*(params.get("labels") or []), *sorted(counts, key=lambda name: -counts[name])]
    return {name: counts.get(name, 0) for name in dict.fromkeys(order)}


def _json_elements(session: Session, column: Any) -> Any:
    """A JSON array's elements as rows with a `value` column: each database names this its own way."""
    postgres = session.get_bind().dialect.name == "postgresql"
    return (func.jsonb_array_elements_text if postgres else func.json_each)(column).table_valued("value")


def calibration_warning(counts: dict[str, int], calibrate: bool, method: str) -> str | None:
    """One line when over 90% of at least 20 answers are one label while calibration is off: the model's
    leaning towards a label, which calibration corrects, may be what answers rather than the texts."""
    answers = sum(counts.values())
    if answers < MIN_ANSWERS_TO_WARN or (calibrate and method != "choice"):
        return None
    top = max(counts, key=lambda name: counts[name])
    if counts[top] / answers <= LOPSIDED_SHARE:
        return None
    hint = "try --method score, which calibrates" if method == "choice" else "try without --no-calibrate"
    return (f"{counts[top] / answers:.0%} of answers are {top!r} and calibration is off: the model's bias may be "
            f"deciding; {hint}")


def latest(session: Session, batch_id: str) -> dict[str, Any] | None:
    row = session.scalars(select(Evaluation).where(Evaluation.batch_id == batch_id)
                          .order_by(Evaluation.created_at.desc(), Evaluation.id.desc()).limit(1)).first()
    return None if row is None else as_dict(row)


def as_dict(row: Evaluation) -> dict[str, Any]:
    return {"gold_file": row.gold_file, "created_at": epoch(row.created_at), "matched": row.matched,
            "missing_gold": row.missing_gold, "unknown_ids": row.unknown_ids, "unanswered": row.unanswered,
            **row.metrics}


# --- metrics, pure --------------------------------------------------------------------------------


def reliability(confidences: list[float], outcomes: list[bool], bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Equal-width bins of confidence (the last includes 1.0): how many pairs fall in each, their mean
    confidence, and how often their outcome is true."""
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, confidence in enumerate(confidences):
        members[min(int(confidence * bins), bins - 1)].append(i)
    return [{"low": b / bins, "high": (b + 1) / bins, "count": len(m),
             "confidence": sum(confidences[i] for i in m) / len(m) if m else None,
             "accuracy": sum(outcomes[i] for i in m) / len(m) if m else None} for b, m in enumerate(members)]


def expected_calibration_error(confidences: list[float], outcomes: list[bool], bins: int = ECE_BINS) -> float:
    """The gap between confidence and accuracy, averaged over the bins weighted by their pairs (Guo et al. 2017)."""
    return sum(b["count"] / len(confidences) * abs(b["confidence"] - b["accuracy"])
               for b in reliability(confidences, outcomes, bins) if b["count"])


def single_label_metrics(gold: list[str], predicted: list[str], confidences: list[float],
                         labels: list[str]) -> dict[str, Any]:
    """`confidences`: each answer's probability of its predicted label. Macro-F1 averages the labels that
    occur in the gold or the answers (a label neither has has no F1 to speak of)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score  # a second to import: only here

    present = [label for label in labels if label in {*gold, *predicted}]
    outcomes = [g == p for g, p in zip(gold, predicted, strict=True)]
    return {"multi_label": False, "labels": labels, "accuracy": float(accuracy_score(gold, predicted)),
            "macro_f1": float(f1_score(gold, predicted, labels=present, average="macro", zero_division=0)),
            "ece": expected_calibration_error(confidences, outcomes),
            "per_label": _per_label(gold, predicted, labels),
            "confusion_matrix": confusion_matrix(gold, predicted, labels=labels).tolist(),  # gold rows
            "reliability": reliability(confidences, outcomes)}


def multi_label_metrics(gold: list[list[str]], predicted: list[list[str]], probabilities: list[dict[str, float]],
                        labels: list[str]) -> dict[str, Any]:
    """Accuracy is an exact match of the label sets; the ECE is over every (item, label) pair, each label's
    yes-probability against whether the gold has it; a confusion matrix per label: [[tn, fp], [fn, tp]]."""
    from sklearn.metrics import accuracy_score, f1_score, multilabel_confusion_matrix

    truth, guess = _indicators(gold, labels), _indicators(predicted, labels)
    present = [i for i, _ in enumerate(labels) if any(row[i] for row in truth + guess)]
    pairs = [(p[label], label in g) for g, p in zip(gold, probabilities, strict=True) for label in labels if label in p]
    confidences, outcomes = [c for c, _ in pairs], [o for _, o in pairs]
    return {"multi_label": True, "labels": labels, "accuracy": float(accuracy_score(truth, guess)),
            "macro_f1": float(f1_score(truth, guess, labels=present, average="macro", zero_division=0))
            if present else None,  # no label in any gold set nor answer
            "ece": expected_calibration_error(confidences, outcomes),
            "per_label": _per_label(truth, guess, list(range(len(labels))), labels),
            "confusion_matrix": multilabel_confusion_matrix(truth, guess).tolist(),
            "reliability": reliability(confidences, outcomes)}


def _indicators(sets: list[list[str]], labels: list[str]) -> list[list[int]]:
    return [[int(label in chosen) for label in labels] for chosen in sets]


def _per_label(gold: Any, predicted: Any, keys: list[Any], names: list[str] | None = None) -> list[dict[str, Any]]:
    from sklearn.metrics import precision_recall_fscore_support

    table = precision_recall_fscore_support(gold, predicted, labels=keys, zero_division=0)
    return [{"label": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names or keys, *table, strict=True)]


# --- gold labels ----------------------------------------------------------------------------------


class GoldLine(BaseModel):
    """{"custom_id" or "id", "label"}; multi-label: {"custom_id" or "id", "labels": [...]}."""

    model_config = ConfigDict(strict=True, extra="ignore")  # other columns (the text) may ride along
    custom_id: CustomId | None = None
    id: CustomId | None = None
    label: str | None = None
    labels: list[str] | None = None


def read_gold(path: str | Path, labels: list[str], multi_label: bool, max_line_bytes: int) -> dict[str, list[str]]:
    """Each id's gold labels (single-label: one); InputError names the file, line and field at fault."""
    try:
        with open(path, "rb") as stream:
            gold = _gold_lines(stream, str(path), labels, multi_label, max_line_bytes)
    except OSError as exc:
        raise InputError(str(path), None, None, f"cannot read the gold file: {exc.strerror}") from None
    if not gold:
        raise InputError(str(path), None, None, "the gold file has no lines")
    return gold


def _gold_lines(stream: BinaryIO, name: str, labels: list[str], multi_label: bool,
                max_line_bytes: int) -> dict[str, list[str]]:
    gold: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for lineno, raw in read_lines(stream, name, max_line_bytes):
        if not raw.strip():
            continue
        custom_id, answer = _gold_line(decode_line(raw, name, lineno), name, lineno, labels, multi_label)
        if (seen := first.setdefault(custom_id, lineno)) != lineno:
            raise InputError(name, lineno, "custom_id", f"duplicate id {custom_id!r}; first on line {seen}")
        gold[custom_id] = answer
    return gold


def _gold_line(obj: dict[str, Any], name: str, lineno: int, labels: list[str],
               multi_label: bool) -> tuple[str, list[str]]:
    line = validate_as(GoldLine, obj, name, lineno, "")
    custom_id = line.custom_id or line.id
    if custom_id is None:
        raise InputError(name, lineno, "custom_id", "required field is missing (give 'custom_id' or 'id')")
    field = "labels" if multi_label else "label"
    answer = line.labels if multi_label else None if line.label is None else [line.label]
    if answer is None:
        kind = "multi-label" if multi_label else "single-label"
        raise InputError(name, lineno, field, f"required field is missing (a {kind} batch's gold gives '{field}')")
    if unknown := [label for label in answer if label not in labels]:
        raise InputError(name, lineno, field, f"{unknown[0]!r} is not one of the batch's labels {labels}")
    return custom_id, answer


# --- a batch against its gold -----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    label: str
    labels: list[str] | None  # multi-label: those at or above the threshold
    probabilities: dict[str, float]


def evaluate(session: Session, batch: Batch, gold_path: str | Path, max_line_bytes: int) -> dict[str, Any]:
    """Score the batch's answers against the gold file and store the evaluation (the caller commits)."""
    if batch.kind != "classify":
        raise GristmillError(f"batch {batch.id} is a {batch.kind} batch; eval checks classification batches")
    answered, lines = answers(session, batch)
    labels, multi = label_order(batch, answered), bool(classify_params(batch).get("multi_label"))
    gold = read_gold(gold_path, labels, multi, max_line_bytes)
    matched = [custom_id for custom_id in gold if custom_id in answered]
    if not matched:
        raise GristmillError(f"no id of {gold_path} is an answered item of batch {batch.id} "
                             f"({len(gold.keys() - lines)} of {len(gold)} are not in the batch)")
    row = Evaluation(batch_id=batch.id, created_at=utcnow(), gold_file=str(gold_path), matched=len(matched),
                     missing_gold=len(lines - gold.keys()), unknown_ids=len(gold.keys() - lines),
                     unanswered=len((gold.keys() & lines) - answered.keys()),
                     metrics=score(gold, answered, matched, labels, multi))
    session.add(row)
    session.flush()
    return as_dict(row)


def score(gold: dict[str, list[str]], answered: dict[str, Answer], ids: list[str], labels: list[str],
          multi_label: bool) -> dict[str, Any]:
    mine = [answered[custom_id] for custom_id in ids]
    if multi_label:
        return multi_label_metrics([gold[i] for i in ids], [a.labels or [] for a in mine],
                                   [a.probabilities for a in mine], labels)
    return single_label_metrics([gold[i][0] for i in ids], [a.label for a in mine],
                                [a.probabilities[a.label] for a in mine], labels)


def answers(session: Session, batch: Batch) -> tuple[dict[str, Answer], set[str]]:
    """The answers by custom_id in input order, and every input line's custom_id."""
    rows = session.execute(
        select(Item.custom_id, Classification.label, Classification.labels, Classification.probabilities)
        .outerjoin(Classification, Classification.item_id == Item.id)
        .where(Item.batch_id == batch.id, Item.parent_id.is_(None)).order_by(Item.line)).all()
    answered = {r.custom_id: Answer(r.label, r.labels, r.probabilities) for r in rows if r.label is not None}
    return answered, {r.custom_id for r in rows}


def label_order(batch: Batch, answered: dict[str, Answer]) -> list[str]:
    """The batch's labels, then those of lines that brought their own (or a classification head's)."""
    order = dict.fromkeys(classify_params(batch).get("labels") or [])
    for answer in answered.values():
        order.update(dict.fromkeys(answer.probabilities))
    return list(order)
