"""Export of a classification batch in input order: JSONL (schema.classify_outputs) or CSV with one
probability column per label. Failed and cancelled items go to the errors file, or inline."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from producer.export import ERROR_CODES, FORMATS, Counts, _atomic
from schema.classify import Classification
from schema.classify_outputs import ClassifyOutputLine, classified_line, failed_line
from schema.states import ItemStatus
from schema.tables import Batch, Item
from schema.tables import Classification as ClassificationRow

BASE_COLUMNS = ["custom_id", "status", "label", "labels", "method", "calibrated"]
PROBABILITY_PREFIX = "p_"


def write(session: Session, batch_id: str, out: Path, errors: Path | None, fmt: str) -> Counts:
    """Write atomically: the files appear complete or not at all."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    labels = _all_labels(session, batch_id) if fmt == "csv" else []
    counts = Counts()
    with ExitStack() as stack:
        out_file = stack.enter_context(_atomic(out))
        err_file = stack.enter_context(_atomic(errors)) if errors else out_file
        write_line = _jsonl_writer() if fmt == "jsonl" else _csv_writer(out_file, err_file, labels)
        for row in _rows(session, batch_id):
            line = _line(row)
            if line is None:
                counts.pending += 1
                continue
            ok = line.error is None
            counts.succeeded += ok
            counts.failed += not ok
            write_line(line, row.status, out_file if ok else err_file)
    return counts


def _rows(session: Session, batch_id: str) -> Iterator[Row[Any]]:
    stmt = (
        select(Item.custom_id, Item.status, Item.last_error, ClassificationRow.label, ClassificationRow.labels,
               ClassificationRow.probabilities, ClassificationRow.raw_probabilities, ClassificationRow.method,
               ClassificationRow.calibrated)
        .outerjoin(ClassificationRow, ClassificationRow.item_id == Item.id)
        .where(Item.batch_id == batch_id)
        .order_by(Item.line)
        .execution_options(yield_per=2000)
    )
    yield from session.execute(stmt)  # type: ignore[misc]  # a typed Row is a Row


def _line(row: Row[Any]) -> ClassifyOutputLine | None:
    if row.status == ItemStatus.succeeded and row.label is not None:
        result = Classification(label=row.label, labels=row.labels, probabilities=row.probabilities,
                                raw_probabilities=row.raw_probabilities, method=row.method, calibrated=row.calibrated)
        return classified_line(row.custom_id, result)
    if row.status in ERROR_CODES:
        return failed_line(row.custom_id, ERROR_CODES[row.status], row.last_error or str(row.status))
    return None


def _all_labels(session: Session, batch_id: str) -> list[str]:
    """Every label of the batch, in order of first appearance: the batch's, then lines' own."""
    batch = session.get(Batch, batch_id)
    labels: dict[str, None] = dict.fromkeys(((batch.params or {}).get("classify") or {}).get("labels") or []
                                            if batch else [])
    stmt = select(ClassificationRow.probabilities).where(ClassificationRow.batch_id == batch_id)
    for (probabilities,) in session.execute(stmt.execution_options(yield_per=5000)):
        labels.update(dict.fromkeys(probabilities))
    return list(labels)


def _jsonl_writer():  # type: ignore[no-untyped-def]
    def write_line(line: ClassifyOutputLine, status: str, target: IO[str]) -> None:
        target.write(line.model_dump_json() + "\n")
    return write_line


def _csv_writer(out_file: IO[str], err_file: IO[str], labels: list[str]):  # type: ignore[no-untyped-def]
    columns = [*BASE_COLUMNS, *(PROBABILITY_PREFIX + label for label in labels), "error"]
    writers = {id(f): csv.DictWriter(f, columns) for f in (out_file, err_file)}
    for writer in writers.values():
        writer.writeheader()

    def write_line(line: ClassifyOutputLine, status: str, target: IO[str]) -> None:
        probabilities = {PROBABILITY_PREFIX + k: v for k, v in (line.probabilities or {}).items()}
        writers[id(target)].writerow({
            "custom_id": line.custom_id, "status": str(status), "label": line.label or "",
            "labels": json.dumps(line.labels) if line.labels is not None else "", "method": line.method or "",
            "calibrated": "" if line.calibrated is None else str(line.calibrated).lower(), **probabilities,
            "error": line.error.message if line.error else "",
        })
    return write_line
