"""Submitting a classification batch: labels checked, every line validated, then stored and enqueued
exactly as a generation batch is (producer.submit), with kind "classify"."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError

from producer import submit
from schema.classify import ClassifySpec, Method
from schema.classify_inputs import parse_classify_input
from schema.db import upgrade
from schema.errors import InputError
from schema.inputs import ParsedItem
from schema.jobs import SamplingParams, parse_window
from schema.settings import Settings
from worker.engines.heads import model_head_labels


def classify_spec(labels: list[str] | None = None, *, instruction: str | None = None, method: Method = "score",
                  calibrate: bool = True, multi_label: bool = False, threshold: float = 0.5) -> ClassifySpec:
    """The job spec, or InputError naming what is wrong (fewer than two labels, a duplicate, ...)."""
    try:
        return ClassifySpec(labels=labels, instruction=instruction, method=method, calibrate=calibrate,
                            multi_label=multi_label, threshold=threshold)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "classify"
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        raise InputError(field, None, None, message) from None


def create_classify_batch(input_path: str | Path, settings: Settings, spec: ClassifySpec, *,
                          model: str | None = None, metadata: dict[str, Any] | None = None,
                          completion_window: str = "24h") -> str:
    """Parse, store and enqueue a classification batch; returns its id. Nothing is written on a bad
    file or bad labels (InputError)."""
    window_s = parse_window(completion_window)
    model = model or settings.model
    head = model_head_labels(model)  # a classification model visible here brings its own labels
    items = parse_classify_input(input_path, spec, max_line_bytes=settings.max_line_bytes,
                                 max_items=settings.max_items_per_batch, head_labels=head)
    upgrade(settings.database_url)
    batch_id = submit.new_batch_id()
    # ClassifyItem has ParsedItem's shape (line, custom_id, endpoint, request, body, error).
    submit._store(settings, batch_id, str(input_path), model, SamplingParams(), None, metadata or {},
                  cast(list[ParsedItem], items), window_s, kind="classify",
                  params={"classify": spec.model_dump()})
    submit._enqueue(settings, batch_id, model)
    return batch_id
