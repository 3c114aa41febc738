"""Where a schedule's results go besides gristmill's own SQL: a table of the user's database, upserted by
item id (a column per field of the kind's CSV export: output, label, probabilities, extracted fields,
...), and/or JSONL and CSV files at a path template ({date}: the slot's date in the schedule's zone,
{name}: the schedule). Files are written atomically; a failure raises SinkError and the run fails."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, Text, create_engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from producer import export
from producer.schedules import Schedule
from producer.service import Service
from schema.errors import GristmillError
from schema.settings import redact

ROWS_PER_STATEMENT = 1000


class SinkError(GristmillError):
    """A sink could not take the results; they stay in gristmill's SQL and the next run sends them again."""


def deliver(service: Service, schedule: Schedule, batch_id: str, slot: datetime) -> None:
    sink = schedule.sink
    if sink is None:
        return
    fields = {"date": slot.astimezone(schedule.zone).date().isoformat(), "name": schedule.name}
    try:
        for fmt in ("jsonl", "csv"):
            template = getattr(sink, fmt)
            if template:
                path = Path(template.format(**fields))
                path.parent.mkdir(parents=True, exist_ok=True)
                export.write(service, batch_id, path, None, fmt)
    except (OSError, KeyError) as exc:
        raise SinkError(f"schedule {schedule.name!r}: writing its results file failed: {exc}") from exc
    if sink.sql_table:
        upsert(service, batch_id, sink.sql_table, sink.database_url())


def upsert(service: Service, batch_id: str, table_name: str, url: str) -> None:
    """Insert or update one row per finished item, keyed by its id (the source's)."""
    columns, rows = service.csv(batch_id)
    fields = [c for c in columns if c != "custom_id"]
    table = Table(table_name, MetaData(), Column("id", String(512), primary_key=True),
                  *(Column(name, Text) for name in fields), Column("batch_id", String(64)))
    engine = create_engine(url)
    try:
        table.create(engine, checkfirst=True)
        insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
        with engine.begin() as conn:
            batch: list[dict[str, Any]] = []
            for _, row in rows:
                batch.append({"id": row["custom_id"], "batch_id": batch_id,
                              **{name: _text(row.get(name)) for name in fields}})
                if len(batch) == ROWS_PER_STATEMENT:
                    _write(conn, table, insert, batch)
                    batch = []
            if batch:
                _write(conn, table, insert, batch)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc)
        raise SinkError(f"upserting into {table_name} on {redact(url)} failed: {redact(reason)[:300]}") from exc
    finally:
        engine.dispose()


def _write(conn: Any, table: Table, insert: Any, rows: list[dict[str, Any]]) -> None:
    stmt = insert(table)
    conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_={
        c.name: stmt.excluded[c.name] for c in table.columns if c.name != "id"}), rows)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)
