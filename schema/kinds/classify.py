"""Classification, the contract: lines {"custom_id" or "id", "text", "labels"?} in; one answer per line
out (a label and its probabilities), as JSONL or CSV with a probability column per label.

A classification item is stored in `items.request` as a ClassifyRequest (its text plus everything the
worker needs), so a worker runs it without reading the batch row, and a line that brings its own labels
simply carries them. The answer lands in the `classifications` table. The worker half is
worker/kinds/classify.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, BinaryIO, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from schema import probes
from schema.errors import InputError
from schema.jobs import Windows
from schema.kinds.base import ERROR_CODES, Kind, Limits, Stored, error_code
from schema.kinds.flags import FileFlags
from schema.labels import check_labels, load_labels_file
from schema.lines import CustomId
from schema.models import model_head_labels
from schema.outputs import ErrorRecord
from schema.reading import ParsedItem, read_items, validate_as
from schema.states import ItemStatus
from schema.store import insert_ignore
from schema.tables import Batch, Item, Result
from schema.tables import Classification as ClassificationRow
from schema.tables import Probe as ProbeRow

CLASSIFY_ENDPOINT = "/v1/classify"  # gristmill's own: OpenAI's batch API has no classification endpoint

# score: every label scored as a continuation of the prompt; choice: guided generation among the
# labels; probe: a classifier learned from labelled texts on the model's hidden states (schema.probes);
# head: the model is a sequence-classification model and scores its own labels.
Method = Literal["score", "choice", "probe"]
UsedMethod = Literal["score", "choice", "probe", "head"]
Layout = Literal["text-first", "question-first"]
Template = Literal["chat", "plain"]


class Example(BaseModel):
    """A labelled text for few-shot prompts: its `label`, or (multi-label) the `labels` that apply."""

    model_config = ConfigDict(strict=True, extra="ignore")  # an id or other columns may ride along
    text: Annotated[str, Field(min_length=1)]
    label: str | None = Field(default=None, exclude_if=lambda v: v is None)
    labels: list[str] | None = Field(default=None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _one_answer(self) -> Example:
        if (self.label is None) == (self.labels is None):
            raise ValueError('give "label" (or, for multi-label, "labels"), one of them')
        return self

    def answers(self) -> list[str]:
        return self.labels if self.labels is not None else [self.label or ""]


def check_examples(examples: list[Example], labels: list[str], multi_label: bool) -> None:
    """ValueError for an example with a label not in `labels`, or with `labels` in a single-label batch."""
    for example in examples:
        if example.labels is not None and not multi_label:
            raise ValueError(f"example {example.text[:40]!r} gives \"labels\": a single-label batch's examples give "
                             f"\"label\"")
        if unknown := [label for label in example.answers() if label not in labels]:
            raise ValueError(f"example {example.text[:40]!r} has label {unknown[0]!r}, not one of {labels}")


def choose_examples(examples: list[Example], labels: list[str], shots: int, multi_label: bool) -> list[Example]:
    """`shots` examples of each label, the same whatever order the file has (by a hash of the text), shown
    label after label in turn (a, b, a, b: no label always last); a multi-label example counts for each of
    its labels. Choosing again from the chosen gives them again. ValueError names an example whose label
    is not one of `labels`, or (single-label) a label no example has."""
    check_examples(examples, labels, multi_label)
    ranked = sorted(examples, key=lambda e: hashlib.sha256(e.text.encode()).hexdigest())
    per_label = {label: [e for e in ranked if label in e.answers()][:shots] for label in labels}
    if not multi_label and (missing := [label for label, chosen in per_label.items() if not chosen]):
        raise ValueError(f"no example has label {missing[0]!r}: a few-shot prompt shows every label")
    chosen: list[Example] = []
    for turn in range(shots):
        for label in labels:
            if turn < len(per_label[label]) and per_label[label][turn] not in chosen:
                chosen.append(per_label[label][turn])
    return chosen


class ClassifySpec(BaseModel):
    """A classification batch's parameters; each line may override `labels`."""

    model_config = ConfigDict(extra="forbid")
    # None only for a classification-head model, whose labels it knows
    labels: list[str] | None = Field(default=None, description="comma-separated labels, e.g. positive,negative")
    instruction: str | None = Field(default=None, description="the question asked about each text ({labels} "
                                                              "lists them); default: none, the text and "
                                                              "several answer cues, averaged")
    # How a prompt reads (chosen on two tasks' tuning halves by bench/zero_shot.py; worker/kinds/classify_prompt.py)
    layout: Layout = Field(default="question-first", exclude_if=lambda v: v == "question-first",
                           description="the question before the text (default), or after it: the prompts of "
                                       "one text then share it as a prefix, which vLLM computes once")
    template: Template = Field(default="chat",
                               description="the model's chat template (default with --instruction or "
                                           "--multi-label), or plain text (default otherwise)")
    method: Method = Field(default="score", description="score every label (default), guided generation of one, "
                                                        "or a probe learned from labelled texts (--train, --probe)")
    calibrate: bool = Field(default=True, description="raw label probabilities, without contextual calibration")
    multi_label: bool = Field(default=False, description="each label yes or no on its own")
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.5, description="with --multi-label: a label applies from here (0.5)")
    # Few-shot: the chosen examples (choose_examples) go before the text in every prompt, the same prefix
    # for every item, which the engine computes once. Left out of the JSON when unused, as `long`.
    examples: list[Example] | None = Field(
        default=None, exclude_if=lambda v: v is None, json_schema_extra={"cli": "jsonl"},
        description="a JSONL file of labelled texts {text, label}: --shots of each label go before every text")
    # 8, as plain text: on the default model, 100 even lines of amazon_sentiment.tsv (examples from the odd
    # ones), calibrated accuracy 0.84 zero-shot, 0.93 with 8 per label in plain text, 0.85 with 2, and 0.50
    # with 8 as chat turns, where nearly every answer became one label (bench/README.md, Classification)
    shots: Annotated[int, Field(ge=1, le=64)] = Field(default=8, exclude_if=lambda v: v == 8,
                                                      description="with --examples: examples per label (8)")
    # A probe: learned from `train` (at submission it becomes a probe row, and the items carry its id) or
    # one learned before, by id.
    train: list[Example] | None = Field(
        default=None, exclude_if=lambda v: v is None, json_schema_extra={"cli": "jsonl"},
        description="with --method probe: a JSONL file of labelled texts {text, label} to learn it from")
    probe: str | None = Field(default=None, exclude_if=lambda v: v is None,
                              description="with --method probe: the id of a probe learned before (gristmill probes)")
    layer: Annotated[int, Field(ge=1)] | None = Field(
        default=None, exclude_if=lambda v: v is None,
        description="with --method probe --train: the hidden layer it reads (default: the middle one)")
    # A text too long for the context: windows classified alone, their probabilities combined (combine).
    # Left out of the JSON when failing, so other batches' requests, and their cache keys, stay as they were.
    long: Windows = Field(default_factory=Windows, exclude_if=lambda v: v.long_documents == "fail")

    @field_validator("labels")
    @classmethod
    def _valid_labels(cls, labels: list[str] | None) -> list[str] | None:
        return None if labels is None else check_labels(labels)

    @model_validator(mode="after")
    def _method_fits(self) -> ClassifySpec:
        if self.multi_label and self.method == "choice":
            raise ValueError("multi-label scores each label on its own: use method 'score', not 'choice'")
        return self

    @model_validator(mode="after")
    def _probe_fits(self) -> ClassifySpec:
        if self.method != "probe":
            if (given := next((f for f in ("train", "probe", "layer") if getattr(self, f) is not None), None)):
                raise ValueError(f"{given} is for --method probe")
            return self
        if (self.train is None) == (self.probe is None):
            raise ValueError("a probe is learned from --train labelled.jsonl or reused by --probe ID: give one")
        if self.probe is not None and self.layer is not None:
            raise ValueError("a probe reads the layer it was learned on: --layer goes with --train")
        if self.examples is not None:
            raise ValueError("--examples are for prompts; a probe learns from --train")
        if self.train is not None:
            if self.labels is None:  # the labels the training set has, in order
                self.labels = check_labels(list(dict.fromkeys(a for example in self.train for a in example.answers())))
            check_examples(self.train, self.labels, self.multi_label)
        return self

    @model_validator(mode="after")
    def _examples_chosen(self) -> ClassifySpec:
        if self.examples is not None:
            if self.labels is None:
                raise ValueError("examples need the batch's labels (--labels)")
            self.examples = choose_examples(self.examples, self.labels, self.shots, self.multi_label)
        return self

    @model_validator(mode="after")
    def _default_template(self) -> ClassifySpec:
        if "template" not in self.model_fields_set:
            self.template = self._usual_template()
        return self

    def _usual_template(self) -> Template:
        """Plain text for examples (as chat turns they made the default model answer one label) and for a
        single-label batch without an instruction (worker/kinds/classify_prompt.py: the text and an answer
        cue); the chat template for a question."""
        if self.examples is not None or (self.instruction is None and not self.multi_label):
            return "plain"
        return "chat"

    @model_serializer(mode="wrap")
    def _template_when_it_differs(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """`template` is stored unless it is the usual one of its batch, so that an explicit choice survives
        validation again, and other batches' requests, and their cache keys, stay as they were."""
        data: dict[str, Any] = handler(self)
        if data.get("template") == self._usual_template():
            del data["template"]
        return data

    @field_validator("instruction")
    @classmethod
    def _instruction_not_blank(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class ClassifyRequest(ClassifySpec):
    """One item: the text and the spec it runs under (the line's own labels already merged in)."""

    task: Literal["classify"] = "classify"
    text: str


class Classification(BaseModel):
    """One item's answer: what the classifications table stores and exports write."""

    model_config = ConfigDict(extra="forbid")
    label: str  # the most probable label (multi-label: the most probable one, even under the threshold)
    labels: list[str] | None = None  # multi-label only: every label at or above the threshold
    probabilities: dict[str, float]  # sums to 1, except multi-label (one yes-probability per label)
    raw_probabilities: dict[str, float] | None = None  # before calibration; None for guided choice
    method: UsedMethod
    calibrated: bool

    def text(self) -> str:
        """The answer as the item's result text: its label, or its labels joined by commas (multi-label)."""
        return ",".join(self.labels) if self.labels is not None else self.label


def combine(parts: list[Classification], request: ClassifyRequest) -> Classification:
    """One answer for a text from its windows' answers: each label's probability averaged over the windows,
    or for multi-label its highest (a label applies to the text when it applies to any part of it)."""
    pool = max if request.multi_label else lambda values: sum(values) / len(values)

    def pooled(name: str) -> dict[str, float] | None:
        tables = [getattr(part, name) for part in parts]
        if any(table is None for table in tables):
            return None
        return {label: pool([table[label] for table in tables]) for label in tables[0]}

    probabilities = pooled("probabilities")
    assert probabilities is not None, "every answer has probabilities"
    label = max(probabilities, key=lambda name: probabilities[name])
    labels = [name for name, p in probabilities.items() if p >= request.threshold] if request.multi_label else None
    return Classification(label=label, labels=labels, probabilities=probabilities,
                          raw_probabilities=pooled("raw_probabilities"), method=parts[0].method,
                          calibrated=parts[0].calibrated)


# --- input --------------------------------------------------------------------------------------


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


def parse_classify_stream(stream: BinaryIO, name: str, spec: ClassifySpec, *, max_line_bytes: int,
                          max_items: int, head_labels: list[str] | None = None) -> Iterator[ParsedItem]:
    """Every line as a ParsedItem of a ClassifyRequest, as it is read; InputError for the first bad line.

    `head_labels`: the labels of a classification-head model, when the model is one; lines may then
    omit labels, and labels they give must be the model's.
    """
    return read_items(stream, name, max_line_bytes, max_items,
                      lambda obj, lineno: _item(obj, lineno, name, spec, head_labels))


def _item(obj: dict[str, Any], lineno: int, name: str, spec: ClassifySpec,
          head_labels: list[str] | None) -> ParsedItem:
    prefix = ""
    if "body" in obj or "url" in obj:  # a batch request's shape: {custom_id, method, url, body: {text, labels?}}
        if obj.get("url") != CLASSIFY_ENDPOINT:
            raise InputError(name, lineno, "url", f"a classification line's url is {CLASSIFY_ENDPOINT!r}, not "
                                                  f"{obj.get('url')!r} (or give {{custom_id|id, text, labels?}} alone)")
        if not isinstance(obj.get("body"), dict):
            raise InputError(name, lineno, "body", 'an object {"text", "labels" (optional)} is required')
        obj, prefix = {**obj["body"], "custom_id": obj.get("custom_id")}, "body"
    line = validate_as(ClassifyLine, obj, name, lineno, prefix)
    custom_id = line.custom_id or line.id
    if custom_id is None:
        raise InputError(name, lineno, "custom_id", "required field is missing (give 'custom_id' or 'id')")
    labels = line.labels or spec.labels
    if (spec.examples is not None or spec.method == "probe") and labels != spec.labels:
        raise InputError(name, lineno, "labels", "the batch's examples or probe are of its own labels; a line "
                                                 "cannot bring other labels")
    if head_labels is not None and labels is not None and sorted(labels) != sorted(head_labels):
        raise InputError(name, lineno, "labels", f"the model is a classifier with labels {head_labels}; "
                                                 f"labels {labels} differ")
    if labels is None and head_labels is None:
        raise InputError(name, lineno, "labels", "no labels: give them for the batch (--labels, "
                                                 "--labels-file) or on this line")
    request = ClassifyRequest(**{**spec.model_dump(), "labels": labels}, text=line.text)
    return ParsedItem(lineno, custom_id, CLASSIFY_ENDPOINT, request, obj)


# --- output -------------------------------------------------------------------------------------


class ClassifyOutputLine(BaseModel):
    """{"custom_id", "label", "labels", "probabilities", "raw_probabilities", "method", "calibrated",
    "error"}: a failed item has `error` set and the rest null. `probabilities` sum to 1 over the labels,
    except for multi-label batches, where each label has its own yes-probability and `labels` lists
    those at or above the threshold."""

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


BASE_COLUMNS = ["custom_id", "status", "label", "labels", "method", "calibrated"]
END_COLUMNS = ["error_code", "error"]
PROBABILITY_PREFIX = "p_"


class Classify(Kind):
    name = "classify"
    version = 2  # 2: a batch without an instruction asks answer cues in plain text (worker/kinds/classify_prompt.py)
    spec_model = ClassifySpec
    summary = "a label and its probabilities per line {custom_id|id, text, labels?}"
    answer_tables = (Result, ClassificationRow)
    file_flags: ClassVar[FileFlags] = {"labels": load_labels_file}

    def parse(self, stream: BinaryIO, name: str, spec: ClassifySpec, limits: Limits) -> Iterator[ParsedItem]:
        head = model_head_labels(limits.model)  # a classification model visible here brings its own labels
        return parse_classify_stream(stream, name, spec, max_line_bytes=limits.max_line_bytes,
                                     max_items=limits.max_items, head_labels=head)

    def rows(self, session: Session, batch: Batch) -> Iterator[Row[Any]]:
        stmt = (
            select(Item.custom_id, Item.status, Item.last_error, Item.error_code, ClassificationRow.label,
                   ClassificationRow.labels,
                   ClassificationRow.probabilities, ClassificationRow.raw_probabilities, ClassificationRow.method,
                   ClassificationRow.calibrated)
            .outerjoin(ClassificationRow, ClassificationRow.item_id == Item.id)
            .where(Item.batch_id == batch.id, Item.parent_id.is_(None))  # input lines, not their windows
            .order_by(Item.line)
            .execution_options(yield_per=2000)
        )
        yield from session.execute(stmt)  # type: ignore[misc]  # a typed Row is a Row

    def prepare(self, session: Session, spec: ClassifySpec, model: str, now: datetime) -> tuple[ClassifySpec, list[Stored]]:
        """A probe batch: its training set becomes a probe row (the items carry its id), or the probe it
        names is checked and lends its labels (schema.probes)."""
        if spec.method != "probe":
            return spec, []
        if spec.train is None:
            return probes.reused(session, spec, model), []
        row = probes.new_probe(spec, model, now)
        return spec.model_copy(update={"train": None, "probe": row["id"]}), [Stored(ProbeRow, row)]

    def answer_from_windows(self, session: Session, document: Item, now: datetime) -> str:
        """A long text's classification: its windows' combined, stored as any item's."""
        parts = session.scalars(select(ClassificationRow).join(Item, Item.id == ClassificationRow.item_id)
                                .where(Item.parent_id == document.id, Item.round == document.round)
                                .order_by(Item.window)).all()
        answer = combine([Classification.model_validate(part, from_attributes=True) for part in parts],
                         ClassifyRequest.model_validate(document.request))
        insert_ignore(session, ClassificationRow, [{"item_id": document.id, "batch_id": document.batch_id,
                                                    "custom_id": document.custom_id, **answer.model_dump(),
                                                    "created_at": now}])
        return answer.text()

    def line(self, row: Row[Any], batch: Batch) -> ClassifyOutputLine | None:
        if row.status == ItemStatus.succeeded and row.label is not None:
            result = Classification(label=row.label, labels=row.labels, probabilities=row.probabilities,
                                    raw_probabilities=row.raw_probabilities, method=row.method,
                                    calibrated=row.calibrated)
            return ClassifyOutputLine(custom_id=row.custom_id, **result.model_dump())
        if row.status in ERROR_CODES:
            error = ErrorRecord(code=error_code(row), message=row.last_error or str(row.status))
            return ClassifyOutputLine(custom_id=row.custom_id, error=error)
        return None

    def csv_columns(self, session: Session, batch: Batch) -> list[str]:
        """A probability column per label, in order of first appearance: the batch's, then lines' own."""
        params = batch.params or {}
        params = params.get("classify", params)  # batches stored before task kinds kept it under "classify"
        labels: dict[str, None] = dict.fromkeys(params.get("labels") or [])
        stmt = select(ClassificationRow.probabilities).where(ClassificationRow.batch_id == batch.id)
        for (probabilities,) in session.execute(stmt.execution_options(yield_per=5000)):
            labels.update(dict.fromkeys(probabilities))
        return [*BASE_COLUMNS, *(PROBABILITY_PREFIX + label for label in labels), *END_COLUMNS]

    def csv_row(self, row: Row[Any], line: BaseModel) -> dict[str, Any]:
        assert isinstance(line, ClassifyOutputLine)
        probabilities = {PROBABILITY_PREFIX + k: v for k, v in (line.probabilities or {}).items()}
        return {
            "custom_id": line.custom_id, "status": str(row.status), "label": line.label or "",
            "labels": json.dumps(line.labels) if line.labels is not None else "", "method": line.method or "",
            "calibrated": "" if line.calibrated is None else str(line.calibrated).lower(), **probabilities,
            "error_code": line.error.code if line.error else "", "error": line.error.message if line.error else "",
        }


KIND = Classify()
