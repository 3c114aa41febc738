"""Priorities: a real worker on Redis + PostgreSQL takes the chunks of more urgent batches first, and a
small batch submitted behind a huge one of the same priority starts after the huge one's first chunks."""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from producer import api
from schema.db import get_sessionmaker
from schema.errors import ConfigError
from schema.queue import (
    FULL_PRIORITY_CHUNKS,
    PRIORITY_SEP,
    PUBLISH_BATCH,
    Queue,
    broker_lists,
    parse_priority,
    queue_for,
)
from schema.tables import EngineBatch
from tests.conftest import gristmill
from tests.test_faults import Workers, assert_consistent, docs

NULL_ENGINE = "bench.null_engine:NullEngine"


def test_priority_names_and_levels() -> None:
    assert [parse_priority(p) for p in ("low", "normal", "HIGH", 0, "9")] == [2, 5, 8, 0, 9]
    for bad in ("urgent", "10", -1):
        with pytest.raises(ConfigError, match="priority must be high, normal, low or a level 0-9"):
            parse_priority(bad)


def test_urgent_batches_run_first_and_small_ones_are_not_stuck_behind_huge_ones(  # type: ignore[no-untyped-def]
        pg_url: str, redis_url: str, settings_for, tmp_path: Path) -> None:
    # One chunk at a time (inflight 1, prefetch 1): the order chunks ran in is the order Redis gave them.
    settings = settings_for(pg_url, redis_url, chunk_size=4, inflight_chunks=1)
    submitted = {}  # submitted before any worker runs: every message waits in Redis
    for name, n, priority in (("low", 40, "low"), ("huge", 80, "normal"), ("small", 4, "normal"), ("urgent", 8, "high")):
        folder = tmp_path / name
        folder.mkdir()
        handle = api.submit(docs(folder, n), settings=settings, check_workers=False, priority=priority, cache=False)
        submitted[handle.id] = name
    workers = Workers(settings, tmp_path)
    try:
        workers.start(NULL_ENGINE)
        for batch_id in submitted:
            assert api.open_batch(batch_id, settings).wait(timeout=120).status == "completed", workers.logs()
    finally:
        workers.stop_all()
    with get_sessionmaker(settings.database_url)() as session:
        ran = [submitted[b] for b in session.scalars(select(EngineBatch.batch_id).order_by(EngineBatch.id))]
    runs = [(name, len(list(group))) for name, group in itertools.groupby(ran)]
    # high first; then normal: the huge batch's first chunks, the small batch, the rest of the huge one;
    # then low. Each batch's later chunks go one level lower than its first FULL_PRIORITY_CHUNKS.
    assert runs == [("urgent", 2), ("huge", FULL_PRIORITY_CHUNKS), ("small", 1), ("huge", 20 - FULL_PRIORITY_CHUNKS),
                    ("low", 10)], runs
    for batch_id in submitted:
        assert sum(assert_consistent(settings, batch_id).values()) > 0


def test_a_bad_priority_is_one_line(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc = gristmill("submit", str(docs(tmp_path, 2)), "--priority", "urgent",
                     settings=settings_for(sqlite_url), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "priority must be high, normal, low or a level 0-9" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_chunks_sent_in_pipelined_batches_all_arrive_in_order(redis_url: str, settings_for) -> None:  # type: ignore[no-untyped-def]
    # More messages than one pipeline holds, so the batch flushes midway and at the end; none may be lost,
    # reordered, or put on the wrong priority list.
    count = 2 * PUBLISH_BATCH + 7
    chunks = [[3 * n, 3 * n + 1, 3 * n + 2] for n in range(count)]
    assert Queue(settings_for("sqlite://", redis_url)).send("batch_x", "m", "generate", chunks, priority=7) == count
    client = redis.Redis.from_url(redis_url)
    sent: dict[str, list[list[int]]] = {}
    for key in broker_lists(queue_for("m", "generate")):
        for raw in reversed(client.lrange(key, 0, -1)):  # LPUSH: the oldest message is last
            args, _, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
            assert args[0] == "batch_x"
            sent.setdefault(key.rsplit(PRIORITY_SEP, 1)[-1], []).append(args[1])
    # kombu's list for level L ends in 9 - L: the first FULL_PRIORITY_CHUNKS at 7, the rest at 6
    assert sent == {"2": chunks[:FULL_PRIORITY_CHUNKS], "3": chunks[FULL_PRIORITY_CHUNKS:]}
