"""The Python API: submit a file, then follow the batch through a handle. The CLI is a thin layer on this."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.exc import DBAPIError

from producer import export, stats
from producer.classify_submit import classify_spec, create_classify_batch
from producer.submit import create_batch
from schema.batch_object import BatchObject
from schema.classify import Method
from schema.db import get_engine, get_sessionmaker, upgrade, utcnow
from schema.errors import BatchNotFound, BatchStateError, ConfigError
from schema.jobs import SamplingParams
from schema.settings import Settings, get_settings
from schema.states import BatchStatus
from schema.tables import Batch
from worker import store


class BatchHandle:
    """A submitted batch: ask its status, wait for it, export its results, cancel it."""

    def __init__(self, batch_id: str, settings: Settings | None = None) -> None:
        self.id = batch_id
        self.settings = settings or get_settings()
        self._sessions = get_sessionmaker(self.settings.database_url)

    def __repr__(self) -> str:
        return f"BatchHandle({self.id!r})"

    def status(self) -> BatchObject:
        with self._sessions() as session:
            try:
                row = session.get(Batch, self.id)
            except DBAPIError:
                # A database no gristmill process has touched yet holds no batch (not a SQL traceback).
                if not inspect(get_engine(self.settings.database_url)).has_table(Batch.__tablename__):
                    raise BatchNotFound(f"no batch with id {self.id!r} (the database has no tables yet)") from None
                raise
            if row is None:
                raise BatchNotFound(f"no batch with id {self.id!r}")
            return BatchObject.from_row(row, utcnow())

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

    def results(self, out: str | Path, errors: str | Path | None = None, fmt: str = "jsonl") -> export.Counts:
        """Write results in input order; failed items go to `errors` (or inline, flagged, if None)."""
        self.status()  # raises BatchNotFound
        with self._sessions() as session:
            return export.write(session, self.id, Path(out), Path(errors) if errors else None, fmt)

    def stats(self) -> dict[str, Any]:
        self.status()
        with self._sessions() as session:
            return stats.summarise(session, self.id)

    def cancel(self) -> BatchObject:
        """Stop queued items now; running ones finish and keep their results; ends `cancelled`."""
        with self._sessions() as session, session.begin():
            batch = session.get(Batch, self.id, with_for_update=True)
            if batch is None:
                raise BatchNotFound(f"no batch with id {self.id!r}")
            if batch.status not in (BatchStatus.validating, BatchStatus.in_progress, BatchStatus.cancelling):
                raise BatchStateError(f"batch {self.id} is {batch.status}; only a running batch can be cancelled")
            batch.status, batch.cancelling_at = BatchStatus.cancelling, batch.cancelling_at or utcnow()
            store.cancel_queued(session, self.id)
            store.close_if_done(session, self.id)
        return self.status()


def submit(input_path: str | Path, *, model: str | None = None, sampling: SamplingParams | None = None,
           system_prompt: str | None = None, metadata: dict[str, Any] | None = None,
           completion_window: str = "24h", settings: Settings | None = None,
           task: str = "generate", labels: list[str] | None = None, instruction: str | None = None,
           method: Method = "score", calibrate: bool = True, multi_label: bool = False,
           threshold: float = 0.5) -> BatchHandle:
    """Validate, store and enqueue a batch file. Raises InputError (nothing written) on a bad file.

    task="classify": each line {custom_id|id, text, labels?} gets a label and its probabilities;
    `labels` (or each line's own), `instruction`, method "score" (calibrated unless calibrate=False)
    or "choice", `multi_label` with its `threshold`. See schema.classify.
    """
    settings = settings or get_settings()
    if task == "classify":
        spec = classify_spec(labels, instruction=instruction, method=method, calibrate=calibrate,
                             multi_label=multi_label, threshold=threshold)
        return BatchHandle(create_classify_batch(input_path, settings, spec, model=model, metadata=metadata,
                                                 completion_window=completion_window), settings)
    if task != "generate":
        raise ConfigError(f"unknown task {task!r}; use generate or classify")
    batch_id = create_batch(input_path, settings, model=model, sampling=sampling,
                            system_prompt=system_prompt, metadata=metadata, completion_window=completion_window)
    return BatchHandle(batch_id, settings)


def open_batch(batch_id: str, settings: Settings | None = None) -> BatchHandle:
    handle = BatchHandle(batch_id, settings)
    handle.status()
    return handle


def list_batches(limit: int = 20, settings: Settings | None = None) -> list[BatchObject]:
    settings = settings or get_settings()
    upgrade(settings.database_url)
    with get_sessionmaker(settings.database_url)() as session:
        rows = session.scalars(select(Batch).order_by(Batch.created_at.desc()).limit(limit)).all()
        now = utcnow()
        return [BatchObject.from_row(row, now) for row in rows]
