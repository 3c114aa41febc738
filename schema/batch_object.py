"""The batch as other systems see it: OpenAI's batch object, plus gristmill's own fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from schema.db import epoch, seconds_between
from schema.states import TERMINAL_BATCH
from schema.tables import Batch


class RequestCounts(BaseModel):
    total: int
    completed: int  # succeeded, as in OpenAI's batch object
    failed: int
    cached: int = 0  # of `completed`, answered from the result cache (an extension OpenAI clients ignore)


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    kind: str = "generate"  # gristmill's task kind (schema.kinds), an extension OpenAI clients ignore
    priority: int = 5  # gristmill's: 0-9, 9 most urgent (schema.queue)
    model: str
    input_file: str | None
    completion_window: str
    status: str
    errors: list[dict[str, Any]]
    request_counts: RequestCounts
    metadata: dict[str, Any]
    created_at: int
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    expires_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    elapsed_s: float | None  # from submission to the end (or to now, while it runs)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_BATCH

    @classmethod
    def from_row(cls, row: Batch, now: Any) -> BatchObject:
        end = row.completed_at or row.failed_at or row.expired_at or row.cancelled_at or now
        return cls(
            id=row.id, endpoint=row.endpoint, kind=row.kind, priority=row.priority, model=row.model, input_file=row.input_file, status=row.status,
            errors=list(row.errors or []), metadata=dict(row.metadata_ or {}),
            request_counts=RequestCounts(total=row.total, completed=row.succeeded, failed=row.failed,
                                         cached=row.cached or 0),
            completion_window=f"{row.completion_window_s}s" if row.completion_window_s % 3600 else
            f"{row.completion_window_s // 3600}h", expires_at=epoch(row.expires_at),
            created_at=epoch(row.created_at) or 0, in_progress_at=epoch(row.in_progress_at),
            finalizing_at=epoch(row.finalizing_at), completed_at=epoch(row.completed_at),
            failed_at=epoch(row.failed_at), expired_at=epoch(row.expired_at),
            cancelling_at=epoch(row.cancelling_at), cancelled_at=epoch(row.cancelled_at),
            elapsed_s=seconds_between(row.created_at, end),
        )
