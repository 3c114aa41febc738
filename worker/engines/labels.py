"""What label scoring asks of an engine, and the token rules both engines share.

A label is scored as the continuation of a prompt (a chat, or plain text for models without a chat
template): log P(label tokens | prompt), the sum over its tokens, so "billing question" is scored on all
three of its tokens, not on its first. When one label's tokens start another's ("billing" / "billing
question") the shorter one is scored with the end-of-turn token after it: "billing" then means the
answer stops there, and the two labels are different events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from schema.errors import ErrorCode, ModelError
from schema.jobs import ChatMessage, GenerationRequest, Windows
from worker.engines import prompt_token_ids, text_windows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class LabelQuery:
    """Score every label as a continuation of the chat prompt `messages` (assistant turn opened), or of
    the plain-text `prompt` when one is given, there after `answer_prefix` (a space: " positive" is how
    a label follows "Answer:" in running text)."""

    messages: list[ChatMessage]
    labels: list[str]
    prompt: str | None = None
    answer_prefix: str = ""

    def request(self) -> GenerationRequest:
        """The prompt as a generation request, which both engines turn into the same token ids."""
        return GenerationRequest(prompt=self.prompt) if self.prompt is not None else \
            GenerationRequest(messages=self.messages)

    def continuations(self) -> list[str]:
        """The labels as the text that follows the prompt."""
        return [self.answer_prefix + label for label in self.labels]


@dataclass
class LabelLogprobs:
    """Per label, the log-probability of each of its tokens given the prompt and the tokens before it."""

    token_logprobs: list[list[float]] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None
    error_code: ErrorCode = ErrorCode.engine_error  # why, when `error` is set

    @property
    def totals(self) -> list[float]:
        return [sum(tokens) for tokens in self.token_logprobs]


@dataclass
class Choice:
    """Guided choice: the label the model generated, constrained to the labels."""

    label: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_code: ErrorCode = ErrorCode.engine_error


@dataclass
class HeadScores:
    """A classification head's softmax over its own labels (in the model's id2label order)."""

    probabilities: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None
    error_code: ErrorCode = ErrorCode.engine_error


@dataclass(frozen=True)
class Tokenized:
    """A query as token ids: the prompt, and each label's continuation."""

    prompt: list[int]
    continuations: list[list[int]]


def continuation_ids(tokenizer: PreTrainedTokenizerBase, labels: list[str], end_id: int) -> list[list[int]]:
    """Each label's token ids; a label that is a token prefix of another gets `end_id` appended."""
    ids = [list(tokenizer.encode(label, add_special_tokens=False)) for label in labels]
    return [seq + [end_id] if any(len(o) > len(seq) and o[: len(seq)] == seq for o in ids) else seq
            for seq in ids]


@dataclass(frozen=True)
class Refused:
    """Why a query cannot run."""

    code: ErrorCode
    message: str


def tokenize(tokenizer: PreTrainedTokenizerBase, query: LabelQuery, max_model_len: int) -> Tokenized | Refused:
    """The query's token ids, or why it cannot run (too long for the context, no chat template)."""
    try:
        prompt = prompt_token_ids(tokenizer, query.request())
    except ModelError as exc:
        return Refused(ErrorCode.invalid_request, str(exc))
    continuations = continuation_ids(tokenizer, query.continuations(), end_token_id(tokenizer))
    longest = max(len(c) for c in continuations)
    if len(prompt) + longest > max_model_len:
        return Refused(ErrorCode.context_length_exceeded, f"prompt is {len(prompt)} tokens and the longest label "
                                                           f"{longest}; the model's context is {max_model_len}")
    return Tokenized(prompt, continuations)


def query_windows(tokenizer: PreTrainedTokenizerBase, query: Callable[[str], LabelQuery], text: str,
                  windows: Windows, max_model_len: int) -> list[str] | None:
    """The windows of a text too long for the context: `query(window)` fits with room for the longest
    label (worker.engines.text_windows); None when the text fits whole."""
    longest = max(len(c) for c in continuation_ids(tokenizer, query("").continuations(), end_token_id(tokenizer)))
    return text_windows(tokenizer, lambda window: query(window).request(), text, longest,
                        windows, max_model_len)


def text_windows_alone(tokenizer: PreTrainedTokenizerBase, text: str, windows: Windows,
                       max_model_len: int) -> list[str] | None:
    """A classification head's windows: the text is the whole prompt, tokenized as it reads it."""
    return text_windows(tokenizer, lambda window: GenerationRequest(prompt=window), text, 0, windows, max_model_len)


def end_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an assistant turn (the chat template's end of turn is the tokenizer's EOS)."""
    if tokenizer.eos_token_id is None:
        raise ModelError("the model defines no end-of-sequence token")
    return int(tokenizer.eos_token_id)


def greedy_walk(continuations: list[list[int]], token_logprobs: list[list[float]]) -> int:
    """Guided choice from label scores: at each token take the likeliest token any remaining label
    allows (what constrained greedy decoding does); returns the index of the label reached."""
    alive = list(range(len(continuations)))
    depth = 0
    while len(alive) > 1:
        best = max(alive, key=lambda i: token_logprobs[i][depth])
        token = continuations[best][depth]
        alive = [i for i in alive if continuations[i][depth] == token]
        depth += 1
    return alive[0]


def split_runnable(tokenizer: PreTrainedTokenizerBase, queries: list[LabelQuery], max_model_len: int,
                   ) -> tuple[list[LabelLogprobs | None], list[tuple[int, Tokenized]]]:
    """One slot per query, already holding the failure of those that cannot run; and the runnable ones."""
    slots: list[LabelLogprobs | None] = [None] * len(queries)
    runnable: list[tuple[int, Tokenized]] = []
    for index, query in enumerate(queries):
        tokens = tokenize(tokenizer, query, max_model_len)
        if isinstance(tokens, Refused):
            slots[index] = LabelLogprobs(error=tokens.message, error_code=tokens.code)
        else:
            runnable.append((index, tokens))
    return slots, runnable
