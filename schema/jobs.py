"""What an engine is asked to do and what it answers: the types both sides of the queue share."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schema.errors import ConfigError, ErrorCode


class ChatMessage(BaseModel):
    """One chat turn, as in the OpenAI chat-completions API."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ResponseFormat(BaseModel):
    """Structured output: any JSON object, one matching `json_schema` (OpenAI's response_format), or
    exactly one of `choice` (vLLM's structured_outputs.choice: classification through a chat request).
    Engines constrain decoding to it; the worker validates every answer against it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["json_object", "json_schema", "choice"]
    json_schema: dict[str, Any] | None = None  # the JSON schema itself (type json_schema)
    name: str | None = None
    choice: tuple[str, ...] | None = None  # the answers allowed (type choice)


class SamplingParams(BaseModel):
    """Sampling parameters every engine honours. Frozen: one object is shared by every item of a job."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_tokens: int = Field(default=256, ge=1, le=32768, description="most tokens generated per item (256)")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="sampling temperature (0: greedy)")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling (1.0)")
    stop: list[str] | None = Field(default=None, description="stop string (repeatable)",
                                   json_schema_extra={"cli": "append"})
    seed: int | None = Field(default=None, description="sampling seed")
    # Decoding constraint, as vLLM keeps structured outputs in its SamplingParams; set per line or kind.
    response_format: ResponseFormat | None = Field(default=None, json_schema_extra={"cli": "hidden"})
    # A prompt longer than the context (less max_tokens): cut its document, the last user message or the
    # raw prompt, by tokens (the instruction and chat template stay), keeping its head, its tail, or both
    # ends. None: the item fails with context_length_exceeded. vLLM's truncate_prompt_tokens sets both.
    truncate: Literal["head", "tail", "middle"] | None = Field(
        default=None, exclude_if=lambda v: v is None,
        description="a document too long for the context keeps its head, tail or both ends (middle cut) "
                    "instead of failing")
    truncate_to: int | None = Field(default=None, ge=1, exclude_if=lambda v: v is None,
                                    json_schema_extra={"cli": "hidden"})  # prompt tokens kept


class Windows(BaseModel):
    """A document longer than the context: split into token windows that overlap, each run with the item's
    instruction, and the windows' answers combined (map-reduce). What every kind that splits shares;
    classification combines by averaging the windows' label probabilities (schema.kinds.classify)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    long_documents: Literal["fail", "map-reduce"] = Field(
        default="fail", description="a document too long for the context fails (context_length_exceeded), or "
                                    "is split into windows whose answers are combined")
    window_tokens: int | None = Field(default=None, ge=32, description="document tokens per window (default: as "
                                                                      "many as fit with the instruction and max_tokens)")
    window_overlap: int = Field(default=64, ge=0, description="tokens neighbouring windows share (64; at most "
                                                               "half a window)")


class Windowing(Windows):
    """Map-reduce for generation and extraction: the windows' answers are combined by a reduce prompt,
    recursively when they are too long for one reduce. The document is the last user message or the raw
    prompt (see SamplingParams.truncate)."""

    reduce_prompt: str | None = Field(default=None, description="the instruction that combines the windows' "
                                                                "answers (default: a generic one, with the item's)")
    merge: Literal["prompt", "first", "concat"] = Field(
        default="prompt", description="extract: windows' answers combine by the reduce prompt, the first non-null "
                                      "value of each field, or lists concatenated")


class GenerationRequest(BaseModel):
    """One item to generate: chat messages (rendered with the model's chat template) or a raw prompt."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    sampling: SamplingParams = SamplingParams()
    # Map-reduce over windows for a document too long for the context (None: it fails); left out of the
    # request's JSON when None, so the requests, and their result-cache keys, of other batches stay as they were.
    windowing: Windowing | None = Field(default=None, exclude_if=lambda v: v is None)

    def document(self) -> str | None:
        """What truncation and windows cut: the last user message, or the raw prompt (the instruction, in
        system messages, and the chat template are never cut)."""
        if self.messages:
            users = [m for m in self.messages if m.role == "user"]
            return users[-1].content if users else None
        return self.prompt

    def with_document(self, text: str) -> GenerationRequest:
        """The request with its document replaced by `text`."""
        if not self.messages:
            return self.model_copy(update={"prompt": text})
        last = max(i for i, m in enumerate(self.messages) if m.role == "user")
        messages = [m.model_copy(update={"content": text}) if i == last else m for i, m in enumerate(self.messages)]
        return self.model_copy(update={"messages": messages})

    def with_windowing(self, windowing: Windowing) -> GenerationRequest:
        return self if windowing.long_documents == "fail" else self.model_copy(update={"windowing": windowing})


class GenerationResult(BaseModel):
    """An engine's answer to one request; `error` set means this item failed, the others did not."""

    text: str = ""
    finish_reason: Literal["stop", "length", "error"] = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_code: ErrorCode | None = None  # set with `error`
    truncated_tokens: int = 0  # tokens cut from the document to fit (SamplingParams.truncate)


_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> int:
    """A completion window such as "24h", "90m" or "3600s", in seconds."""
    number, unit = text[:-1], text[-1:].lower()
    if unit not in _WINDOW_UNITS or not number.isdigit() or int(number) <= 0:
        raise ConfigError(f"completion window {text!r} is not a positive number followed by s, m, h or d")
    return int(number) * _WINDOW_UNITS[unit]
