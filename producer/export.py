"""Writing a batch's output to files, in input order: JSONL lines (the kind's output lines) or CSV rows.
Failed items go to an errors file, or inline. The lines come from the service core (producer.service)."""

from __future__ import annotations

import csv
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from producer.service import Service

FORMATS = ("jsonl", "csv")


@dataclass
class Counts:
    succeeded: int = 0
    failed: int = 0
    pending: int = 0  # not finished yet, not exported

    def add(self, ok: bool) -> None:
        self.succeeded += ok
        self.failed += not ok


def write(service: Service, batch_id: str, out: Path, errors: Path | None, fmt: str = "jsonl") -> Counts:
    """Write atomically: the files appear complete or not at all."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    total = service.status(batch_id).request_counts.total
    counts = Counts()
    with ExitStack() as stack:
        out_file = stack.enter_context(_atomic(out))
        err_file = stack.enter_context(_atomic(errors)) if errors else out_file
        if fmt == "jsonl":
            for record in service.output(batch_id):
                counts.add(record.ok)
                (out_file if record.ok else err_file).write(record.line.model_dump_json() + "\n")
        else:
            columns, rows = service.csv(batch_id)
            # extrasaction: an extracted answer may hold keys its schema does not list (they stay in JSONL)
            writers: dict[int, csv.DictWriter[str]] = {id(f): csv.DictWriter(f, columns, extrasaction="ignore")
                                                       for f in (out_file, err_file)}  # one if they are the same
            for writer in writers.values():
                writer.writeheader()
            for ok, row in rows:
                counts.add(ok)
                writers[id(out_file if ok else err_file)].writerow(row)
    counts.pending = total - counts.succeeded - counts.failed
    return counts


class _atomic:
    """Write to PATH.tmp, rename over PATH on success, remove the temp file on failure."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")

    def __enter__(self) -> IO[str]:
        self.file = open(self.tmp, "w", encoding="utf-8", newline="")  # closed in __exit__
        return self.file

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
