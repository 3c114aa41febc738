"""What commands print and log: JSON log lines for log shippers, and settings errors as one line."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from schema.db import get_sessionmaker
from schema.tables import EngineBatch
from tests.conftest import gristmill

NULL = "bench.null_engine:NullEngine"


def test_json_logs(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """GRISTMILL_LOG_FORMAT=json: the log file holds one JSON object per line, and each finished chunk's
    line carries the batch, the chunk's id in SQL, the worker and its durations."""
    settings = settings_for(sqlite_url, log_format="json", chunk_size=7)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) + "\n"
                                               for i in range(40)))
    proc = gristmill("run", "in.jsonl", "-o", "out.jsonl", "--engine", NULL, settings=settings, cwd=tmp_path)
    batch_id = proc.stderr.split()[1]
    records = [json.loads(line) for line in (settings.home / "gristmill.log").read_text().splitlines()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    chunks = [r for r in records if "chunk_id" in r]
    with get_sessionmaker(sqlite_url)() as session:
        in_sql = dict(session.execute(select(EngineBatch.id, EngineBatch.n_items)).all())
    assert {r["chunk_id"]: r["items"] for r in chunks} == in_sql and sum(in_sql.values()) == 40
    for record in chunks:
        assert record["batch_id"] == batch_id and record["worker"] and record["level"] == "INFO"
        assert record["engine_s"] >= 0 and record["write_s"] > 0 and record["kind"] == "generate"
    assert any(r.get("engine_start_s") is not None for r in records)  # the engine-loaded line


def test_a_bad_setting_is_one_line(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    env_settings = settings.model_copy(update={"log_format": "yaml"})
    proc = gristmill("status", settings=env_settings, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: GRISTMILL_LOG_FORMAT: Input should be 'text' or 'json' (got 'yaml')"]
