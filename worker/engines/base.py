"""The one interface every inference engine implements."""

from __future__ import annotations

from typing import Protocol

from schema.jobs import GenerationRequest, GenerationResult


class Engine(Protocol):
    """A loaded model that runs a list of requests; one per worker process, loaded once."""

    name: str  # "vllm" or "transformers"
    model_name: str  # the registry name or path it was loaded from
    max_model_len: int  # prompt + completion tokens the engine accepts

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run every request; one result per request, in order. A request that cannot run
        (prompt longer than the context, ...) gets a result with `error` set; the rest still run."""
        ...

    # Stepping, so one driver thread can keep the engine busy across chunks (worker.engine_loop).
    max_num_seqs: int  # sequences the engine runs at once

    def add(self, request: GenerationRequest) -> str | GenerationResult:
        """Queue one request; returns its key, or at once the failure of a request that cannot run."""
        ...

    def step(self) -> list[tuple[str, GenerationResult]]:
        """Advance the queued requests; returns (key, result) of those that finished."""
        ...

    def has_unfinished(self) -> bool: ...

    def abort(self, keys: list[str]) -> None: ...

    def close(self) -> None:
        """Free the model and stop any engine process."""
        ...
