"""The registry of task kinds. A kind's contract is schema/kinds/<kind>.py, its execution
worker/kinds/<kind>.py; adding one means those two files and a line here and in worker/kinds."""

from __future__ import annotations

from schema.errors import ConfigError
from schema.kinds import classify, embed, extract, generate
from schema.kinds.base import Kind, Limits

KINDS: dict[str, Kind] = {kind.name: kind for kind in (generate.KIND, classify.KIND, extract.KIND, embed.KIND)}

__all__ = ["KINDS", "Kind", "Limits", "get"]


def get(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; use one of {', '.join(KINDS)}") from None
