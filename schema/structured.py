"""Structured output: checking a JSON schema a client sends, and an answer against its response format.

Both sides use it: submission refuses a schema that is not one (naming the file, line and field), the
worker parses and validates every answer, so a constrained engine that still went wrong (it ran out
of max_tokens mid-object, or its grammar is looser than the schema) fails that item, not silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
from referencing.exceptions import Unresolvable

from schema.errors import ErrorCode
from schema.jobs import ResponseFormat


def check_json_schema(schema: Any) -> dict[str, Any]:
    """The schema, or ValueError saying why it is no JSON schema (pydantic reports it with its field)."""
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema is an object")  # noqa: TRY004  # pydantic reports only ValueErrors
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ValueError(f"not a valid JSON schema: {exc.message}" + (f" (at {where})" if where else "")) from None
    for ref in _refs(schema):
        if not ref.startswith("#") or not _resolves(schema, ref[1:]):
            raise ValueError(f"$ref {ref!r} does not point inside the schema; only local references (#/...) work")
    return schema


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolves(schema: dict[str, Any], pointer: str) -> bool:
    """Whether a JSON pointer ("/$defs/address") names a part of the schema."""
    node: Any = schema
    for part in [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def check_answer(text: str, fmt: ResponseFormat) -> tuple[ErrorCode, str] | None:
    """None when `text` is what `fmt` asks for; else the error code and a message that keeps the text."""
    if fmt.choice is not None:
        if text in fmt.choice:
            return None
        return ErrorCode.schema_mismatch, f"the answer is none of the choices {list(fmt.choice)}; raw answer: {text}"
    try:
        value = json.loads(text)
    except ValueError as exc:
        return ErrorCode.invalid_json, f"the answer is not JSON ({exc}); raw answer: {text}"
    if fmt.json_schema is None:
        if not isinstance(value, dict):
            return ErrorCode.schema_mismatch, f"the answer is JSON but not an object; raw answer: {text}"
        return None
    validator = jsonschema.validators.validator_for(fmt.json_schema)(fmt.json_schema)
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except Unresolvable as exc:  # submission refuses such schemas; a batch stored before it did not
        return ErrorCode.invalid_request, f"the schema cannot be applied: {exc}; raw answer: {text}"
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the top level"
    return ErrorCode.schema_mismatch, (f"the answer does not match the schema at {where}: {error.message}; "
                                       f"raw answer: {text}")
