"""What an engine is: a small core every engine has, plus capabilities it declares.

A task kind's runner (worker/kinds) says which capabilities it needs; a worker records at start the
kinds its engine serves (`workers.kinds`), so a submission no live worker can serve is refused, and a
chunk of a kind this engine cannot run fails its items as `unsupported` instead of being retried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from schema.errors import ErrorCode
from schema.jobs import GenerationRequest, GenerationResult, Windows

if TYPE_CHECKING:  # worker.engines.labels imports the package that imports this module
    from worker.engines.labels import Choice, HeadScores, LabelLogprobs, LabelQuery

GENERATE = "generate"  # Generator: text from prompts, stepped so one thread keeps it busy across chunks
SCORE_LABELS = "score_labels"  # LabelScorer: label log-probabilities and guided choice after a prompt
CLASSIFY_HEAD = "classify_head"  # HeadClassifier: a sequence-classification model's own labels
EMBED = "embed"  # Embedder: one normalised vector per text
HIDDEN_STATES = "hidden_states"  # HiddenStates: one layer's output per text, for probes


class Engine(Protocol):
    """The core: a loaded model, one per worker process, loaded once."""

    name: str  # "vllm" or "transformers"
    model_name: str  # the registry name or path it was loaded from
    max_model_len: int  # prompt + completion tokens the engine accepts
    max_num_seqs: int  # sequences the engine runs at once
    capabilities: ClassVar[frozenset[str]]  # of GENERATE, SCORE_LABELS, CLASSIFY_HEAD, ...

    def healthy(self) -> bool:
        """False once the engine cannot make progress any more (its process died)."""
        ...

    def close(self) -> None:
        """Free the model and stop any engine process."""
        ...


class Generator(Engine, Protocol):
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run every request; one result per request, in order. A request that cannot run
        (prompt longer than the context, ...) gets a result with `error` set; the rest still run."""
        ...

    # Stepping, so one driver thread can keep the engine busy across chunks (worker.engine_loop).
    def add(self, request: GenerationRequest) -> str | GenerationResult:
        """Queue one request; returns its key, or at once the failure of a request that cannot run."""
        ...

    def step(self) -> list[tuple[str, GenerationResult]]:
        """Advance the queued requests; returns (key, result) of those that finished."""
        ...

    def has_unfinished(self) -> bool: ...

    def abort(self, keys: list[str]) -> None: ...


class LabelScorer(Engine, Protocol):
    """Call from the thread that steps the engine (EngineLoop.call)."""

    def label_logprobs(self, queries: list[LabelQuery]) -> list[LabelLogprobs]:
        """Each label's token log-probabilities as the continuation of its query's prompt, the prompt
        computed once per query, not once per label. A query that cannot run gets `error` set."""
        ...

    def choose(self, queries: list[LabelQuery]) -> list[Choice]:
        """Guided choice: greedy generation constrained to one of the query's labels."""
        ...

    def label_windows(self, query: Callable[[str], LabelQuery], text: str, windows: Windows) -> list[str] | None:
        """The windows of a text too long for the context (worker.engines.labels.query_windows)."""
        ...


class HeadClassifier(Engine, Protocol):
    head_labels: list[str]  # the model's labels, in its id2label order

    def classify_texts(self, texts: list[str]) -> list[HeadScores]:
        """A classification head's softmax over `head_labels` for each text."""
        ...

    def head_windows(self, text: str, windows: Windows) -> list[str] | None:
        """The windows of a text too long for the context (worker.engines.text_windows)."""
        ...


@dataclass
class Embedded:
    """One text's embedding (L2-normalised), or why it has none."""

    vector: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None
    error_code: ErrorCode = ErrorCode.engine_error


class Embedder(Engine, Protocol):
    """Call from the thread that owns the engine (EngineLoop.call)."""

    matryoshka: bool  # the model allows shorter vectors (a truncation, renormalised): OpenAI's `dimensions`

    def embed(self, texts: list[str]) -> list[Embedded]:
        """The pooled, normalised last hidden state of each text; a text too long for the context fails alone."""
        ...


class HiddenStates(Engine, Protocol):
    num_hidden_layers: int

    def hidden_states(self, texts: list[str], layer: int) -> list[Embedded]:
        """The output of layer `layer` (1 to num_hidden_layers) averaged over each text's tokens and
        L2-normalised; the same vectors from every engine of the model."""
        ...
