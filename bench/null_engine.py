"""An engine that does no inference, to measure the pipeline's own cost (bench/overhead.py only)."""

from __future__ import annotations

import itertools

from schema.jobs import GenerationRequest, GenerationResult
from schema.settings import Settings
from worker.engines.base import GENERATE


class NullEngine:
    """Answers every request at once with a fixed one-token text."""

    name = "null"
    capabilities = frozenset({GENERATE})
    max_model_len = 2048
    max_num_seqs = 256

    def __init__(self, model: str, settings: Settings | None = None) -> None:
        self.model_name = model
        self._keys = itertools.count()
        self._done: list[tuple[str, GenerationResult]] = []

    def add(self, request: GenerationRequest) -> str:
        key = str(next(self._keys))
        self._done.append((key, GenerationResult(text="ok", prompt_tokens=1, completion_tokens=1)))
        return key

    def step(self) -> list[tuple[str, GenerationResult]]:
        done, self._done = self._done, []
        return done

    def has_unfinished(self) -> bool:
        return bool(self._done)

    def healthy(self) -> bool:
        return True

    def abort(self, keys: list[str]) -> None:
        self._done = [(k, r) for k, r in self._done if k not in set(keys)]

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return [GenerationResult(text="ok", prompt_tokens=1, completion_tokens=1) for _ in requests]

    def close(self) -> None:
        pass
