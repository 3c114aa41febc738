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
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

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

Format = Literal["openai", "simple"]
_M = TypeVar("_M", bound=BaseModel)
_BOM = b"\xef\xbb\xbf"
_MAX_DEPTH = 64  # deeper JSON is no request, and can hit recursion limits when stored or re-encoded
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


@dataclass(frozen=True, slots=True)
class ParsedItem:
    """One request line, validated. `error` set: valid, but fails at once without reaching an engine."""

    line: int  # 1-based, blank lines included: the line an editor shows
    custom_id: str
    endpoint: str  # the kind's endpoint: CHAT_URL or COMPLETIONS_URL for generation (simple lines: chat)
    request: BaseModel  # what the worker runs, stored in items.request (generation: GenerationRequest)
    body: dict[str, Any]  # the OpenAI body, or the whole simple line, verbatim, for audit
    error: str | None = None
    error_code: ErrorCode | None = None  # set with `error`


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

    Raises InputError for the first invalid line, for more than `max_items` requests, or for no requests.
    Memory use is bounded by one line (`max_line_bytes`) plus the parsed items.
    """
    job = _Job(name, defaults, served_model, system_prompt)
    items: list[ParsedItem] = []
    first_line: dict[str, int] = {}  # custom_id -> line it first appeared on
    fmt: Format | None = None
    for lineno, raw in _read_lines(stream, name, max_line_bytes):
        if not raw.strip():
            continue
        if len(items) == max_items:
            raise InputError(name, lineno, None, f"file has more than {max_items} requests; the limit is "
                                                 f"{max_items}")
        obj = _decode(raw, name, lineno)
        fmt = fmt or ("openai" if _is_openai(obj) else "simple")
        _check_format(obj, fmt, name, lineno, items[0].line if items else lineno)
        item = _parse_openai(obj, lineno, job) if fmt == "openai" else _parse_simple(obj, lineno, job)
        if items and item.endpoint != items[0].endpoint:  # as in OpenAI: a batch has one endpoint
            raise InputError(name, lineno, "url", f"url {item.endpoint!r} differs from {items[0].endpoint!r} "
                                                  f"on line {items[0].line}; one file holds one endpoint")
        first = first_line.setdefault(item.custom_id, lineno)
        if first != lineno:
            raise InputError(name, lineno, "custom_id",
                             f"duplicate custom_id {item.custom_id!r}; first used on line {first}")
        items.append(item)
    if not items:
        raise InputError(name, None, None, "file has no requests")
    return items


# --- reading and decoding -------------------------------------------------------------------------


def _read_lines(stream: BinaryIO, name: str, limit: int) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its terminator); an over-long line raises before it is held."""
    lineno = 0
    while chunk := stream.readline(limit + 2):  # +2: room for the "\r\n" after a line of `limit` bytes
        lineno += 1
        line = chunk.removesuffix(b"\n").removesuffix(b"\r")
        if len(line) > limit:
            raise InputError(name, lineno, None,
                             f"line is {_line_length(stream, chunk)} bytes; the limit is {limit}")
        yield lineno, (line.removeprefix(_BOM) if lineno == 1 else line)


def _line_length(stream: BinaryIO, chunk: bytes) -> int:
    """Length, without terminator, of a line whose first `chunk` was read; consumes the rest of it."""
    total, tail = len(chunk), chunk
    while not tail.endswith(b"\n") and (more := stream.readline(1 << 20)):
        total, tail = total + len(more), tail[-1:] + more  # keep one byte: "\r\n" may span two reads
    return total - (len(tail) - len(tail.removesuffix(b"\n").removesuffix(b"\r")))


def _decode(raw: bytes, name: str, lineno: int) -> dict[str, Any]:
    """The line as a JSON object that can be stored as it is, or InputError saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(name, lineno, None, f"not valid UTF-8 (bad byte at offset {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise InputError(name, lineno, None, f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except _BadConstant as exc:
        raise InputError(name, lineno, None, f"not valid JSON: {exc}") from None
    except ValueError:  # only int() fails with a plain ValueError: past sys.get_int_max_str_digits()
        raise InputError(name, lineno, None, "not valid JSON: a number has too many digits") from None
    except RecursionError:
        raise InputError(name, lineno, None, "not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise InputError(name, lineno, None, f"not a JSON object (found {_JSON_TYPES[type(obj)]})")
    if _may_not_store(raw) and (problem := _storage_problem(obj)):
        raise InputError(name, lineno, None, problem)
    return obj


def _may_not_store(raw: bytes) -> bool:
    """Cheap pre-check: NUL and surrogates only arrive as backslash-u escapes; deep nesting needs brackets."""
    return b"\\u" in raw or raw.count(b"[") + raw.count(b"{") > _MAX_DEPTH


class _BadConstant(ValueError):
    pass


def _reject_constant(token: str) -> Any:
    raise _BadConstant(f"{token} is not a JSON number")  # Python's json takes NaN/Infinity; JSON does not


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e999: stored, it would become Infinity
        raise _BadConstant("a number is out of range")
    return value


def _storage_problem(value: Any) -> str | None:
    """Why a decoded line cannot be stored as JSON in SQL (NUL, lone surrogates, depth)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return "a string contains a NUL character (\\u0000), which cannot be stored"
            if not node.isascii() and not _encodable(node):
                return "a string contains an unpaired surrogate escape (\\ud800-\\udfff)"
        elif isinstance(node, (dict, list)):
            if depth > _MAX_DEPTH:
                return f"JSON is nested more than {_MAX_DEPTH} levels deep"
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    line = _validate(OpenAILine, obj, job.name, lineno, "")
    if line.url not in SUPPORTED_URLS:
        hint = " (embedding lines take --task embed)" if line.url == "/v1/embeddings" else ""
        raise InputError(job.name, lineno, "url",
                         f"unsupported url {line.url!r}; supported: {', '.join(SUPPORTED_URLS)}{hint}")
    if line.url == CHAT_URL:
        chat = _validate(ChatBody, line.body, job.name, lineno, "body")
        # "developer" is the newer name for "system"; engines' chat templates know only "system".
        messages = [ChatMessage(role="system" if m.role == "developer" else m.role, content=m.content)
                    for m in chat.messages]
        request = GenerationRequest(messages=messages, sampling=_sampling(job.defaults, chat))
        body: RequestBody = chat
    else:
        completion = _validate(CompletionsBody, line.body, job.name, lineno, "body")
        request = GenerationRequest(prompt=completion.prompt, sampling=_sampling(job.defaults, completion))
        body = completion
    code, error = _runnable_error(body, job) or (None, None)
    return ParsedItem(lineno, line.custom_id, line.url, request, line.body, error, code)


def _parse_simple(obj: dict[str, Any], lineno: int, job: _Job) -> ParsedItem:
    line = _validate(SimpleLine, obj, job.name, lineno, "")
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


# --- validation errors ----------------------------------------------------------------------------


def _validate(model: type[_M], data: Any, name: str, lineno: int, prefix: str) -> _M:
    """`model` validated from `data`; the first error becomes an InputError naming its field path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise InputError(name, lineno, _field_path(prefix, err["loc"]), _message(err)) from None


def _field_path(prefix: str, loc: tuple[int | str, ...]) -> str | None:
    """("messages", 1, "role") under "body" -> "body.messages[1].role"."""
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or None


def _message(err: ErrorDetails) -> str:
    if err["type"] == "missing":
        return "required field is missing"
    ctx = err.get("ctx") or {}
    msg = str(ctx["error"]) if err["type"] == "value_error" and "error" in ctx else err["msg"]
    return f"{msg} (got {_short(err['input'])})"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
