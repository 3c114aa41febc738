"""Classification input files: JSONL lines {"custom_id" or "id", "text", "labels"?}, validated whole.

The same reading rules as generation inputs (schema.inputs: size limit, UTF-8, strict JSON, line numbers
in every error); a bad line raises InputError before anything is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schema.classify import CLASSIFY_ENDPOINT, ClassifyRequest, ClassifySpec, check_labels
from schema.errors import InputError
from schema.inputs import _decode, _read_lines, _validate  # the generation parser's reading rules
from schema.lines import CustomId


class ClassifyLine(BaseModel):
    """One input line of a classification batch; `labels` overrides the batch's labels for this line."""

    model_config = ConfigDict(strict=True, extra="ignore")  # as schema.lines: no silent coercion
    custom_id: CustomId | None = None
    id: CustomId | None = None
    text: Annotated[str, Field(min_length=1)]
    labels: list[str] | None = None

    @field_validator("labels")
    @classmethod
    def _valid_labels(cls, labels: list[str] | None) -> list[str] | None:
        return None if labels is None else check_labels(labels)


@dataclass(frozen=True, slots=True)
class ClassifyItem:
    """One validated line, ready to store."""

    line: int
    custom_id: str
    request: ClassifyRequest
    body: dict[str, Any]  # the line verbatim, for audit
    endpoint: str = CLASSIFY_ENDPOINT
    error: str | None = None  # as ParsedItem; every valid classification line can run


def parse_classify_input(path: str | Path, spec: ClassifySpec, *, max_line_bytes: int, max_items: int,
                         head_labels: list[str] | None = None) -> list[ClassifyItem]:
    """Every line of the file as a ClassifyItem; raises InputError for the first bad line.

    `head_labels`: the labels of a classification-head model, when the model is one; lines may then
    omit labels, and labels they give must be the model's.
    """
    name = str(path)
    items: list[ClassifyItem] = []
    first: dict[str, int] = {}  # custom_id -> line it first appeared on
    try:
        with open(path, "rb") as stream:
            for lineno, raw in _read_lines(stream, name, max_line_bytes):
                if not raw.strip():
                    continue
                if len(items) == max_items:
                    raise InputError(name, lineno, None, f"file has more than {max_items} requests; "
                                                         f"the limit is {max_items}")
                item = _item(_decode(raw, name, lineno), lineno, name, spec, head_labels)
                seen = first.setdefault(item.custom_id, lineno)
                if seen != lineno:
                    raise InputError(name, lineno, "custom_id",
                                     f"duplicate custom_id {item.custom_id!r}; first used on line {seen}")
                items.append(item)
    except OSError as exc:
        raise InputError(name, None, None, f"cannot read file: {exc.strerror or exc}") from exc
    if not items:
        raise InputError(name, None, None, "file has no requests")
    return items


def _item(obj: dict[str, Any], lineno: int, name: str, spec: ClassifySpec,
          head_labels: list[str] | None) -> ClassifyItem:
    if "body" in obj or ("url" in obj and "text" not in obj):
        raise InputError(name, lineno, None, "classification lines are {\"custom_id\" or \"id\", \"text\", "
                                             "\"labels\" (optional)}, not OpenAI batch requests")
    line = _validate(ClassifyLine, obj, name, lineno, "")
    custom_id = line.custom_id or line.id
    if custom_id is None:
        raise InputError(name, lineno, "custom_id", "required field is missing (give 'custom_id' or 'id')")
    labels = line.labels or spec.labels
    if head_labels is not None and labels is not None and sorted(labels) != sorted(head_labels):
        raise InputError(name, lineno, "labels", f"the model is a classifier with labels {head_labels}; "
                                                 f"labels {labels} differ")
    if labels is None and head_labels is None:
        raise InputError(name, lineno, "labels", "no labels: give them for the batch (--labels, "
                                                 "--labels-file) or on this line")
    request = ClassifyRequest(**{**spec.model_dump(), "labels": labels}, text=line.text)
    return ClassifyItem(lineno, custom_id, request, obj)
