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


def test_waiting_shows_the_phase_then_plain_progress_lines(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`status --wait` with stderr not a terminal: a line saying no worker runs the model yet, then, once
    one starts, how long that took and plain progress lines ending with the batch's last state."""
    import subprocess
    import sys
    import time

    from tests.conftest import cli_env
    from tests.test_http_api import start

    settings = settings_for(sqlite_url, reconcile_interval_s=1)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) + "\n"
                                               for i in range(30)))
    batch_id = gristmill("submit", "in.jsonl", settings=settings, cwd=tmp_path).stdout.strip()
    waiting = subprocess.Popen([sys.executable, "-m", "producer.cli", "status", batch_id, "--wait"],
                               env=cli_env(settings), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(3)
    worker = start(["worker", "--engine", NULL], settings, tmp_path, "worker.log")
    try:
        out, err = waiting.communicate(timeout=120)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    lines = err.splitlines()
    assert lines[0] == f"waiting for a worker that runs {settings.model} (gristmill worker --model {settings.model}) ..."
    assert lines[1].startswith(f"waiting for a worker that runs {settings.model}") and " done in " in lines[1]
    assert lines[-1].startswith("30/30 done (0 failed), completed")
    assert out.strip().startswith("30/30 done (0 failed), completed")  # status's answer, on stdout
