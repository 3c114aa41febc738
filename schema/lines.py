"""Pydantic models of one input line, in either format; schema.inputs turns them into ParsedItems.

Every model is strict: an input file is data from a client, and "0.5" or true silently becoming a
number would hide mistakes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from schema.jobs import ResponseFormat
from schema.structured import check_json_schema

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL)
MAX_CUSTOM_ID_CHARS = 512  # schema.tables: items.custom_id is String(512)

_STRICT = ConfigDict(strict=True, extra="ignore")

CustomId = Annotated[str, Field(min_length=1, max_length=MAX_CUSTOM_ID_CHARS)]
# The same bounds as SamplingParams (tests check they agree), restated so type checkers can read them.
MaxTokens = Annotated[int, Field(ge=1, le=32768)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # engines hand seeds to 64-bit RNGs
Choices = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2, max_length=1000)]


class InputMessage(BaseModel):
    """A chat message as clients send it: content is a string or a list of text parts."""

    model_config = _STRICT
    # "developer" is OpenAI's newer name for "system"; tool/function turns are not supported.
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in value):
            raise ValueError("content parts must be {'type': 'text', 'text': <string>}; "
                             "only text is supported")
        return "".join(p["text"] for p in value)


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: a named JSON schema the answer must match."""

    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=64)]
    schema_: dict[str, Any] = Field(alias="schema")  # `schema` would shadow a BaseModel attribute
    strict: bool | None = None
    description: str | None = None

    @field_validator("schema_")
    @classmethod
    def _is_a_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_json_schema(value)


class ResponseFormatBody(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON matching a schema."""

    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormatBody:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("give json_schema exactly when type is 'json_schema'")
        return self

    def to_format(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        schema = self.json_schema
        return ResponseFormat(type=self.type, json_schema=schema.schema_ if schema else None,
                              name=schema.name if schema else None)


class StructuredOutputsBody(BaseModel):
    """vLLM's structured_outputs extension of a request body; gristmill takes its `choice`: the answer is
    exactly one of these strings (classification through the OpenAI endpoints)."""

    model_config = ConfigDict(strict=True, extra="forbid")  # regex, grammar, ...: refused by name
    choice: Choices


class RequestBody(BaseModel):
    """Fields both endpoints share; unknown keys (logprobs, user, metadata, ...) are ignored."""

    model_config = _STRICT
    model: str | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: list[str] | None = None
    seed: Seed | None = None
    stream: bool | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    response_format: ResponseFormatBody | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_choice: Choices | None = None  # vLLM's name for structured_outputs.choice before 0.11
    # vLLM's extension: keep at most this many prompt tokens, cutting the document's start (-1: the context)
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> RequestBody:
        given = [f for f in ("response_format", "structured_outputs", "guided_choice") if getattr(self, f)]
        if len(given) > 1:
            raise ValueError(f"give one of {' and '.join(given)}")
        return self

    @field_validator("max_completion_tokens")
    @classmethod
    def _agrees_with_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and value != other:
            raise ValueError(f"conflicts with max_tokens ({other}); give one of them")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # OpenAI takes one stop string or a list

    def sampling_overrides(self) -> dict[str, Any]:
        """The SamplingParams fields this body sets (max_completion_tokens is max_tokens' new name)."""
        given = {
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
            "response_format": self._format(),
            **self._truncation(),
        }
        # null, like absent, means the job's default
        overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if overrides.get("stop") == []:
            overrides["stop"] = None  # an explicit [] clears the job's stop strings
        return overrides


    def _truncation(self) -> dict[str, Any]:
        """vLLM's truncate_prompt_tokens keeps the prompt's last tokens: the document's tail."""
        if self.truncate_prompt_tokens is None or self.truncate_prompt_tokens == 0:
            return {}
        return {"truncate": "tail", "truncate_to": self.truncate_prompt_tokens if self.truncate_prompt_tokens > 0 else None}

    def _format(self) -> ResponseFormat | None:
        choice = self.structured_outputs.choice if self.structured_outputs else self.guided_choice
        if choice is not None:
            return ResponseFormat(type="choice", choice=tuple(choice))
        return self.response_format.to_format() if self.response_format else None


class ChatBody(RequestBody):
    messages: Annotated[list[InputMessage], Field(min_length=1)]


class CompletionsBody(RequestBody):
    prompt: Annotated[str, Field(min_length=1)]  # one prompt; lists and token arrays are not supported


class OpenAILine(BaseModel):
    """One line of an OpenAI Batch input file; the body is validated separately, by endpoint."""

    model_config = _STRICT
    custom_id: CustomId
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


class SimpleLine(BaseModel):
    """One line of a simple input file: an id and a text; the job's parameters come from the caller."""

    model_config = _STRICT
    custom_id: CustomId | None = None
    id: CustomId | None = None
    text: Annotated[str, Field(min_length=1)]
