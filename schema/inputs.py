"""Input files: detect the format, validate every line, turn each into a ParsedItem.

Two formats, detected from the first request line:
  * OpenAI Batch JSONL: {"custom_id", "method": "POST", "url", "body": {...}} (models in schema.lines);
  * simple JSONL: {"custom_id" or "id", "text"}; sampling and system prompt come from the caller.
The whole file is validated before anything is returned, so a batch is never half-enqueued: the first
problem raises InputError(path, line, field, message). A line that is valid but cannot run here (another
model, stream, n > 1) is not a file error: its ParsedItem carries `error` and the rest of the batch runs.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from schema.errors import ErrorCode, InputError
from schema.jobs import ChatMessage, GenerationRequest, SamplingParams
from schema.lines import (
    CHAT_URL,
    SUPPORTED_URLS,
    ChatBody,
    CompletionsBody,
    OpenAILine,
    RequestBody,
    SimpleLine,
)
from schema.reading import ParsedItem, decode_line, read_lines, validate_as

Format = Literal["openai", "simple"]


@dataclass(frozen=True, slots=True)
class _Job:
    """What every line of one file is parsed against."""

    name: str
    defaults: SamplingParams
    served_model: str
    system_prompt: str | None


def parse_input(path: str | Path, *, defaults: SamplingParams, served_model: str, max_line_bytes: int,
                max_items: int, system_prompt: str | None = None) -> list[ParsedItem]:
    """Parse and validate the input file at `path`; see parse_input_stream."""
    try:
        with open(path, "rb") as stream:
            return parse_input_stream(stream, str(path), defaults=defaults, served_model=served_model,
                                      max_line_bytes=max_line_bytes, max_items=max_items,
                                      system_prompt=system_prompt)
    except OSError as exc:  # missing, a directory, unreadable (InputError is no OSError)
        raise InputError(str(path), None, None, f"cannot read file: {exc.strerror or exc}") from exc


def parse_input_bytes(data: bytes, name: str, *, defaults: SamplingParams, served_model: str,
                      max_line_bytes: int, max_items: int,
                      system_prompt: str | None = None) -> list[ParsedItem]:
    """Parse and validate an input file held in memory; `name` is used in error messages."""
    return parse_input_stream(io.BytesIO(data), name, defaults=defaults, served_model=served_model,
                              max_line_bytes=max_line_bytes, max_items=max_items,
                              system_prompt=system_prompt)


def parse_input_stream(stream: BinaryIO, name: str, *, defaults: SamplingParams, served_model: str,
                       max_line_bytes: int, max_items: int,
                       system_prompt: str | None = None) -> list[ParsedItem]:
    """Parse and validate a binary stream of JSONL; one ParsedItem per non-blank line, in file order.
    Raises InputError for the first invalid line, for more than `max_items` requests, or for no requests."""
    return list(iter_input_stream(stream, name, defaults=defaults, served_model=served_model,
                                  max_line_bytes=max_line_bytes, max_items=max_items, system_prompt=system_prompt))


def iter_input_stream(stream: BinaryIO, name: str, *, defaults: SamplingParams, served_model: str,
                      max_line_bytes: int, max_items: int, system_prompt: str | None = None) -> Iterator[ParsedItem]:
    """parse_input_stream's items as they are read: memory holds one line and the custom_ids seen, and
    an InputError comes when its line is reached (a submission stores as it reads, in one transaction)."""
    job = _Job(name, defaults, served_model, system_prompt)
    read = 0
    head: ParsedItem | None = None  # the first item: its format and endpoint are the file's
    first_line: dict[str, int] = {}  # custom_id -> line it first appeared on
    fmt: Format | None = None
    for lineno, raw in read_lines(stream, name, max_line_bytes):
        if not raw.strip():
            continue
        if read == max_items:
            raise InputError(name, lineno, None, f"file has more than {max_items} requests; the limit is "
                                                 f"{max_items}")
        obj = decode_line(raw, name, lineno)
        fmt = fmt or ("openai" if _is_openai(obj) else "simple")
        _check_format(obj, fmt, name, lineno, head.line if head else lineno)
        item = _parse_openai(obj, lineno, job) if fmt == "openai" else _parse_simple(obj, lineno, job)
        head = head or item
        if item.endpoint != head.endpoint:  # as in OpenAI: a batch has one endpoint
            raise InputError(name, lineno, "url", f"url {item.endpoint!r} differs from {head.endpoint!r} "
                                                  f"on line {head.line}; one file holds one endpoint")
        first = first_line.setdefault(item.custom_id, lineno)
        if first != lineno:
            raise InputError(name, lineno, "custom_id",
                             f"duplicate custom_id {item.custom_id!r}; first used on line {first}")
        read += 1
        yield item
    if not read:
        raise InputError(name, None, None, "file has no requests")


def _is_openai(obj: dict[str, Any]) -> bool:
    # A simple line may carry its own "url" (where the text came from), so "text" outranks "url".
    return "body" in obj or ("url" in obj and "text" not in obj)


def _check_format(obj: dict[str, Any], fmt: Format, name: str, lineno: int, first: int) -> None:
    """Reject a line plainly in the other format; anything else is validated against the file's format."""
    is_simple = "text" in obj and "body" not in obj
    if (fmt == "openai" and is_simple) or (fmt == "simple" and _is_openai(obj)):
        this, other = ("simple", "OpenAI batch") if fmt == "openai" else ("OpenAI batch", "simple")
        raise InputError(name, lineno, None, f"line is in the {this} format, but the file is in the {other} "
                                             f"format (from line {first}); one file holds one format")


# --- lines to items -------------------------------------------------------------------------------


def _parse_openai(obj: dict[str, Any], lineno: int, job: _Job) -> ParsedItem:
    line = validate_as(OpenAILine, obj, job.name, lineno, "")
    if line.url not in SUPPORTED_URLS:
        hint = " (embedding lines take --task embed)" if line.url == "/v1/embeddings" else ""
        raise InputError(job.name, lineno, "url",
                         f"unsupported url {line.url!r}; supported: {', '.join(SUPPORTED_URLS)}{hint}")
    if line.url == CHAT_URL:
        chat = validate_as(ChatBody, line.body, job.name, lineno, "body")
        # "developer" is the newer name for "system"; engines' chat templates know only "system".
        messages = [ChatMessage(role="system" if m.role == "developer" else m.role, content=m.content)
                    for m in chat.messages]
        request = GenerationRequest(messages=messages, sampling=_sampling(job.defaults, chat))
        body: RequestBody = chat
    else:
        completion = validate_as(CompletionsBody, line.body, job.name, lineno, "body")
        request = GenerationRequest(prompt=completion.prompt, sampling=_sampling(job.defaults, completion))
        body = completion
    code, error = _runnable_error(body, job) or (None, None)
    return ParsedItem(lineno, line.custom_id, line.url, request, line.body, error, code)


def _parse_simple(obj: dict[str, Any], lineno: int, job: _Job) -> ParsedItem:
    line = validate_as(SimpleLine, obj, job.name, lineno, "")
    custom_id = line.custom_id or line.id
    if custom_id is None:
        raise InputError(job.name, lineno, "custom_id",
                         "required field is missing (give 'custom_id' or 'id')")
    system = [ChatMessage(role="system", content=job.system_prompt)] if job.system_prompt else []
    messages = [*system, ChatMessage(role="user", content=line.text)]
    request = GenerationRequest(messages=messages, sampling=job.defaults)
    return ParsedItem(lineno, custom_id, CHAT_URL, request, obj)


def _sampling(defaults: SamplingParams, body: RequestBody) -> SamplingParams:
    """The job's defaults, overridden by what the body sets (bounds already checked by the body model)."""
    return SamplingParams.model_validate({**defaults.model_dump(), **body.sampling_overrides()})


def _runnable_error(body: RequestBody, job: _Job) -> tuple[ErrorCode, str] | None:
    if body.model is not None and body.model != job.served_model:
        return ErrorCode.model_not_found, (f"model {body.model!r} is not served by this deployment (it serves "
                                           f"{job.served_model!r})")
    if body.stream:
        return ErrorCode.unsupported, "stream is not supported in batch jobs"
    if body.n is not None and body.n > 1:
        return ErrorCode.unsupported, f"n={body.n} is not supported: batch jobs return one choice per request"
    return None
