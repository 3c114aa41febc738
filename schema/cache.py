"""The result cache: an item whose request was answered before is answered again from SQL, with no engine.

An item's key is the sha256 of everything that decides its answer: the kind and its version, the model
(name and revision: its files' sizes and times, which change with its weights, tokenizer and chat
template), the kind's spec with every default filled in (labels, schema, instruction, calibration,
sampling) and the item's request as the worker runs it (messages or text, with its own sampling). Only
deterministic requests get a key (greedy, or sampling with a fixed seed); classification and embeddings
always are. Submission looks the keys up and stores hits as finished items (their rows copied), and so
does the worker when it claims a chunk (an identical request of another batch may have finished since:
it is not computed twice); the worker keeps each new answer under its key (the first answer is canonical: vLLM is not bit-exact
across batch compositions at temperature 0). Cached rows are whatever makes an item's answer: its
results, classifications and embeddings rows, without the item's own ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    Insert,
    LargeBinary,
    Select,
    String,
    bindparam,
    func,
    insert,
    lateral,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from schema.db import among, built_once, rows_json, rows_table
from schema.models import resolve_model
from schema.states import ItemStatus
from schema.tables import Batch, CachedResult, Classification, Embedding, Item, Result, table_of

VERSION = 1  # bump when what a key covers changes: every earlier key then misses
ANSWER_TABLES: tuple[Any, ...] = (Result, Classification, Embedding)  # rows keyed by item_id that make up an item's answer
ITEM_COLUMNS = ("item_id", "batch_id", "custom_id", "created_at")


def item_key(kind: str, kind_version: int, model: str, spec: BaseModel, request: BaseModel) -> str | None:
    """The item's content address; None when its answer may differ from run to run (sampled, no seed)."""
    return keyer(kind, kind_version, model, spec)(request)


def keyer(kind: str, kind_version: int, model: str, spec: BaseModel) -> Callable[[BaseModel], str | None]:
    """item_key for many requests of one batch: what they share is serialised once."""
    shared = json.dumps({"v": VERSION, "kind": kind, "kind_version": kind_version, "model": model,
                         "revision": model_revision(model), "spec": spec.model_dump(mode="json")},
                        sort_keys=True, separators=(",", ":")).encode()

    def key(request: BaseModel) -> str | None:
        sampling = getattr(request, "sampling", None) or getattr(spec, "sampling", None)
        if sampling is not None and sampling.temperature > 0 and sampling.seed is None:
            return None
        digest = hashlib.sha256(shared)
        digest.update(b"\x00" + request.model_dump_json().encode())  # pydantic's order: the model's fields
        return digest.hexdigest()

    return key


@functools.lru_cache(maxsize=32)
def model_revision(model: str) -> str:
    """The model's files, by name, size and modification time (cheap; weights are not read)."""
    try:
        source = resolve_model(model)
    except Exception:  # noqa: BLE001  # a model this host cannot see: its name is all there is
        return "unresolved"
    files = sorted(p for p in source.folder.iterdir() if p.is_file())
    if source.gguf_file is not None:
        files = [source.folder / source.gguf_file]
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


def lookup(session: Session, keys: Iterable[str]) -> dict[str, CachedResult]:
    wanted = list(set(keys))
    found: dict[str, CachedResult] = {}
    for start in range(0, len(wanted), 5000):  # bounded IN lists (SQLite)
        found.update({c.key: c for c in session.scalars(_lookup(session), {"keys": wanted[start:start + 5000]})})
    return found


@built_once
def _lookup(dialect: str) -> Select[CachedResult]:
    return select(CachedResult).where(among(dialect, CachedResult.key, type_=String, param="keys"))


def keys_answered(session: Session, batch_id: str) -> list[str]:
    """The keys of the batch's items that have a cached answer: one join, whatever the batch's size."""
    return list(session.scalars(select(Item.cache_key).distinct().join(CachedResult, CachedResult.key == Item.cache_key)
                                .where(Item.batch_id == batch_id)))


def answer(session: Session, batch_id: str, keys: Iterable[str], status: str, now: datetime,
           item_ids: list[int] | None = None, holding: Any = None) -> list[int]:
    """Items of the batch in `status` (of `item_ids` and under the condition `holding`, when given: a
    claim's lease) whose key has a cached answer: succeeded now, their answer's rows copied, counted in
    the batch's counters; returns their ids."""
    found = lookup(session, keys)
    if not found:
        return []
    query = select(Item).where(Item.batch_id == batch_id, Item.status == status, Item.cache_key.in_(list(found)))
    if item_ids is not None:
        query = query.where(Item.id.in_(item_ids))
    if holding is not None:
        query = query.where(holding)
    hits = [(item, found[item.cache_key]) for item in session.scalars(query) if item.cache_key]
    for item, _ in hits:
        item.status, item.cached, item.finished_at, item.lease_expires_at = ItemStatus.succeeded, True, now, None
    session.flush()
    restore(session, hits, now)
    if hits:
        session.execute(update(Batch).where(Batch.id == batch_id).values(
            succeeded=Batch.succeeded + len(hits), cached=Batch.cached + len(hits)))
    return [item.id for item, _ in hits]


def restore(session: Session, hits: list[tuple[Item, CachedResult]], now: datetime) -> None:
    """Write each hit's cached rows as its item's answer."""
    for table in ANSWER_TABLES:
        rows = [{**_decoded(table, cached.rows[table.__tablename__]), "item_id": item.id, "batch_id": item.batch_id,
                 "custom_id": item.custom_id, "created_at": now}
                for item, cached in hits if table.__tablename__ in cached.rows]
        if rows:
            session.execute(insert(table), rows)


def remember(session: Session, keyed: dict[int, str], kind: str, engine: str, now: datetime,
             engine_s_each: float | None = None, tables: tuple[Any, ...] = ANSWER_TABLES) -> None:
    """Keep the answers of these items, just computed, under their keys ({item id: key}; a key already
    kept stays as it is), made of their rows in `tables` (the kind's answer_tables: an item missing one
    of them is not kept); `engine_s_each`: each one's share of its chunk's engine time. One statement:
    the database builds each answer's JSON, nothing is read back into Python."""
    session.execute(_remember(session, tables), {"k": rows_json(list(keyed.items())), "of_kind": kind,
                                                 "by_engine": engine, "engine_s_each": engine_s_each, "now": now})


@built_once
def _remember(dialect: str, tables: tuple[Any, ...]) -> Insert:
    k = rows_table(dialect, "k", {"item_id": BigInteger, "key": String})
    sources = {table.__tablename__: _answer_row(dialect, table, k.c.item_id) for table in tables}
    rows = select(k.c.key, bindparam("of_kind", type_=String()), _answer_json(dialect, sources),
                  bindparam("by_engine", type_=String()), bindparam("engine_s_each", type_=Float()),
                  bindparam("now", type_=DateTime(timezone=True))).select_from(k)
    for table, source in zip(tables, sources.values(), strict=True):
        rows = rows.join(source, true() if dialect == "postgresql" else table.item_id == k.c.item_id)
    upsert = pg_insert if dialect == "postgresql" else sqlite_insert
    columns = ["key", "kind", "rows", "engine", "engine_s", "created_at"]
    # WHERE true: SQLite parses `ON CONFLICT` after `INSERT ... SELECT` only when the SELECT has a WHERE.
    return (upsert(table_of(CachedResult)).from_select(columns, rows.where(true()))
            .on_conflict_do_nothing(index_elements=["key"]))


def _answer_row(dialect: str, table: Any, item_id: Any) -> Any:
    """The item's row of an answer table to join. On PostgreSQL a lateral lookup by key: psycopg prepares
    a statement run 5 times, and PostgreSQL then keeps the plan it made for the tables as they were, so a
    join planned while `results` was nearly empty (a new database's first chunks) read all of it for
    every chunk after (36 ms a chunk at 200,000 items, instead of 1); a lateral subquery with LIMIT
    cannot be hashed, and is looked up by key whatever size the plan was made for."""
    if dialect != "postgresql":
        return table_of(table)
    return lateral(select(table_of(table)).where(table.item_id == item_id).limit(1)).alias(f"{table.__tablename__}_row")


def _answer_json(dialect: str, sources: dict[str, Any]) -> Any:
    """SQL for {table name: {column: value}} of an item's answer rows (`sources`: each table's row to
    read, by table name), less the item's own columns; binary values as hex, as `_decoded` reads them."""
    postgres = dialect == "postgresql"
    build = func.jsonb_build_object if postgres else func.json_object
    answer = []
    for name, source in sources.items():
        values = []
        for column in source.c:
            if column.name not in ITEM_COLUMNS:
                values += [literal_column(f"'{column.name}'"), _json_value(column, postgres)]
        answer += [literal_column(f"'{name}'"), build(*values)]
    return build(*answer)


def _json_value(column: Any, postgres: bool) -> Any:
    if isinstance(column.type, LargeBinary):
        return func.encode(column, "hex") if postgres else func.lower(func.hex(column))
    if postgres:
        return column
    if isinstance(column.type, JSON):  # SQLite keeps JSON as text: nest it, not a string of it
        return func.json(column)
    return column


def _decoded(table: Any, values: dict[str, Any]) -> dict[str, Any]:
    binary = {c.name for c in table.__table__.columns if isinstance(c.type, LargeBinary)}
    return {name: bytes.fromhex(v) if name in binary else v for name, v in values.items()}


def engine_s_saved(session: Session, batch_id: str) -> float:
    """The engine seconds the batch's cached items cost when they were computed."""
    return float(session.scalar(select(func.coalesce(func.sum(CachedResult.engine_s), 0.0))
                                .join(Item, Item.cache_key == CachedResult.key)
                                .where(Item.batch_id == batch_id, Item.cached.is_(True))) or 0.0)
