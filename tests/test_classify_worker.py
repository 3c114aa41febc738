"""A classification batch through the distributed path: submitted with the Python API to Redis and
PostgreSQL, run by a real `gristmill worker` process (transformers engine, the default model), exported,
every line re-parsed, and SQL holding exactly one result and one classification per item.

Redis is a test-owned redis-server, not conftest's shared one: a db number there is only unique within
one pytest process, and a worker from another run on the same db and queue would take this batch's
chunks (and this worker theirs)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from producer import api
from schema.db import get_sessionmaker
from schema.kinds.classify import ClassifyOutputLine
from schema.states import BatchStatus, ItemStatus
from schema.tables import Classification, Item, Result
from tests.test_faults import RedisServer, Workers, assert_consistent

REVIEWS = {
    "p1": "I love this phone, the battery lasts all day.",
    "p2": "Excellent sound quality and very comfortable.",
    "p3": "Works perfectly, I would buy it again.",
    "p4": "Great value for the money.",
    "p5": "Fast delivery and the product is wonderful.",
    "p6": "The screen is bright and beautiful.",
    "n1": "It broke after two days. Terrible.",
    "n2": "The worst headset I have ever owned.",
    "n3": "Stopped charging within a week, a waste of money.",
    "n4": "Awful customer service and a faulty product.",
    "n5": "The sound is muffled and the mic does not work.",
    "n6": "Very disappointed, I returned it.",
}
LABELS = ["positive", "negative"]


@pytest.mark.timeout(480)
def test_classify_batch_through_a_redis_worker(pg_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", appendonly=False)
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"id": key, "text": text}) + "\n" for key, text in REVIEWS.items()))
    settings = settings_for(pg_url, server.url, chunk_size=4)  # 3 chunks, each a Redis message
    group = Workers(settings, tmp_path)
    try:
        server.start()
        group.start("transformers")
        handle = api.submit(path, task="classify", labels=LABELS, instruction="What is the sentiment of this review?",
                            settings=settings)
        info = handle.wait(timeout=400)
    finally:
        group.stop_all()
        if server.proc is not None:
            server.stop()
    assert info.status == BatchStatus.completed, group.logs()
    assert assert_consistent(settings, handle.id) == {ItemStatus.succeeded: len(REVIEWS)}

    out, errors = tmp_path / "labels.jsonl", tmp_path / "errors.jsonl"
    counts = handle.results(out, errors)
    assert (counts.succeeded, counts.failed, counts.pending) == (len(REVIEWS), 0, 0)
    assert errors.read_text() == ""
    lines = [ClassifyOutputLine.model_validate_json(line) for line in out.read_text().splitlines()]
    assert [line.custom_id for line in lines] == list(REVIEWS)  # input order
    for line in lines:
        probabilities = line.probabilities or {}
        assert line.error is None and line.method == "score" and line.calibrated is True, line
        # Set, not order: PostgreSQL's JSONB keeps keys in its own order (SQLite keeps the labels' order).
        assert set(probabilities) == set(LABELS) and sum(probabilities.values()) == pytest.approx(1.0)
        assert line.label == max(probabilities, key=probabilities.__getitem__)
        assert line.raw_probabilities is not None and sum(line.raw_probabilities.values()) == pytest.approx(1.0)
    right = sum(line.label == ("positive" if line.custom_id[0] == "p" else "negative") for line in lines)
    assert right >= 9, [(line.custom_id, line.probabilities) for line in lines]  # plain reviews, a 135M model

    with get_sessionmaker(settings.database_url)() as session:
        items = dict(session.execute(select(Item.id, Item.custom_id).where(Item.batch_id == handle.id)).tuples().all())
        engines = set(session.scalars(select(Item.engine).where(Item.batch_id == handle.id)))
        results = Counter(session.scalars(select(Result.item_id).where(Result.batch_id == handle.id)))
        rows = session.scalars(select(Classification).where(Classification.batch_id == handle.id)).all()
        texts = dict(session.execute(select(Result.custom_id, Result.output_text)
                                     .where(Result.batch_id == handle.id)).tuples().all())
    assert engines == {"transformers"}
    assert results == Counter(items.keys())  # exactly one result per item
    assert Counter(row.item_id for row in rows) == Counter(items.keys())  # exactly one classification per item
    exported = {line.custom_id: line for line in lines}
    for row in rows:
        assert row.custom_id == items[row.item_id] and row.label == exported[row.custom_id].label
        assert row.probabilities == pytest.approx(exported[row.custom_id].probabilities)
    assert texts == {custom_id: line.label for custom_id, line in exported.items()}
