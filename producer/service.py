"""The service core: everything that puts work in or reads it out, for any kind of batch.

Submit from any binary source (a path, an open file, an upload's bytes, a generator of byte chunks) with
the whole input validated before anything is stored; read a batch's status; list and cancel batches;
iterate over its output lines or CSV rows, streamed from SQL, without writing a file. The Python API
(producer.api), the CLI and later the HTTP API and the scheduler are thin layers over a `Service`.

A Service brings its database to the latest schema once, when it is made (as a worker does at start);
it connects to the broker only when it first submits.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel
from sqlalchemy import Row, func, select, tuple_
from sqlalchemy.orm import Session

from producer import stats
from producer.submit import NewBatch, enqueue, new_batch_id, store_batch, store_invalid
from schema import kinds, store, workers
from schema.batch_object import BatchObject
from schema.cache import keyer as cache_keyer
from schema.db import get_sessionmaker, prepare_schema, seconds_between, utcnow
from schema.errors import BatchNotFound, BatchStateError, InputError, NotServed
from schema.jobs import parse_window
from schema.queue import Queue, parse_priority
from schema.reading import ParsedItem
from schema.settings import Settings, get_settings
from schema.states import BatchStatus
from schema.tables import Batch, EngineBatch, ScheduleRun

Source = str | Path | bytes | BinaryIO | Iterable[bytes]


@dataclass(frozen=True)
class Record:
    """One finished item of a batch's output: its line (OpenAI output line, classification line, ...),
    whether it succeeded, and its SQL row (what the kind's csv_row reads)."""

    ok: bool
    line: BaseModel
    row: Row[Any]


@dataclass(frozen=True)
class Rates:
    items_per_s: float | None
    output_tokens_per_s: float | None
    prompt_tokens_per_s: float | None


class Service:
    def __init__(self, settings: Settings | None = None, project: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.project = project  # None: every project's batches (the CLI, an admin key); else only its own
        self._sessions = get_sessionmaker(self.settings.database_url)
        self._queue: Queue | None = None
        prepare_schema(self.settings.database_url)

    def scoped(self, project: str | None) -> Service:
        """The same service seeing only `project`'s batches (an HTTP API key's view)."""
        view = copy.copy(self)
        view.project = project
        return view

    @property
    def queue(self) -> Queue:
        if self._queue is None:
            self._queue = Queue(self.settings)
        return self._queue

    # --- putting work in ----------------------------------------------------------------------

    def submit(self, source: Source, *, name: str | None = None, task: str = "generate", model: str | None = None,
               metadata: dict[str, Any] | None = None, completion_window: str = "24h", check_workers: bool = True,
               endpoint: str | None = None, record_invalid: bool = False, request_key: str | None = None,
               admit: Callable[[int], None] | None = None, cache: bool = True, priority: str | int = "normal",
               send: bool = True, **options: Any) -> str:
        """Validate, store and enqueue a batch; returns its id. `options` are the kind's spec fields
        (generation: sampling, system_prompt; classification: labels, method, ...). A bad input raises
        InputError naming the source, line and field, and nothing is written; with `record_invalid`
        (the HTTP API, as OpenAI's) it becomes a `failed` batch whose errors say so. `endpoint`: every
        line must be for it. `check_workers=False` skips refusing a kind the live workers cannot run
        (`gristmill run` brings its own worker). `request_key`: what find_request finds it by.
        `admit(n_items)`, called once the input is valid and before anything is stored, may refuse it
        by raising (a quota). `cache`: answer deterministic items from earlier identical requests
        (schema.cache), with no engine. `priority`: high, normal, low or 0-9 (9 most urgent); workers take
        chunks of more urgent batches first (schema.queue). `send=False`: stored but not yet enqueued;
        `send(batch_id)` enqueues it (`gristmill run` does once its worker knows its engine's capacity,
        so chunks are cut to fit it)."""
        kind = kinds.get(task)
        spec = kind.spec(**options)
        window_s = parse_window(completion_window)
        level = parse_priority(priority)
        model = model or self.settings.model
        if check_workers:
            self._check_served(kind.name, model)
        limits = kinds.Limits(model, self.settings.max_line_bytes, self.settings.max_items_per_batch)
        name = name or (str(source) if isinstance(source, (str, Path)) else "<input>")
        batch_id = new_batch_id()
        with get_sessionmaker(self.settings.database_url)() as session:
            spec, stored = kind.prepare(session, spec, model, utcnow())
        new = NewBatch(kind.name, model, self.project or "default", spec.model_dump(), name, metadata or {},
                       window_s, request_key, level)
        key = cache_keyer(kind.name, kind.version, model, spec) if cache else None
        try:  # stored as it is read, in one transaction: a bad line anywhere stores nothing
            with open_source(source, name) as stream:
                items = kind.parse(stream, name, spec, limits)
                store_batch(self.settings, batch_id, new, _for_endpoint(items, endpoint, name), key, stored, admit)
        except OSError as exc:  # a file that cannot be read (InputError is no OSError)
            raise InputError(name, None, None, f"cannot read file: {exc.strerror or exc}") from exc
        except InputError as exc:
            if not record_invalid:
                raise
            error = {"code": "invalid_request", "message": exc.message, "param": exc.field, "line": exc.line}
            store_invalid(self.settings, batch_id, new, endpoint or "", [error])
            return batch_id
        if send:
            enqueue(self.settings, self.queue, batch_id, model, kind.name, level)
        return batch_id

    def send(self, batch_id: str) -> None:
        """Enqueue a batch stored with `submit(..., send=False)`, in chunks sized for the live workers."""
        with self._sessions() as session:
            batch = self._batch(session, batch_id)
            model, kind, priority = batch.model, batch.kind, batch.priority
        enqueue(self.settings, self.queue, batch_id, model, kind, priority)

    def _check_served(self, kind: str, model: str) -> None:
        """Refuse a kind the live workers of the model cannot run (a batch for a model with no live
        worker waits in the queue for one)."""
        served = workers.kinds_served(self.settings, model)
        if served is not None and kind not in served:
            raise NotServed(f"no live worker of model {model!r} runs task {kind!r}; they run "
                            f"{', '.join(sorted(served)) or 'nothing'}")

    def find_request(self, request_key: str, since: datetime) -> str | None:
        """The newest batch submitted with `request_key` since then, if any (a retried request's first try)."""
        query = (select(Batch.id).where(Batch.request_key == request_key, Batch.created_at >= since)
                 .order_by(Batch.created_at.desc()).limit(1))
        if self.project is not None:
            query = query.where(Batch.project == self.project)
        with self._sessions() as session:
            return session.scalar(query)

    def waiting_for_worker(self, model: str | None = None) -> bool:
        """True when no live worker runs `model` (the default model): its batches wait in the queue."""
        return workers.kinds_served(self.settings, model or self.settings.model) is None

    # --- reading it out -------------------------------------------------------------------------

    def status(self, batch_id: str) -> BatchObject:
        with self._sessions() as session:
            return BatchObject.from_row(self._batch(session, batch_id), utcnow())

    def list_batches(self, limit: int = 20, after: str | None = None) -> list[BatchObject]:
        """The most recent batches first; `after` a batch id: the page that follows it."""
        query = select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
        if self.project is not None:
            query = query.where(Batch.project == self.project)
        with self._sessions() as session:
            if after is not None:
                cursor = self._batch(session, after)
                query = query.where(tuple_(Batch.created_at, Batch.id) < tuple_(cursor.created_at, cursor.id))
            now = utcnow()
            return [BatchObject.from_row(row, now) for row in session.scalars(query)]

    def cancel(self, batch_id: str) -> BatchObject:
        """Stop queued items now; running ones finish and keep their results; ends `cancelled`."""
        with self._sessions() as session, session.begin():
            batch = self._batch(session, batch_id, for_update=True)
            if batch.status not in (BatchStatus.validating, BatchStatus.in_progress, BatchStatus.cancelling):
                raise BatchStateError(f"batch {batch_id} is {batch.status}; only a running batch can be cancelled")
            batch.status, batch.cancelling_at = BatchStatus.cancelling, batch.cancelling_at or utcnow()
            store.cancel_queued(session, batch_id)
            store.close_if_done(session, batch_id)
        return self.status(batch_id)

    def output(self, batch_id: str) -> Iterator[Record]:
        """The finished items in input order (streamed from SQL); items still queued or running are left out."""
        with self._sessions() as session:
            batch = self._batch(session, batch_id)
            kind = kinds.get(batch.kind)
            for row in kind.rows(session, batch):
                line = kind.line(row, batch)
                if line is not None:
                    yield Record(ok=getattr(line, "error", None) is None, line=line, row=row)

    def csv(self, batch_id: str) -> tuple[list[str], Iterator[tuple[bool, dict[str, Any]]]]:
        """The CSV header, and (succeeded, row) for every finished item in input order."""
        with self._sessions() as session:
            batch = self._batch(session, batch_id)
            kind = kinds.get(batch.kind)
            columns = kind.csv_columns(session, batch)
        rows = ((record.ok, kind.csv_row(record.row, record.line)) for record in self.output(batch_id))
        return columns, rows

    def stats(self, batch_id: str) -> dict[str, Any]:
        with self._sessions() as session:
            self._batch(session, batch_id)
            return stats.summarise(session, batch_id)

    def recent_rates(self, batch_id: str, window_s: float = 60.0) -> Rates:
        """Items, output and prompt tokens per second over the last `window_s` (or since the batch's first
        chunk started, when that is sooner), from the chunks' records: a few rows, not the items."""
        now = utcnow()
        with self._sessions() as session:
            self._batch(session, batch_id)
            mine = EngineBatch.batch_id == batch_id
            first = session.scalar(select(func.min(EngineBatch.started_at)).where(mine))
            items, output, prompt = session.execute(
                select(func.sum(EngineBatch.n_items), func.sum(EngineBatch.completion_tokens),
                       func.sum(EngineBatch.prompt_tokens))
                .where(mine, EngineBatch.finished_at >= now - timedelta(seconds=window_s))).one()
        span = min(window_s, seconds_between(first, now) or 0.0)
        if span <= 0:
            return Rates(None, None, None)
        return Rates((items or 0) / span, (output or 0) / span, (prompt or 0) / span)

    def schedule_runs(self, limit: int = 50) -> list[tuple[ScheduleRun, str | None]]:
        """The latest runs of schedules, newest first, with their batch's status (a project sees the runs
        whose batch it owns)."""
        query = (select(ScheduleRun, Batch.status).outerjoin(Batch, Batch.id == ScheduleRun.batch_id)
                 .order_by(ScheduleRun.started_at.desc(), ScheduleRun.id.desc()).limit(limit))
        if self.project is not None:
            query = query.where(Batch.project == self.project)
        with self._sessions() as session:
            return [(run, status) for run, status in session.execute(query)]

    def _batch(self, session: Session, batch_id: str, for_update: bool = False) -> Batch:
        batch = session.get(Batch, batch_id, with_for_update=for_update)
        if batch is None or (self.project is not None and batch.project != self.project):  # not found, not forbidden
            raise BatchNotFound(f"no batch with id {batch_id!r}")
        return batch


def _for_endpoint(items: Iterator[ParsedItem], endpoint: str | None, name: str) -> Iterator[ParsedItem]:
    """The items, refused at the first whose url is not `endpoint` (when given)."""
    for item in items:
        if endpoint is not None and item.endpoint != endpoint:
            raise InputError(name, item.line, "url", f"url {item.endpoint!r} differs from the batch's endpoint "
                                                     f"{endpoint!r}")
        yield item


class open_source:  # used as a context manager, like open()
    """A binary stream over any Source; a path is opened (and closed) here."""

    def __init__(self, source: Source, name: str) -> None:
        self.source, self.name = source, name
        self.opened: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        source = self.source
        if isinstance(source, (str, Path)):
            self.opened = open(source, "rb")  # closed in __exit__
            return self.opened
        if isinstance(source, (bytes, bytearray)):
            return io.BytesIO(source)
        if hasattr(source, "readline"):
            return source  # type: ignore[return-value]
        return io.BufferedReader(_ChunkReader(iter(source)))  # type: ignore[arg-type]

    def __exit__(self, *_: object) -> None:
        if self.opened is not None:
            self.opened.close()


class _ChunkReader(io.RawIOBase):
    """A readable raw stream over an iterator of byte chunks (a generator, an upload read in parts)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.pending = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            try:
                self.pending = next(self.chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size
