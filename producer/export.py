"""Results export in input order: OpenAI batch output JSONL, or CSV. Failed items to an errors file."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from schema.db import epoch
from schema.outputs import OutputLine, error_line, success_line
from schema.states import ItemStatus
from schema.tables import Batch, Item, Result

FORMATS = ("jsonl", "csv")
ERROR_CODES = {ItemStatus.failed: "item_failed", ItemStatus.cancelled: "batch_cancelled",
               ItemStatus.expired: "batch_expired"}
CSV_COLUMNS = ["custom_id", "status", "output_text", "finish_reason", "prompt_tokens", "completion_tokens", "error"]


@dataclass
class Counts:
    succeeded: int = 0
    failed: int = 0
    pending: int = 0  # not finished yet, not exported


def _rows(session: Session, batch_id: str) -> Iterator[Row[Any]]:
    stmt = (
        select(Item.id, Item.custom_id, Item.endpoint, Item.status, Item.last_error, Item.model,
               Result.output_text, Result.finish_reason, Result.prompt_tokens, Result.completion_tokens,
               Result.created_at)
        .outerjoin(Result, Result.item_id == Item.id)
        .where(Item.batch_id == batch_id)
        .order_by(Item.line)
        .execution_options(yield_per=2000)
    )
    yield from session.execute(stmt)


def _line(row: Row[Any], batch_model: str) -> OutputLine | None:
    if row.status == ItemStatus.succeeded and row.output_text is not None:
        return success_line(
            custom_id=row.custom_id, request_id=f"req_{row.id}", model=row.model or batch_model,
            url=row.endpoint, text=row.output_text, finish_reason=row.finish_reason,
            prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
            created=epoch(row.created_at) or 0, line_id=f"batch_req_{row.id}",
        )
    if row.status in ERROR_CODES:
        return error_line(row.custom_id, ERROR_CODES[row.status], row.last_error or row.status,
                          line_id=f"batch_req_{row.id}")
    return None


def write(session: Session, batch_id: str, out: Path, errors: Path | None, fmt: str) -> Counts:
    """Write atomically: the files appear complete or not at all."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if session.get(Batch, batch_id).kind == "classify":  # type: ignore[union-attr]
        from producer import classify_export  # it imports this module

        return classify_export.write(session, batch_id, out, errors, fmt)
    batch_model = session.get(Batch, batch_id).model  # type: ignore[union-attr]
    counts = Counts()
    with ExitStack() as stack:
        out_file = stack.enter_context(_atomic(out))
        err_file = stack.enter_context(_atomic(errors)) if errors else out_file
        writer = _csv_writer(out_file, err_file, fmt)
        for row in _rows(session, batch_id):
            line = _line(row, batch_model)
            if line is None:
                counts.pending += 1
                continue
            ok = line.error is None
            counts.succeeded += ok
            counts.failed += not ok
            target = out_file if ok else err_file
            if fmt == "jsonl":
                target.write(line.model_dump_json() + "\n")
            else:
                writer(row, ok, target)
    return counts


def _csv_writer(out_file: IO[str], err_file: IO[str], fmt: str):  # type: ignore[no-untyped-def]
    if fmt != "csv":
        return None
    writers = {id(f): csv.DictWriter(f, CSV_COLUMNS) for f in (out_file, err_file)}  # one if they are the same
    for w in writers.values():
        w.writeheader()

    def write_row(row: Row[Any], ok: bool, target: IO[str]) -> None:
        writers[id(target)].writerow({
            "custom_id": row.custom_id, "status": row.status, "output_text": row.output_text if ok else "",
            "finish_reason": row.finish_reason if ok else "", "prompt_tokens": row.prompt_tokens if ok else "",
            "completion_tokens": row.completion_tokens if ok else "", "error": "" if ok else row.last_error,
        })
    return write_row


class _atomic:
    """Write to PATH.tmp, rename over PATH on success, remove the temp file on failure."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")

    def __enter__(self) -> IO[str]:
        self.file = open(self.tmp, "w", encoding="utf-8", newline="")
        return self.file

    def __exit__(self, exc_type: Any, *_: object) -> None:
        self.file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
