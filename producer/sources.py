"""What a schedule reads: files matching a glob, or rows of a SQL query since a watermark. Every item has
a stable id and the hash of its content (the schedule counts new and changed items by them)."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from producer.schedules import GlobSource, SqlSource
from schema.errors import GristmillError, InputError
from schema.settings import redact


@dataclass(frozen=True)
class SourceItem:
    id: str
    text: str

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def read(source: GlobSource | SqlSource, since: datetime) -> list[SourceItem]:
    items = list(_files(source.glob) if isinstance(source, GlobSource) else _rows(source, since))
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise InputError(item.id, None, "id", "two items of the source have this id")
        seen.add(item.id)
    return items


def _files(pattern: str) -> Iterator[SourceItem]:
    for name in sorted(glob.glob(pattern, recursive=True)):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(name, None, None, f"cannot read file: {exc}") from exc
        if path.suffix == ".jsonl":
            yield from _jsonl(name, content)
        elif path.suffix == ".csv":
            yield from _csv(name, content)
        elif content.strip():
            yield SourceItem(name, content)


def _jsonl(name: str, content: str) -> Iterator[SourceItem]:
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(name, number, None, f"not valid JSON: {exc}") from None
        yield _item(name, number, row)


def _csv(name: str, content: str) -> Iterator[SourceItem]:
    for number, row in enumerate(csv.DictReader(content.splitlines()), 2):
        yield _item(name, number, row)


def _item(name: str, number: int, row: object) -> SourceItem:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str) or row.get("id") in (None, ""):
        raise InputError(name, number, None, 'each line needs "id" and "text"')
    return SourceItem(f"{name}#{row['id']}", row["text"])


def _rows(source: SqlSource, since: datetime) -> Iterator[SourceItem]:
    url = source.database_url()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = text(source.sql)
            params = {"since": since} if "since" in query._bindparams else {}  # its names
            result = conn.execute(query, params).mappings()
            for row in result:
                if "id" not in row or "text" not in row:
                    raise InputError("source.sql", None, None, "the query must return columns id and text")
                if row["text"] is not None:
                    yield SourceItem(str(row["id"]), str(row["text"]))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc)
        raise GristmillError(f"the source query on {redact(url)} failed: {type(exc).__name__}: "
                             f"{redact(reason)[:300]}") from exc
    finally:
        engine.dispose()
