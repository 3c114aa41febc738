"""The registry of the task kinds' worker halves, by the kind name a batch records (schema.kinds)."""

from __future__ import annotations

from worker.engines.base import Engine
from worker.kinds import classify, embed, extract, generate
from worker.kinds.base import Runner

RUNNERS: dict[str, Runner] = {runner.kind: runner for runner in (generate.RUNNER, classify.RUNNER, extract.RUNNER, embed.RUNNER)}


def served_kinds(engine: Engine) -> list[str]:
    """The task kinds this engine can run (what a worker records in `workers.kinds`)."""
    return [kind for kind, runner in RUNNERS.items() if runner.serves(engine)]


def runner_for(kind: str, engine: Engine) -> Runner | None:
    """The kind's runner, or None when this engine cannot run the kind."""
    runner = RUNNERS.get(kind)
    return runner if runner is not None and runner.serves(engine) else None
