"""The registry of the task kinds' worker halves, by the kind name a batch records (schema.kinds)."""

from __future__ import annotations

from schema.errors import EngineError
from worker.kinds import classify, generate
from worker.kinds.base import Runner

RUNNERS: dict[str, Runner] = {runner.kind: runner for runner in (generate.RUNNER, classify.RUNNER)}


def runner_for(kind: str) -> Runner:
    try:
        return RUNNERS[kind]
    except KeyError:
        raise EngineError(f"this worker cannot run task kind {kind!r}; it runs {', '.join(RUNNERS)}") from None
