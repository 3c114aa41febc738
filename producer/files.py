"""Files of the HTTP API, kept in SQL: written from a stream of byte chunks in one transaction (nothing
stored when it fails or passes the size limit), read back as a stream, seen only by their project.

Stored in the database, not on one server's disk, so every API replica and worker reaches them. A
file is cut into 1 MiB rows (`file_chunks`): neither end holds a whole upload in memory.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select

from schema.db import get_sessionmaker, utcnow
from schema.errors import GristmillError, InputError
from schema.settings import Settings
from schema.tables import File, FileChunk

CHUNK_BYTES = 1 << 20
PURPOSES = ("batch", "batch_output")
FILENAME = re.compile(r"[^/\\\x00-\x1f]{1,255}")


class FileNotFound(GristmillError):
    """No file with the given id in the caller's project."""


class FileTooLarge(GristmillError):
    """An upload passed the size limit; nothing was stored."""


@dataclass(frozen=True)
class FileInfo:
    id: str
    project: str
    purpose: str
    filename: str
    bytes: int
    created_at: datetime


def store(settings: Settings, project: str, filename: str, chunks: Iterable[bytes], purpose: str = "batch",
          max_bytes: int | None = None) -> FileInfo:
    """Write the file as it streams in; FileTooLarge past `max_upload_bytes` (or `max_bytes`, when lower),
    InputError for a bad name."""
    limit = min(settings.max_upload_bytes, max_bytes if max_bytes is not None else settings.max_upload_bytes)
    if purpose not in PURPOSES:
        raise InputError("purpose", None, None, f"{purpose!r}: use one of {', '.join(PURPOSES)}")
    if not FILENAME.fullmatch(filename) or filename in (".", ".."):
        raise InputError("filename", None, None, f"{filename!r}: a file name, without a path or control characters")
    row = File(id=f"file-{uuid.uuid4().hex}", project=project, purpose=purpose, filename=filename, bytes=0,
               created_at=utcnow())
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        session.add(row)
        session.flush()
        for seq, piece in enumerate(_pieces(chunks)):
            row.bytes += len(piece)
            if row.bytes > limit:
                raise FileTooLarge(f"the file is larger than the limit of {limit} bytes")
            session.add(FileChunk(file_id=row.id, seq=seq, data=piece))
            session.flush()  # one piece in memory at a time
    return _info(row)


def info(settings: Settings, project: str | None, file_id: str) -> FileInfo:
    """The file's metadata; FileNotFound when it is not the project's (None: any project, an admin)."""
    with get_sessionmaker(settings.database_url)() as session:
        return _info(_row(session, project, file_id))


def list_files(settings: Settings, project: str | None, limit: int = 100) -> list[FileInfo]:
    """The newest first."""
    query = select(File).order_by(File.created_at.desc(), File.id.desc()).limit(limit)
    if project is not None:
        query = query.where(File.project == project)
    with get_sessionmaker(settings.database_url)() as session:
        return [_info(row) for row in session.scalars(query)]


def content(settings: Settings, project: str | None, file_id: str) -> Iterator[bytes]:
    """The file's bytes, a piece at a time (checked before the first piece is read)."""
    info(settings, project, file_id)
    return _stream(settings, file_id)


def remove(settings: Settings, project: str | None, file_id: str) -> None:
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        _row(session, project, file_id)
        session.execute(delete(File).where(File.id == file_id))


def _stream(settings: Settings, file_id: str) -> Iterator[bytes]:
    query = select(FileChunk.data).where(FileChunk.file_id == file_id).order_by(FileChunk.seq)
    with get_sessionmaker(settings.database_url)() as session:
        yield from session.scalars(query.execution_options(yield_per=4))


def _row(session, project: str | None, file_id: str) -> File:  # type: ignore[no-untyped-def]
    row = session.get(File, file_id)
    if row is None or (project is not None and row.project != project):  # another project's: not found
        raise FileNotFound(f"no file with id {file_id!r}")
    return row  # type: ignore[no-any-return]


def _pieces(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The stream re-cut into CHUNK_BYTES pieces (an upload arrives in pieces of any size)."""
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        while len(pending) >= CHUNK_BYTES:
            yield bytes(pending[:CHUNK_BYTES])
            del pending[:CHUNK_BYTES]
    if pending:
        yield bytes(pending)


def _info(row: File) -> FileInfo:
    return FileInfo(row.id, row.project, row.purpose, row.filename, row.bytes, row.created_at)
