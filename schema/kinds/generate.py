"""Generation, the contract: OpenAI batch lines (/v1/chat/completions, /v1/completions) or simple JSONL
in; OpenAI batch output lines (or CSV) out. The line formats are in schema.lines, schema.inputs and
schema.outputs; the worker half is worker/kinds/generate.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from schema import windows
from schema.db import epoch
from schema.inputs import ParsedItem, iter_input_stream
from schema.jobs import GenerationRequest, SamplingParams, Windowing
from schema.kinds.base import ERROR_CODES, Kind, Limits, error_code
from schema.outputs import OutputLine, error_line, success_line
from schema.states import ItemStatus
from schema.tables import Batch, Item, Result

CSV_COLUMNS = ["custom_id", "status", "output_text", "finish_reason", "prompt_tokens", "completion_tokens",
               "truncated_tokens", "error_code", "error"]


class GenerateSpec(BaseModel):
    """A generation batch's parameters: sampling defaults (an OpenAI line's body overrides them) and the
    system prompt of simple lines."""

    model_config = ConfigDict(extra="forbid")
    sampling: SamplingParams = SamplingParams()
    system_prompt: str | None = Field(default=None, description="system prompt for simple JSONL lines",
                                      json_schema_extra={"flag": "--system"})
    long: Windowing = Windowing()


class Generate(Kind):
    name = "generate"
    spec_model = GenerateSpec
    summary = "a completion per line (OpenAI batch lines, or simple {custom_id|id, text})"

    def parse(self, stream: BinaryIO, name: str, spec: GenerateSpec, limits: Limits) -> Iterator[ParsedItem]:
        items = iter_input_stream(stream, name, defaults=spec.sampling, served_model=limits.model,
                                   max_line_bytes=limits.max_line_bytes, max_items=limits.max_items,
                                   system_prompt=spec.system_prompt)
        return with_windowing(items, spec.long)

    def rows(self, session: Session, batch: Batch) -> Iterator[Row[Any]]:
        stmt = (
            select(Item.id, Item.custom_id, Item.endpoint, Item.status, Item.last_error, Item.error_code, Item.model,
                   Result.output_text, Result.finish_reason, Result.prompt_tokens, Result.completion_tokens,
                   Result.truncated_tokens, Result.created_at)
            .outerjoin(Result, Result.item_id == Item.id)
            .where(Item.batch_id == batch.id, Item.parent_id.is_(None))  # input lines, not their windows
            .order_by(Item.line)
            .execution_options(yield_per=2000)
        )
        yield from session.execute(stmt)  # type: ignore[misc]  # a typed Row is a Row

    def line(self, row: Row[Any], batch: Batch) -> OutputLine | None:
        if row.status == ItemStatus.succeeded and row.output_text is not None:
            return success_line(
                custom_id=row.custom_id, request_id=f"req_{row.id}", model=row.model or batch.model,
                url=row.endpoint, text=row.output_text, finish_reason=row.finish_reason,
                prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
                created=epoch(row.created_at) or 0, line_id=f"batch_req_{row.id}",
                truncated_tokens=row.truncated_tokens or 0,
            )
        if row.status in ERROR_CODES:
            return error_line(row.custom_id, error_code(row), row.last_error or row.status,
                              line_id=f"batch_req_{row.id}")
        return None

    def answer_from_windows(self, session: Session, document: Item, now: datetime) -> str | None:
        """Extracted JSON merged by rule (`merge` first or concat) without a reduce; else None."""
        request = GenerationRequest.model_validate(document.request)
        fmt, windowing = request.sampling.response_format, request.windowing
        if windowing is None or windowing.merge == "prompt" or fmt is None or fmt.type != "json_schema":
            return None
        return windows.merge(windows.answers(session, document.id, document.round), windowing.merge)

    def csv_columns(self, session: Session, batch: Batch) -> list[str]:
        return CSV_COLUMNS

    def csv_row(self, row: Row[Any], line: BaseModel) -> dict[str, Any]:
        ok = row.status == ItemStatus.succeeded
        return {
            "custom_id": row.custom_id, "status": row.status, "output_text": row.output_text if ok else "",
            "finish_reason": row.finish_reason if ok else "", "prompt_tokens": row.prompt_tokens if ok else "",
            "completion_tokens": row.completion_tokens if ok else "",
            "truncated_tokens": (row.truncated_tokens or 0) if ok else "", "error_code": "" if ok else error_code(row),
            "error": "" if ok else row.last_error,
        }


def with_windowing(items: Iterator[ParsedItem], windowing: Windowing) -> Iterator[ParsedItem]:
    """The items' requests with the batch's map-reduce settings (unchanged when long documents fail)."""
    if windowing.long_documents == "fail":
        return items
    return (dataclasses.replace(item, request=GenerationRequest.model_validate(item.request).with_windowing(windowing))
            for item in items)


KIND = Generate()
