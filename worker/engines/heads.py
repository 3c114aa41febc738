"""Sequence-classification models ("heads"): how to recognise one and read its labels.

A Hugging Face folder whose config names a *ForSequenceClassification architecture and carries
`id2label` is run as a classifier: its own labels, its own softmax, no prompt.
"""

from __future__ import annotations

import json
from typing import Any

from schema.errors import ModelError
from worker.models import ModelSource

HEAD_SUFFIX = "ForSequenceClassification"


def head_config(source: ModelSource) -> dict[str, Any] | None:
    """The config of a sequence-classification model, or None for any other model."""
    if source.is_gguf:
        return None
    try:
        config = json.loads((source.folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of model '{source.name}': {exc}") from exc
    architectures = config.get("architectures") or []
    if any(str(a).endswith(HEAD_SUFFIX) for a in architectures) and config.get("id2label"):
        return config
    return None


def head_labels(config: dict[str, Any]) -> list[str]:
    """The labels in class-index order (id2label's keys are strings in config.json)."""
    id2label = {int(key): str(value) for key, value in config["id2label"].items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise ModelError(f"the model's id2label is not indexed 0..{len(id2label) - 1}: {sorted(id2label)}")
    labels = [id2label[index] for index in range(len(id2label))]
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise ModelError(f"the model's labels must be two or more distinct names, not {labels}")
    return labels


def model_head_labels(name: str) -> list[str] | None:
    """The labels of model `name` when it is a classification model this machine can see, else None."""
    from worker.models import resolve_model

    try:
        source = resolve_model(name)
    except ModelError:
        return None  # a model only the workers have: its lines must bring labels
    config = head_config(source)
    return head_labels(config) if config else None
