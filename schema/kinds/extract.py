"""Structured extraction, the contract: simple lines {custom_id|id, text} in, one JSON object per line out,
constrained to and validated against the batch's JSON schema (`--task extract --schema schema.json`).

An extraction is a chat completion with a response_format: output lines are OpenAI batch output lines
(the JSON as the assistant message), and the CSV has a column per top-level property of the schema.
The worker half is worker/kinds/extract.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Row
from sqlalchemy.orm import Session

from schema.errors import InputError
from schema.inputs import ParsedItem, iter_input_stream
from schema.jobs import ResponseFormat, SamplingParams, Windowing
from schema.kinds import generate
from schema.kinds.base import Kind, Limits, error_code
from schema.outputs import OutputLine
from schema.states import ItemStatus
from schema.structured import check_json_schema
from schema.tables import Batch, Item

DEFAULT_INSTRUCTION = "Extract the information the schema asks for from the user's text."


class ExtractSpec(BaseModel):
    """An extraction batch's parameters."""

    model_config = ConfigDict(extra="forbid")
    json_schema: dict[str, Any] = Field(description="a JSON (or YAML) file with the JSON schema of each answer",
                                        json_schema_extra={"flag": "--schema", "cli": "file"})
    instruction: str | None = Field(default=None, description="what to extract; the schema is appended")
    sampling: SamplingParams = SamplingParams()
    long: Windowing = Windowing()

    @field_validator("json_schema")
    @classmethod
    def _is_a_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(value)
        if value.get("type") != "object":
            raise ValueError('an extraction schema describes an object: its top level needs "type": "object"')
        return value

    def system_prompt(self) -> str:
        schema = json.dumps(self.json_schema, ensure_ascii=False)
        return f"{self.instruction or DEFAULT_INSTRUCTION}\nAnswer with one JSON object matching this JSON " \
               f"schema:\n{schema}"


class Extract(Kind):
    """Extraction items are generation items: they are read back as generation reads them."""

    name = "extract"
    spec_model = ExtractSpec
    summary = "a JSON object per line {custom_id|id, text}, matching --schema"

    def parse(self, stream: BinaryIO, name: str, spec: ExtractSpec, limits: Limits) -> Iterator[ParsedItem]:
        fmt = ResponseFormat(type="json_schema", json_schema=spec.json_schema, name="extraction")
        sampling = spec.sampling.model_copy(update={"response_format": fmt})
        items = generate.with_windowing(iter_input_stream(
            stream, name, defaults=sampling, served_model=limits.model, max_line_bytes=limits.max_line_bytes,
            max_items=limits.max_items, system_prompt=spec.system_prompt()), spec.long)
        for item in items:
            if "text" not in item.body:  # an OpenAI line: its body carries a request of its own
                raise InputError(name, item.line, None, "extraction takes simple lines {custom_id|id, text}; send "
                                                        "OpenAI lines with a response_format with --task generate")
            yield item

    def rows(self, session: Session, batch: Batch) -> Iterator[Row[Any]]:
        return generate.KIND.rows(session, batch)

    def line(self, row: Row[Any], batch: Batch) -> OutputLine | None:
        return generate.KIND.line(row, batch)

    def answer_from_windows(self, session: Session, document: Item, now: datetime) -> str | None:
        return generate.KIND.answer_from_windows(session, document, now)

    def csv_columns(self, session: Session, batch: Batch) -> list[str]:
        return ["custom_id", "status", *_fields(batch), "error_code", "error"]

    def csv_row(self, row: Row[Any], line: BaseModel) -> dict[str, Any]:
        if row.status != ItemStatus.succeeded:
            return {"custom_id": row.custom_id, "status": row.status, "error_code": error_code(row),
                    "error": row.last_error}
        answer = json.loads(row.output_text)  # validated against the schema by the worker
        return {"custom_id": row.custom_id, "status": row.status,
                **{key: _cell(value) for key, value in answer.items()}}  # keys the schema lacks: not columns


def _cell(value: Any) -> Any:
    """A scalar as is; a nested object or list as its JSON."""
    return value if value is None or isinstance(value, str | int | float | bool) else json.dumps(value,
                                                                                              ensure_ascii=False)


def _fields(batch: Batch) -> list[str]:
    """The schema's top-level properties, in the schema's order."""
    return list(((batch.params or {}).get("json_schema") or {}).get("properties") or {})


KIND = Extract()
