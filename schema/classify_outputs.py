"""Output lines of a classification batch: one JSON object per input line, in input order.

{"custom_id", "label", "labels", "probabilities", "raw_probabilities", "method", "calibrated", "error"}:
a failed item has `error` set and the rest null. `probabilities` sum to 1 over the labels, except for
multi-label batches, where each label has its own yes-probability and `labels` lists those at or
above the threshold.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from schema.classify import Classification, UsedMethod
from schema.outputs import ErrorRecord


class ClassifyOutputLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    custom_id: str
    label: str | None = None
    labels: list[str] | None = None
    probabilities: dict[str, float] | None = None
    raw_probabilities: dict[str, float] | None = None
    method: UsedMethod | None = None
    calibrated: bool | None = None
    error: ErrorRecord | None = None

    @model_validator(mode="after")
    def _exactly_one_outcome(self) -> ClassifyOutputLine:
        if (self.label is None) == (self.error is None):
            raise ValueError("a classification line has exactly one of label and error")
        if self.label is not None and (self.probabilities is None or self.label not in self.probabilities):
            raise ValueError("a classified line has a probability for its label")
        return self


def classified_line(custom_id: str, result: Classification) -> ClassifyOutputLine:
    return ClassifyOutputLine(custom_id=custom_id, **result.model_dump())


def failed_line(custom_id: str, code: str, message: str) -> ClassifyOutputLine:
    return ClassifyOutputLine(custom_id=custom_id, error=ErrorRecord(code=code, message=message))
