"""Reading an input stream, the rules every task kind shares: lines bounded in size before they are held,
strict JSON objects that SQL can store, pydantic validation whose first error names its file, line and
field. `read_items` is the whole loop for a kind whose lines are items one by one (schema/kinds)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import msgspec
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from schema.errors import ErrorCode, InputError

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



def read_items(stream: BinaryIO, name: str, max_line_bytes: int, max_items: int,
               make_item: Callable[[dict[str, Any], int], ParsedItem]) -> Iterator[ParsedItem]:
    """Every non-blank line decoded and made into an item by `make_item(obj, line)`, as it is read;
    InputError when a bad line, a duplicate custom_id or the item past `max_items` is reached, or at
    the end when there was none. (A caller that stores while it reads does so in one transaction.)"""
    count = 0
    first: dict[str, int] = {}  # custom_id -> line it first appeared on
    for lineno, raw in read_lines(stream, name, max_line_bytes):
        if not raw.strip():
            continue
        if count == max_items:
            raise InputError(name, lineno, None, f"file has more than {max_items} requests; the limit is {max_items}")
        item = make_item(decode_line(raw, name, lineno), lineno)
        seen = first.setdefault(item.custom_id, lineno)
        if seen != lineno:
            raise InputError(name, lineno, "custom_id", f"duplicate custom_id {item.custom_id!r}; first used on "
                                                        f"line {seen}")
        count += 1
        yield item
    if not count:
        raise InputError(name, None, None, "file has no requests")


# --- reading and decoding -------------------------------------------------------------------------


def read_lines(stream: BinaryIO, name: str, limit: int) -> Iterator[tuple[int, bytes]]:
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


def decode_line(raw: bytes, name: str, lineno: int) -> dict[str, Any]:
    """The line as a JSON object that can be stored as it is, or InputError saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(name, lineno, None, f"not valid UTF-8 (bad byte at offset {exc.start})") from None
    try:
        # msgspec decodes 10x faster and accepts only what json.loads below accepts (strict JSON, finite
        # numbers, integers of at most 4,300 digits); what it refuses goes to json.loads, whose message
        # names the problem, or which takes it (a lone surrogate escape, refused further down).
        obj = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        obj = _decode_slowly(text, name, lineno)
    if not isinstance(obj, dict):
        raise InputError(name, lineno, None, f"not a JSON object (found {_JSON_TYPES[type(obj)]})")
    if _may_not_store(raw) and (problem := _storage_problem(obj)):
        raise InputError(name, lineno, None, problem)
    return obj


def _decode_slowly(text: str, name: str, lineno: int) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise InputError(name, lineno, None, f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except _BadConstant as exc:
        raise InputError(name, lineno, None, f"not valid JSON: {exc}") from None
    except ValueError:  # only int() fails with a plain ValueError: past sys.get_int_max_str_digits()
        raise InputError(name, lineno, None, "not valid JSON: a number has too many digits") from None
    except RecursionError:
        raise InputError(name, lineno, None, "not valid JSON: nested too deeply") from None


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


# --- validation errors ----------------------------------------------------------------------------


def validate_as(model: type[_M], data: Any, name: str, lineno: int, prefix: str) -> _M:
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
