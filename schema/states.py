"""Batch and item states, named as in OpenAI's Batch API so clients already know them."""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    validating = "validating"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    failed = "failed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"


class ItemStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"  # its batch's completion window passed before it ran
    waiting = "waiting"  # a long document whose windows run (map-reduce); queued again for its reduce


TERMINAL_BATCH = {BatchStatus.completed, BatchStatus.failed, BatchStatus.expired, BatchStatus.cancelled}
TERMINAL_ITEM = {ItemStatus.succeeded, ItemStatus.failed, ItemStatus.cancelled, ItemStatus.expired}
