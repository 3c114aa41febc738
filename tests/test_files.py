"""Files of the HTTP API in SQL: streamed in and out in pieces, a size limit that stores nothing past it,
names without paths, each project seeing only its own files; a stored file feeds the service core."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from producer import files
from producer.service import Service
from schema.db import get_sessionmaker, prepare_schema
from schema.errors import InputError
from schema.tables import File, FileChunk, Item


def jsonl(n: int) -> bytes:
    return b"".join(json.dumps({"id": f"d{i}", "text": f"document {i} " + "x" * 900}).encode() + b"\n"
                    for i in range(n))


def counts(url: str) -> tuple[int, int]:
    with get_sessionmaker(url)() as session:
        return (session.scalar(select(func.count()).select_from(File)) or 0,
                session.scalar(select(func.count()).select_from(FileChunk)) or 0)


def test_files_stream_in_and_out_by_project(db_url: str, settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(db_url)
    prepare_schema(db_url)
    data = jsonl(3800)  # about 3.5 MiB, arriving in odd pieces
    pieces = (data[i : i + 7001] for i in range(0, len(data), 7001))
    stored = files.store(settings, "analytics", "docs.jsonl", pieces)
    assert (stored.bytes, stored.filename, stored.purpose) == (len(data), "docs.jsonl", "batch")
    assert counts(db_url) == (1, -(-len(data) // files.CHUNK_BYTES))  # 1 MiB rows
    assert b"".join(files.content(settings, "analytics", stored.id)) == data
    assert b"".join(files.content(settings, None, stored.id)) == data  # an admin sees every project

    for call in (files.info, files.content, files.remove):  # another project: not found, not forbidden
        with pytest.raises(files.FileNotFound):
            call(settings, "other", stored.id)
    second = files.store(settings, "analytics", "more.jsonl", [b'{"id": "a", "text": "b"}\n'])
    assert [f.id for f in files.list_files(settings, "analytics")] == [second.id, stored.id]
    assert files.list_files(settings, "other") == []

    batch_id = Service(settings).submit(files.content(settings, "analytics", stored.id), name=stored.filename,
                                        check_workers=False)
    with get_sessionmaker(db_url)() as session:
        assert session.scalar(select(func.count()).select_from(Item).where(Item.batch_id == batch_id)) == 3800

    files.remove(settings, "analytics", stored.id)
    assert counts(db_url) == (1, 1)  # its pieces went with it


def test_nothing_is_stored_past_the_limit_or_under_a_bad_name(sqlite_url: str, settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url, max_upload_bytes=2 * files.CHUNK_BYTES)
    prepare_schema(sqlite_url)
    data = jsonl(3000)
    with pytest.raises(files.FileTooLarge, match="larger than the limit"):
        files.store(settings, "p", "big.jsonl", (data[i : i + 65536] for i in range(0, len(data), 65536)))
    for name in ("../etc/passwd", "a/b.jsonl", "..", "x\ny", ""):
        with pytest.raises(InputError, match="filename"):
            files.store(settings, "p", name, [b"{}"])
    with pytest.raises(InputError, match="purpose"):
        files.store(settings, "p", "a.jsonl", [b"{}"], purpose="fine-tune")
    assert counts(sqlite_url) == (0, 0)


def test_a_file_that_is_not_jsonl_is_refused_by_line(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    prepare_schema(sqlite_url)
    stored = files.store(settings, "p", "notes.txt", [b'{"id": "a", "text": "ok"}\nthis is not json\n'])
    with pytest.raises(InputError, match="notes.txt:2: not valid JSON"):
        Service(settings).submit(files.content(settings, "p", stored.id), name=stored.filename, check_workers=False)
