"""The Python API: submit a batch, then follow it through a handle. A thin layer over producer.service."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from producer import evaluation, export
from producer.service import Record, Service, Source
from schema.batch_object import BatchObject
from schema.db import get_sessionmaker
from schema.settings import Settings, get_settings
from schema.tables import Batch


class BatchHandle:
    """A submitted batch: ask its status, wait for it, read or export its results, evaluate or cancel it."""

    def __init__(self, batch_id: str, settings: Settings | None = None, service: Service | None = None) -> None:
        self.id = batch_id
        self.service = service or service_for(settings)
        self.settings = self.service.settings

    def __repr__(self) -> str:
        return f"BatchHandle({self.id!r})"

    def status(self) -> BatchObject:
        return self.service.status(self.id)

    def wait(self, timeout: float | None = None, poll_s: float = 0.5,
             on_progress: Callable[[BatchObject], None] | None = None) -> BatchObject:
        """Block until the batch reaches a terminal state; raises TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.status()
            if on_progress:
                on_progress(info)
            if info.done:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {self.id} still {info.status} after {timeout:.0f} s")
            time.sleep(poll_s)

    def output(self) -> Iterator[Record]:
        """The finished items' output lines in input order, without writing a file."""
        return self.service.output(self.id)

    def results(self, out: str | Path, errors: str | Path | None = None, fmt: str = "jsonl") -> export.Counts:
        """Write results in input order; failed items go to `errors` (or inline, flagged, if None)."""
        return export.write(self.service, self.id, Path(out), Path(errors) if errors else None, fmt)

    def stats(self) -> dict[str, Any]:
        return self.service.stats(self.id)

    def evaluate(self, gold: str | Path) -> dict[str, Any]:
        """Score a classification batch's answers against a gold JSONL file {custom_id|id, label|labels}:
        accuracy, macro-F1, per-label figures, the confusion matrix and the ECE; stored, and returned."""
        self.status()  # not found, or another project's: BatchNotFound
        with get_sessionmaker(self.settings.database_url)() as session, session.begin():
            batch = session.get(Batch, self.id)
            assert batch is not None
            return evaluation.evaluate(session, batch, gold, self.settings.max_line_bytes)

    def cancel(self) -> BatchObject:
        """Stop queued items now; running ones finish and keep their results; ends `cancelled`."""
        return self.service.cancel(self.id)


def submit(source: Source, *, task: str = "generate", model: str | None = None,
           metadata: dict[str, Any] | None = None, completion_window: str = "24h",
           settings: Settings | None = None, name: str | None = None, check_workers: bool = True,
           priority: str | int = "normal", send: bool = True, **options: Any) -> BatchHandle:
    """Validate, store and enqueue a batch from a path, bytes, an open binary file or a generator of
    byte chunks. Raises InputError (nothing written) on a bad input.

    `options` are the task kind's spec (schema/kinds): for task="generate", `sampling` (SamplingParams)
    and `system_prompt`; "classify": `labels`, `instruction`, `method` ("score" or "choice"),
    `calibrate`, `multi_label`, `threshold`; "extract": `json_schema`, `instruction`, `sampling`;
    "embed": `encoding_format`, `dimensions`. A kind the live workers of the model cannot run is
    refused (NotServed) unless `check_workers=False`. `priority`: high, normal, low or 0-9 (9 most
    urgent): workers take chunks of more urgent batches first. `send=False` stores the batch without
    enqueueing it; `handle.service.send(handle.id)` enqueues it later.
    """
    service = service_for(settings)
    batch_id = service.submit(source, name=name, task=task, model=model, metadata=metadata,
                              completion_window=completion_window, check_workers=check_workers, priority=priority,
                              send=send, **options)
    return BatchHandle(batch_id, service=service)


def open_batch(batch_id: str, settings: Settings | None = None) -> BatchHandle:
    handle = BatchHandle(batch_id, service=service_for(settings))
    handle.status()
    return handle


def list_batches(limit: int = 20, settings: Settings | None = None) -> list[BatchObject]:
    return service_for(settings).list_batches(limit)


_services: dict[str, Service] = {}


def service_for(settings: Settings | None = None) -> Service:
    """One Service (and so one Celery app) per settings in this process."""
    settings = settings or get_settings()
    key = settings.model_dump_json()
    if key not in _services:
        _services[key] = Service(settings)
    return _services[key]
