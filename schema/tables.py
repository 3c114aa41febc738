"""SQL tables (SQLAlchemy 2.x), first-class on PostgreSQL and SQLite. Migrations: schema/migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Json = JSON().with_variant(JSONB(), "postgresql")
Timestamp = DateTime(timezone=True)
# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key.
Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


def table_of(model: type[Base]) -> Table:
    """A mapped class's Core table, for statements that skip the ORM's layer."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


class Batch(Base):
    """A submitted input file: its job parameters, state (with a timestamp per state) and counts."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_project_request_key", "project", "request_key"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # schema.kinds: generate, classify, extract, embed
    project: Mapped[str] = mapped_column(String(128), default="default", server_default="default")  # HTTP API tenant
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(512))
    params: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    status: Mapped[str] = mapped_column(String(16), index=True)
    input_file: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", Json, default=dict)
    errors: Mapped[list[Any]] = mapped_column(Json, default=list)
    total: Mapped[int] = mapped_column(Integer, default=0)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    cancelled: Mapped[int] = mapped_column(Integer, default=0)
    expired: Mapped[int] = mapped_column(Integer, default=0)
    completion_window_s: Mapped[int] = mapped_column(Integer, default=86400)
    expires_at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    in_progress_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finalizing_at: Mapped[datetime | None] = mapped_column(Timestamp)
    completed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    failed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    expired_at: Mapped[datetime | None] = mapped_column(Timestamp)
    cancelling_at: Mapped[datetime | None] = mapped_column(Timestamp)
    cancelled_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # what made it through the HTTP API (an Idempotency-Key, or the create request's digest), so a retried
    # create finds the batch its first attempt made instead of making a second
    request_key: Mapped[str | None] = mapped_column(String(128))
    cached: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # items answered from the cache
    priority: Mapped[int] = mapped_column(Integer, default=5, server_default="5")  # 0-9, 9 most urgent (schema.queue)


class Item(Base):
    """One input line: the request, its state and attempts, and its timing."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id"),
        Index("ix_items_batch_status", "batch_id", "status"),
        Index("ix_items_batch_line", "batch_id", "line"),
        # The reconciler's keyset scan of queued items (worker.reconciler): only queued rows are in it.
        Index("ix_items_queued", "id", postgresql_where=text("status = 'queued'"), sqlite_where=text("status = 'queued'")),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)  # input order, for export
    custom_id: Mapped[str] = mapped_column(String(512))
    endpoint: Mapped[str] = mapped_column(String(64))
    request: Mapped[dict[str, Any]] = mapped_column(Json)  # schema.jobs.GenerationRequest
    body: Mapped[dict[str, Any]] = mapped_column(Json)  # the input line's body, verbatim
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False)  # its last run failed or never ended
    last_error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(32))  # schema.errors.ErrorCode of a failed item
    lease_id: Mapped[str | None] = mapped_column(String(32))  # the running claim's fencing token (schema.store)
    lease_expires_at: Mapped[datetime | None] = mapped_column(Timestamp)  # in the database's clock
    # timing
    enqueued_at: Mapped[datetime | None] = mapped_column(Timestamp)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    queue_wait_s: Mapped[float | None] = mapped_column(Float)
    engine_s: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    worker_host: Mapped[str | None] = mapped_column(String(255))
    engine: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(512))
    engine_batch_id: Mapped[int | None] = mapped_column(ForeignKey("engine_batches.id", ondelete="SET NULL"))
    cache_key: Mapped[str | None] = mapped_column(String(64))  # schema.cache; None: not deterministic, or off
    cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")  # answered from the cache
    # A window of a long document (map-reduce) has its document item as parent; `round` 1 windows cut the
    # document, round 2 windows cut round 1's answers when they are too long for one reduce, and so on.
    # A document item's `round`: the round its windows are in (0: never split).
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    window: Mapped[int | None] = mapped_column(Integer)  # its place in its round, from 0


class Result(Base):
    """The output of one item; the primary key makes a second result for the same item impossible."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("batch_id", "custom_id"),)

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    output_text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    truncated_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # cut to fit the context
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class EngineBatch(Base):
    """One engine call: which worker ran how many items, how long it took, how many tokens."""

    __tablename__ = "engine_batches"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    worker_host: Mapped[str] = mapped_column(String(255))
    engine: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(512))
    n_items: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    finished_at: Mapped[datetime] = mapped_column(Timestamp)
    engine_s: Mapped[float] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)


class Classification(Base):
    """A classification item's answer (its Result row holds the label as output_text, for generic tools)."""

    __tablename__ = "classifications"

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    label: Mapped[str] = mapped_column(String(512))
    labels: Mapped[list[str] | None] = mapped_column(Json)  # multi-label: those at or above the threshold
    probabilities: Mapped[dict[str, float]] = mapped_column(Json)
    raw_probabilities: Mapped[dict[str, float] | None] = mapped_column(Json)  # before calibration
    method: Mapped[str] = mapped_column(String(16))  # score | choice | head
    calibrated: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class Embedding(Base):
    """An embedding item's vectors, one per input text, as float32 little-endian bytes back to back
    (4 bytes a dimension: a 576-dimension vector is 2.3 kB, a third of its JSON text)."""

    __tablename__ = "embeddings"

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    count: Mapped[int] = mapped_column(Integer)  # vectors
    dimensions: Mapped[int] = mapped_column(Integer)
    vectors: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class Worker(Base):
    """A running `gristmill worker`: what its engine can take at once, so producers size chunks to fit."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # the Celery hostname: name-pid@host
    model: Mapped[str] = mapped_column(String(512), index=True)
    engine: Mapped[str] = mapped_column(String(32))
    max_num_seqs: Mapped[int] = mapped_column(Integer)
    kinds: Mapped[list[str]] = mapped_column(JSON, default=list)  # the task kinds its engine serves
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    seen_at: Mapped[datetime] = mapped_column(Timestamp)  # heartbeat: a worker unseen for long is gone
    chunks_in_flight: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # at the last heartbeat
    busy_fraction: Mapped[float | None] = mapped_column(Float)  # engine time in steps / wall time, last interval


class ApiKey(Base):
    """A key of the HTTP API: it belongs to a project and sees only that project's files and batches,
    unless it is an admin key. Only a salted HMAC-SHA256 of the key is stored (producer.keys)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    project: Mapped[str] = mapped_column(String(128))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    lookup: Mapped[str] = mapped_column(String(16), index=True)  # the key's first characters: finds its row
    salt: Mapped[str] = mapped_column(String(32))
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)


class File(Base):
    """An uploaded file (the HTTP API's Files), its bytes in `file_chunks` so every API replica and worker
    reaches it through the database, and so it is written and read as a stream."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_project_created", "project", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "file-..."
    project: Mapped[str] = mapped_column(String(128))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class FileChunk(Base):
    """One piece of a file's bytes, in order."""

    __tablename__ = "file_chunks"

    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class RequestCount(Base):
    """Requests of one project of the HTTP API in one minute: a fixed-window rate limit every API
    replica shares."""

    __tablename__ = "request_counts"

    project: Mapped[str] = mapped_column(String(128), primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # Unix time // 60
    count: Mapped[int] = mapped_column(Integer)


class CachedResult(Base):
    """A result kept for reuse, by the content address of its request (schema.cache): the rows that made
    an item's answer (results, classifications, embeddings), without the item's own ids."""

    __tablename__ = "result_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    rows: Mapped[dict[str, Any]] = mapped_column(Json)  # table name -> column values
    engine: Mapped[str | None] = mapped_column(String(32))  # what computed it (the first answer is canonical)
    engine_s: Mapped[float | None] = mapped_column(Float)  # its share of its chunk's engine time: what a hit saves
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class ScheduleRun(Base):
    """One firing of a schedule: unique per (schedule, slot), so a second beat, or a beat restarted,
    finds the slot taken and does nothing."""

    __tablename__ = "schedule_runs"
    __table_args__ = (UniqueConstraint("schedule", "slot"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    schedule: Mapped[str] = mapped_column(String(128))
    slot: Mapped[datetime] = mapped_column(Timestamp)  # the cron time it is for (a manual run: when asked)
    manual: Mapped[bool] = mapped_column(Boolean, default=False)  # `schedule run --force`: not a cron slot
    status: Mapped[str] = mapped_column(String(16))  # started | running | succeeded | failed
    batch_id: Mapped[str | None] = mapped_column(String(64))
    since: Mapped[datetime | None] = mapped_column(Timestamp)  # the SQL source's watermark it read from
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    items: Mapped[int] = mapped_column(Integer, default=0)
    new: Mapped[int] = mapped_column(Integer, default=0)  # items whose id no earlier run of it had
    changed: Mapped[int] = mapped_column(Integer, default=0)  # known id, new content
    unchanged: Mapped[int] = mapped_column(Integer, default=0)  # answered from the cache
    failed: Mapped[int] = mapped_column(Integer, default=0)
    engine_s_saved: Mapped[float] = mapped_column(Float, default=0.0)  # what the cached items cost to compute
    error: Mapped[str | None] = mapped_column(Text)


class ScheduleItem(Base):
    """The content hash of each item a schedule's runs have read (a glob: the latest run's files), to count
    new and changed items; what reaches an engine is the result cache's decision, not this."""

    __tablename__ = "schedule_items"

    schedule: Mapped[str] = mapped_column(String(128), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64))


class BeatLock(Base):
    """Who runs the beat: a lease renewed while it lives; a standby takes it over once it lapses."""

    __tablename__ = "beat_locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(Timestamp)


class Evaluation(Base):
    """A classification batch checked against gold labels (producer.evaluation): the counts of what matched
    and the metrics; the latest of a batch is what `stats` and the dashboard show."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    gold_file: Mapped[str] = mapped_column(Text)  # the name it was given as
    matched: Mapped[int] = mapped_column(Integer)  # items with an answer and a gold label: what the metrics cover
    missing_gold: Mapped[int] = mapped_column(Integer)  # the batch's items without a gold line
    unknown_ids: Mapped[int] = mapped_column(Integer)  # gold lines whose id is not in the batch
    unanswered: Mapped[int] = mapped_column(Integer)  # gold lines whose item has no answer (failed, not run yet)
    metrics: Mapped[dict[str, Any]] = mapped_column(Json)  # accuracy, macro_f1, ece, per_label, confusion_matrix


class Probe(Base):
    """A classifier learned from labelled texts (`--method probe --train`): a logistic regression on the
    model's hidden states at one layer. Its id is its content's hash (model, layer, labels, training set),
    so the same training set submitted again is the same probe, trained once; a worker trains it on the
    first chunk that needs it, and every batch that names the id reuses it."""

    __tablename__ = "probes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    model: Mapped[str] = mapped_column(String(255))
    layer: Mapped[int | None] = mapped_column(Integer)  # hidden state read (1: the first layer's output); None until
    # trained when not asked: the worker takes the middle layer
    labels: Mapped[list[str]] = mapped_column(Json)
    multi_label: Mapped[bool] = mapped_column(Boolean)
    training: Mapped[list[dict[str, Any]]] = mapped_column(Json)  # the examples {text, label | labels}
    version: Mapped[int | None] = mapped_column(Integer)  # of the weights' format; None until trained
    weights: Mapped[dict[str, Any] | None] = mapped_column(Json)  # scaler and coefficients (worker.kinds.probe)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(Json)  # cross-validated accuracy, strength, counts
    trained_at: Mapped[datetime | None] = mapped_column(Timestamp)
    trained_by: Mapped[str | None] = mapped_column(String(255))  # the worker
