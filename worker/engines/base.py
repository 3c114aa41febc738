"""The one interface every inference engine implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from schema.jobs import GenerationRequest, GenerationResult

if TYPE_CHECKING:  # worker.engines.labels imports the package that imports this module
    from worker.engines.labels import Choice, HeadScores, LabelLogprobs, LabelQuery


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

    def healthy(self) -> bool:
        """False once the engine cannot make progress any more (its process died)."""
        ...

    def abort(self, keys: list[str]) -> None: ...

    # Classification (worker.classify). Call from the thread that steps the engine (EngineLoop.call).
    head_labels: list[str] | None  # a sequence-classification model's labels; None for a generative one

    def label_logprobs(self, queries: list[LabelQuery]) -> list[LabelLogprobs]:
        """Each label's token log-probabilities as the continuation of its query's prompt, the prompt
        computed once per query, not once per label. A query that cannot run gets `error` set."""
        ...

    def choose(self, queries: list[LabelQuery]) -> list[Choice]:
        """Guided choice: greedy generation constrained to one of the query's labels."""
        ...

    def classify_texts(self, texts: list[str]) -> list[HeadScores]:
        """A classification head's softmax over `head_labels` for each text."""
        ...

    def close(self) -> None:
        """Free the model and stop any engine process."""
        ...
