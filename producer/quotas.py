"""Per-project limits of the HTTP API, shared by every API replica through SQL: requests a minute (a
fixed window: the count of this minute, upserted), items queued at once, bytes of files stored.
A limit of 0 is no limit."""

from __future__ import annotations

import time

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from schema.db import get_sessionmaker
from schema.errors import GristmillError
from schema.settings import Settings
from schema.states import ItemStatus
from schema.tables import Batch, File, Item, RequestCount


class OverLimit(GristmillError):
    """A project's limit is reached; `retry_after_s`: when trying again can succeed (None: not by waiting)."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def count_request(settings: Settings, project: str, now: float | None = None) -> None:
    """Count one request of `project` in this minute; OverLimit past `project_requests_per_minute`."""
    limit = settings.project_requests_per_minute
    if not limit:
        return
    now = time.time() if now is None else now
    minute = int(now // 60)
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        stmt = insert(RequestCount).values(project=project, minute=minute, count=1)
        count = session.scalar(stmt.on_conflict_do_update(
            index_elements=["project", "minute"], set_={"count": RequestCount.count + 1})
            .returning(RequestCount.count))
        session.execute(delete(RequestCount).where(RequestCount.minute < minute - 1))  # old windows
    if count is not None and count > limit:
        raise OverLimit(f"project {project!r} made more than {limit} requests this minute",
                        retry_after_s=60 - int(now % 60))


def check_queued(settings: Settings, project: str, adding: int) -> None:
    limit = settings.project_queued_items
    if not limit:
        return
    with get_sessionmaker(settings.database_url)() as session:
        queued = session.scalar(select(func.count()).select_from(Item).join(Batch).where(
            Batch.project == project, Item.status.in_([ItemStatus.queued, ItemStatus.running]))) or 0
    if queued + adding > limit:
        raise OverLimit(f"project {project!r} has {queued} items queued; {adding} more would pass its limit of "
                        f"{limit}", retry_after_s=60)


def room_to_store(settings: Settings, project: str) -> int | None:
    """Bytes the project may still store (None: no limit); OverLimit when none."""
    limit = settings.project_stored_bytes
    if not limit:
        return None
    with get_sessionmaker(settings.database_url)() as session:
        stored = session.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(File.project == project)) or 0
    if stored >= limit:
        raise OverLimit(f"project {project!r} stores {stored} bytes of files; its limit is {limit} (delete files)")
    return int(limit - stored)
