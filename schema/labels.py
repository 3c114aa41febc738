"""Label rules of classification: what a label list may be, from the CLI or a YAML file."""

from __future__ import annotations

from pathlib import Path

import yaml

from schema.errors import InputError

MAX_LABEL_CHARS = 200
MAX_LABELS = 200


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
