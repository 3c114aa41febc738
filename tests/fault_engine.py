"""Fault injection for tests/test_faults.py: the real transformers engine, except that any engine step
holding a request that mentions POISON fails, as an engine does on an input it cannot handle."""

from __future__ import annotations

from schema.errors import EngineError
from schema.jobs import GenerationRequest, GenerationResult
from worker.engines.transformers_engine import TransformersEngine

MARKER = "POISON"


class PoisonableEngine(TransformersEngine):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._poisoned: set[str] = set()

    def add(self, request: GenerationRequest) -> str | GenerationResult:
        key = super().add(request)
        if isinstance(key, str) and any(MARKER in m.content for m in request.messages or []):
            self._poisoned.add(key)
        return key

    def step(self) -> list[tuple[str, GenerationResult]]:
        if self._poisoned & set(self._pending):
            raise EngineError("the engine cannot run this batch (injected fault)")
        return super().step()

    def abort(self, keys: list[str]) -> None:
        super().abort(keys)
        self._poisoned.difference_update(keys)
