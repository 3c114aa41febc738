"""The result cache on the real transformers engine: a repeated deterministic request is answered from SQL
with no engine call (its rows copied, its batch complete at submission); anything that decides the answer
(a sampling parameter, the model, the labels) changes the key; sampled requests are never cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from producer import api
from schema import cache, kinds
from schema.db import get_sessionmaker
from schema.jobs import SamplingParams
from schema.kinds.generate import GenerateSpec
from schema.queue import Queue
from schema.states import BatchStatus
from schema.tables import CachedResult, Item
from tests.conftest import MODEL, gristmill
from tests.fault_engine import CountingEngine
from worker import executor
from worker.engine_loop import EngineLoop
from worker.runtime import Runtime

TEXTS = {"a": "Name a colour.", "b": "Name a fruit.", "c": "Name an animal."}


def run(settings: Any, handle: api.BatchHandle, engine: Any) -> int:
    """Run the batch's queued items in one chunk on the engine; how many reached it."""
    with get_sessionmaker(settings.database_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id, Item.status == "queued")))
    if ids:
        executor.run_chunk(Runtime(settings, *engine, queue=Queue(settings)), handle.id, ids)
    return len(ids)


def outputs(handle: api.BatchHandle) -> dict[str, str]:
    return {r.line.custom_id: r.line.response.body.choices[0].message.content  # type: ignore[attr-defined]
            for r in handle.output()}


def test_a_repeated_request_is_answered_from_the_cache(sqlite_url: str, settings_for, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       transformers_loop) -> None:
    settings = settings_for(sqlite_url)
    docs = tmp_path / "in.jsonl"
    docs.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in TEXTS.items()))
    greedy = SamplingParams(max_tokens=8)
    first = api.submit(docs, settings=settings, sampling=greedy)
    assert run(settings, first, transformers_loop) == 3
    again = api.submit(docs, settings=settings, sampling=greedy)
    assert run(settings, again, transformers_loop) == 0  # nothing left for an engine
    info = again.status()
    assert info.status == BatchStatus.completed and info.request_counts.cached == 3
    assert outputs(again) == outputs(first)

    docs.write_text(docs.read_text() + json.dumps({"id": "d", "text": "Name a tree."}) + "\n")  # one more line
    grown = api.submit(docs, settings=settings, sampling=greedy)
    assert run(settings, grown, transformers_loop) == 1 and grown.status().request_counts.cached == 3
    longer = api.submit(docs, settings=settings, sampling=SamplingParams(max_tokens=9))  # another parameter
    assert longer.status().request_counts.cached == 0
    assert api.submit(docs, settings=settings, sampling=greedy, cache=False).status().request_counts.cached == 0
    sampled = api.submit(docs, settings=settings, sampling=SamplingParams(max_tokens=8, temperature=0.8))
    with get_sessionmaker(settings.database_url)() as session:
        assert session.scalar(select(func.count()).select_from(Item).where(
            Item.batch_id == sampled.id, Item.cache_key.is_not(None))) == 0  # never cached
        assert session.scalar(select(func.count()).select_from(CachedResult)) == 4
    for flags, cached in (([], 4), (["--no-cache"], 0)):  # the CLI: on by default, off on request
        batch_id = gristmill("submit", str(docs), "--max-tokens", "8", *flags, settings=settings, cwd=tmp_path).stdout
        assert api.open_batch(batch_id.strip(), settings).status().request_counts.cached == cached


def test_a_key_covers_what_decides_the_answer() -> None:
    spec = GenerateSpec()
    request = spec.sampling  # any pydantic model stands for a request here
    key = cache.item_key("generate", 1, "smollm2-135m-instruct", spec, request)
    assert key is not None and len(key) == 64
    assert cache.item_key("generate", 2, "smollm2-135m-instruct", spec, request) != key  # the kind's version
    assert cache.item_key("generate", 1, "another-model", spec, request) != key
    assert cache.item_key("classify", 1, "smollm2-135m-instruct", spec, request) != key
    seeded = SamplingParams(temperature=0.8, seed=7)
    assert cache.item_key("generate", 1, "m", GenerateSpec(sampling=seeded), seeded) is not None
    assert cache.item_key("generate", 1, "m", GenerateSpec(sampling=SamplingParams(temperature=0.8)),
                          SamplingParams(temperature=0.8)) is None


def test_a_request_answered_while_its_twin_waited_is_not_computed_again(sqlite_url: str, settings_for,  # type: ignore[no-untyped-def]
                                                                        tmp_path: Path) -> None:
    """Two batches of the same requests submitted before either ran: the second's chunk, claimed after the
    first finished, is answered from the cache when it is claimed, not computed."""
    settings = settings_for(sqlite_url)
    docs = tmp_path / "in.jsonl"
    docs.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in TEXTS.items()))
    first, second = (api.submit(docs, settings=settings, sampling=SamplingParams(max_tokens=4)) for _ in range(2))
    assert second.status().request_counts.cached == 0  # nothing was cached yet
    engine = CountingEngine(MODEL)
    loop = EngineLoop(engine)
    try:
        for handle in (first, second):
            with get_sessionmaker(settings.database_url)() as session:
                ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id)))
            executor.run_chunk(Runtime(settings, engine, loop, queue=Queue(settings)), handle.id, ids)
    finally:
        loop.close()
    assert engine.received == 3  # the first batch's; the second's came from the cache
    info = second.status()
    assert info.status == BatchStatus.completed and info.request_counts.cached == 3
    assert outputs(second) == outputs(first)


@pytest.mark.parametrize("task, spec", [("generate", {"sampling": SamplingParams(max_tokens=4)}),
                                        ("classify", {"labels": ["colour", "fruit", "animal"]}),
                                        ("embed", {})])
def test_each_kinds_answer_comes_back_from_the_cache_as_it_was(db_url: str, settings_for, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               transformers_loop, task: str, spec: dict[str, Any]) -> None:
    """The database builds the cached answer (JSON, booleans, binary vectors, on either database); the
    rows a hit gets are the ones the engine's answer made."""
    settings = settings_for(db_url)
    docs = tmp_path / "in.jsonl"
    docs.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in TEXTS.items()))
    first = api.submit(docs, settings=settings, task=task, **spec)
    assert run(settings, first, transformers_loop) == 3 and first.status().request_counts.completed == 3
    again = api.submit(docs, settings=settings, task=task, **spec)
    assert again.status().request_counts.cached == 3
    tables = kinds.get(task).answer_tables
    assert len(tables) == (1 if task == "generate" else 2)
    for table in tables:
        assert answer_rows(settings, table, again) == answer_rows(settings, table, first), table.__tablename__


def answer_rows(settings: Any, table: Any, handle: api.BatchHandle) -> dict[str, dict[str, Any]]:
    with get_sessionmaker(settings.database_url)() as session:
        rows = session.scalars(select(table).where(table.batch_id == handle.id)).all()
        return {row.custom_id: {c.key: getattr(row, c.key) for c in table.__table__.columns
                                if c.name not in cache.ITEM_COLUMNS} for row in rows}
