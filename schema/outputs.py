"""Output lines, in OpenAI's Batch output format, so clients written for OpenAI read them unchanged.

A line is {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
"error": {"code", "message"} | null}; exactly one of response and error is set.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schema.lines import CHAT_URL, COMPLETIONS_URL

FinishReason = Literal["stop", "length"]


class _Out(BaseModel):
    # extra="forbid": an output line we write must be exactly the documented shape.
    model_config = ConfigDict(extra="forbid")


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # gristmill's extension, only when the document was cut to fit the context (OpenAI clients ignore it)
    truncated_tokens: int | None = Field(default=None, exclude_if=lambda v: v is None)


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Out):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class CompletionChoice(_Out):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletionBody(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int  # Unix seconds
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionBody(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int  # Unix seconds
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ResponseEnvelope(_Out):
    status_code: int = 200
    request_id: str
    body: Annotated[ChatCompletionBody | CompletionBody, Field(discriminator="object")]


class ErrorRecord(_Out):
    code: str  # e.g. "model_not_found", "invalid_request", "context_length_exceeded", "engine_error"
    message: str


class OutputLine(_Out):
    id: str  # "batch_req_..."
    custom_id: str
    response: ResponseEnvelope | None = None
    error: ErrorRecord | None = None

    @model_validator(mode="after")
    def _exactly_one_outcome(self) -> OutputLine:
        if (self.response is None) == (self.error is None):
            raise ValueError("an output line has exactly one of response and error")
        return self


def new_line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def success_line(custom_id: str, request_id: str, model: str, url: str, text: str,
                 finish_reason: FinishReason, prompt_tokens: int, completion_tokens: int, created: int,
                 line_id: str | None = None, truncated_tokens: int = 0) -> OutputLine:
    """A succeeded request: a chat.completion (CHAT_URL) or text_completion (COMPLETIONS_URL) body."""
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens, truncated_tokens=truncated_tokens or None)
    body: ChatCompletionBody | CompletionBody
    if url == CHAT_URL:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        body = ChatCompletionBody(id=f"chatcmpl-{request_id}", created=created, model=model,
                                  choices=[choice], usage=usage)
    elif url == COMPLETIONS_URL:
        body = CompletionBody(id=f"cmpl-{request_id}", created=created, model=model,
                              choices=[CompletionChoice(text=text, finish_reason=finish_reason)], usage=usage)
    else:
        raise ValueError(f"no output format for url {url!r}")
    response = ResponseEnvelope(request_id=request_id, body=body)
    return OutputLine(id=line_id or new_line_id(), custom_id=custom_id, response=response)


def error_line(custom_id: str, code: str, message: str, line_id: str | None = None) -> OutputLine:
    """A failed request: response null, error set."""
    return OutputLine(id=line_id or new_line_id(), custom_id=custom_id,
                      error=ErrorRecord(code=code, message=message))
