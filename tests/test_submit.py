"""Submission on both databases: bad files write nothing and queue nothing; good files store every item."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import event, func, select

from producer import api
from schema.db import get_engine, get_sessionmaker, upgrade
from schema.errors import InputError
from schema.queue import queue_for
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, Item
from tests.conftest import gristmill, messages_waiting

CHAT = {"method": "POST", "url": "/v1/chat/completions"}


def chat_line(custom_id: str, text: str = "Hello", **body: object) -> str:
    return json.dumps({"custom_id": custom_id, **CHAT,
                       "body": {"messages": [{"role": "user", "content": text}], **body}})


BAD_FILES = {
    "not json": ([chat_line("a"), "{not json"], 2, "not valid JSON"),
    "missing custom_id": ([chat_line("a"), json.dumps({**CHAT, "body": {"messages": []}})], 2, "custom_id"),
    "duplicate custom_id": ([chat_line("a"), chat_line("b"), chat_line("a")], 3, "duplicate"),
    "unknown url": ([json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                                 "body": {"input": "x"}})], 1, "url"),
    "empty file": ([], None, "no requests"),
    "bad temperature": ([chat_line("a", temperature=9)], 1, "body.temperature"),
}


def count_rows(url: str) -> tuple[int, int]:
    upgrade(url)
    with get_sessionmaker(url)() as session:
        return (session.scalar(select(func.count()).select_from(Batch)) or 0,
                session.scalar(select(func.count()).select_from(Item)) or 0)


def queued_messages(settings) -> int:  # type: ignore[no-untyped-def]
    if settings.broker_url.startswith("redis"):
        return messages_waiting(redis.Redis.from_url(settings.broker_url), queue_for(settings.model, "generate"))
    folder = settings.broker_folder / "queue"
    return len(list(folder.glob("*"))) if folder.exists() else 0


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_writes_nothing(case: str, db_url: str, settings_for, tmp_path: Path) -> None:
    lines, line_no, needle = BAD_FILES[case]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    settings = settings_for(db_url)
    with pytest.raises(InputError) as err:
        api.submit(path, settings=settings)
    assert err.value.path == str(path) and err.value.line == line_no
    assert needle in str(err.value)
    assert count_rows(db_url) == (0, 0)
    assert queued_messages(settings) == 0


def test_cli_bad_file_exit_code_and_message(sqlite_url: str, settings_for, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(chat_line("a") + "\n" + chat_line("a") + "\n")
    proc = gristmill("submit", str(path), settings=settings_for(sqlite_url), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"{path}:2" in proc.stderr and "custom_id" in proc.stderr and "line 1" in proc.stderr
    assert count_rows(sqlite_url) == (0, 0)


def test_line_over_size_limit(db_url: str, settings_for, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(chat_line("a") + "\n" + chat_line("b", "x" * 5000) + "\n")
    with pytest.raises(InputError, match=r":2: .*bytes"):
        api.submit(path, settings=settings_for(db_url, max_line_bytes=1000))
    assert count_rows(db_url) == (0, 0)


def test_unrunnable_lines_fail_alone(db_url: str, settings_for, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([chat_line("ok"), chat_line("other-model", model="gpt-4o"),
                               chat_line("streamed", stream=True)]) + "\n")
    settings = settings_for(db_url)
    handle = api.submit(path, settings=settings)
    info = handle.status()
    assert info.status == BatchStatus.in_progress
    assert (info.request_counts.total, info.request_counts.failed) == (3, 2)
    with get_sessionmaker(db_url)() as session:
        items = {i.custom_id: i for i in session.scalars(select(Item).where(Item.batch_id == handle.id))}
    assert items["ok"].status == ItemStatus.queued
    assert items["other-model"].status == ItemStatus.failed and "gpt-4o" in (items["other-model"].last_error or "")
    assert items["streamed"].status == ItemStatus.failed and "stream" in (items["streamed"].last_error or "")
    assert queued_messages(settings) == 1


def test_simple_format_and_cancel(db_url: str, settings_for, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(130)))
    settings = settings_for(db_url, chunk_size=64)
    handle = api.submit(path, settings=settings, metadata={"team": "search"})
    assert queued_messages(settings) == 3  # 64 + 64 + 2
    info = handle.cancel()
    assert info.status == BatchStatus.cancelled and info.metadata == {"team": "search"}
    out = tmp_path / "out.jsonl"
    counts = handle.results(out)
    assert (counts.succeeded, counts.failed) == (0, 130)
    first = json.loads(out.read_text().splitlines()[0])
    assert first["custom_id"] == "d0" and first["error"]["code"] == "batch_cancelled"


def test_bulk_insert_round_trips(pg_url: str, settings_for, tmp_path: Path) -> None:
    """10,000 items must not cost 10,000 statements."""
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(10_000)))
    settings = settings_for(pg_url)
    upgrade(pg_url)
    statements: list[str] = []
    listener = lambda *a: statements.append(a[2])
    event.listen(get_engine(pg_url), "before_cursor_execute", listener)
    try:
        began = time.perf_counter()
        handle = api.submit(path, settings=settings)
        elapsed = time.perf_counter() - began
    finally:
        event.remove(get_engine(pg_url), "before_cursor_execute", listener)
    # The items go in by one COPY (not seen by this hook) or a few multi-row INSERTs: never one per item.
    assert len(statements) <= 30, len(statements)
    assert handle.status().request_counts.total == 10_000
    # The planner learns of the new rows before the first claim (claims by id, not a batch scan).
    assert "ANALYZE items (id, batch_id, status)" in statements
    with get_engine(pg_url).connect() as conn:
        plan = "\n".join(conn.exec_driver_sql(
            "EXPLAIN UPDATE items SET attempts = attempts + 1 WHERE id IN (5000, 5001, 5002) "
            "AND batch_id = %(b)s AND status = 'queued'", {"b": handle.id}).scalars())
    # Either index keyed by id will do (items_pkey, or ix_items_queued which holds only queued items).
    assert "Index Cond: (id = ANY" in plan and "Seq Scan" not in plan, plan
    print(f"submitted 10,000 items to PostgreSQL in {elapsed:.2f} s")
