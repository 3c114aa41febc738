"""Classification jobs: the job spec, label rules, the per-item request and what an item's answer is.

A classification item is stored in `items.request` as a ClassifyRequest (its text plus everything the
worker needs), so a worker can run it without reading the batch row, and a line that brings its own
labels simply carries them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schema.errors import InputError

CLASSIFY_ENDPOINT = "/v1/classify"  # gristmill's own: OpenAI's batch API has no classification endpoint
MAX_LABEL_CHARS = 200
MAX_LABELS = 200

# score: every label scored as a continuation of the prompt; choice: guided generation among the
# labels; head: the model is a sequence-classification model and scores its own labels.
Method = Literal["score", "choice"]
UsedMethod = Literal["score", "choice", "head"]


def check_labels(labels: list[str]) -> list[str]:
    """The labels as given, or ValueError saying what is wrong with them (a user reads this)."""
    if len(labels) < 2:
        raise ValueError(f"give at least two labels (got {len(labels)})")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels are supported (got {len(labels)})")
    seen: set[str] = set()
    for position, label in enumerate(labels, 1):
        if not isinstance(label, str):
            # ValueError, not TypeError: pydantic reports only ValueErrors as validation errors
            raise ValueError(f"label {position} is not a string (got {label!r})")  # noqa: TRY004
        if not label.strip():
            raise ValueError(f"label {position} is empty")
        if label != label.strip():
            raise ValueError(f"label {position} ({label!r}) has leading or trailing whitespace")
        if len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"label {position} is longer than {MAX_LABEL_CHARS} characters")
        if label in seen:
            raise ValueError(f"duplicate label {label!r}")
        seen.add(label)
    return labels


def split_labels(text: str) -> list[str]:
    """`positive,negative` -> ["positive", "negative"] (the CLI's --labels); spaces around commas go."""
    return [part.strip() for part in text.split(",")] if text.strip() else []


def load_labels_file(path: str | Path) -> list[str]:
    """Labels from a YAML (or JSON) file: a list of strings, or a mapping with a `labels` list.

    Raises InputError naming the file (and the line, when the YAML does not parse).
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(name, None, None, f"cannot read labels file: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(name, mark.line + 1 if mark else None, None,
                         f"labels file is not valid YAML: {problem}") from None
    labels = data.get("labels") if isinstance(data, dict) else data
    if not isinstance(labels, list):
        raise InputError(name, None, "labels", "expected a list of labels, or a mapping with a 'labels' list")
    try:
        return check_labels(labels)
    except ValueError as exc:
        hint = "" if all(isinstance(label, str) for label in labels) else (
            "; YAML reads unquoted yes/no/true/numbers as non-strings: quote such labels")
        raise InputError(name, None, "labels", f"{exc}{hint}") from None


class ClassifySpec(BaseModel):
    """A classification batch's parameters; each line may override `labels`."""

    model_config = ConfigDict(extra="forbid")
    labels: list[str] | None = None  # None only for a classification-head model, whose labels it knows
    instruction: str | None = None
    method: Method = "score"
    calibrate: bool = True
    multi_label: bool = False
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5

    @field_validator("labels")
    @classmethod
    def _valid_labels(cls, labels: list[str] | None) -> list[str] | None:
        return None if labels is None else check_labels(labels)

    @model_validator(mode="after")
    def _method_fits(self) -> ClassifySpec:
        if self.multi_label and self.method == "choice":
            raise ValueError("multi-label scores each label on its own: use method 'score', not 'choice'")
        return self

    @field_validator("instruction")
    @classmethod
    def _instruction_not_blank(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class ClassifyRequest(ClassifySpec):
    """One item: the text and the spec it runs under (the line's own labels already merged in)."""

    task: Literal["classify"] = "classify"
    text: str


def is_classify_request(request: dict[str, Any]) -> bool:
    return request.get("task") == "classify"


class Classification(BaseModel):
    """One item's answer: what the classifications table stores and exports write."""

    model_config = ConfigDict(extra="forbid")
    label: str  # the most probable label (multi-label: the most probable one, even under the threshold)
    labels: list[str] | None = None  # multi-label only: every label at or above the threshold
    probabilities: dict[str, float]  # sums to 1, except multi-label (one yes-probability per label)
    raw_probabilities: dict[str, float] | None = None  # before calibration; None for guided choice
    method: UsedMethod
    calibrated: bool
