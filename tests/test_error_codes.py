"""Every failed item carries a code (schema.errors.ErrorCode), stored in SQL and exported as the OpenAI
error line's code; a deterministic failure fails its item at once, on the first attempt, without a retry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from producer import api
from schema.db import get_sessionmaker
from schema.jobs import SamplingParams
from schema.queue import Queue
from schema.states import BatchStatus, ItemStatus
from schema.tables import Item
from worker import executor
from worker.engine_loop import EngineLoop
from worker.runtime import Runtime

CHAT = "/v1/chat/completions"


@pytest.fixture
def engine(transformers_loop: tuple[Any, EngineLoop]) -> tuple[Any, EngineLoop]:
    return transformers_loop


def line(custom_id: str, content: str, **body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT,
                       "body": {"messages": [{"role": "user", "content": content}], **body}}) + "\n"


def run_all(settings: Any, handle: api.BatchHandle, engine: tuple[Any, EngineLoop]) -> dict[str, Item]:
    with get_sessionmaker(settings.database_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id, Item.status == "queued")))
    executor.run_chunk(Runtime(settings, *engine, queue=Queue(settings)), handle.id, ids)
    with get_sessionmaker(settings.database_url)() as session:
        return {i.custom_id: i for i in session.scalars(select(Item).where(Item.batch_id == handle.id))}


def test_generation_failures_have_codes_and_are_not_retried(db_url: str, settings_for, tmp_path: Path,
                                                             engine: tuple[Any, EngineLoop]) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(db_url)
    path = tmp_path / "in.jsonl"
    path.write_text(line("ok", "Say hi.") + line("long", "word " * 9000) + line("other", "x", model="gpt-4o")
                    + line("stream", "x", stream=True) + line("n", "x", n=2))
    handle = api.submit(path, settings=settings, sampling=SamplingParams(max_tokens=4))
    items = run_all(settings, handle, engine)
    assert handle.status().status == BatchStatus.completed
    expected = {"ok": None, "long": "context_length_exceeded", "other": "model_not_found",
                "stream": "unsupported", "n": "unsupported"}
    assert {c: i.error_code for c, i in items.items()} == expected
    assert items["long"].status == ItemStatus.failed and items["long"].attempts == 1  # failed at once
    exported = {r.line.custom_id: r.line for r in handle.output()}
    assert {c: (ln.error.code if ln.error else None) for c, ln in exported.items()} == expected  # type: ignore[union-attr]


def test_classification_failures_have_codes(sqlite_url: str, settings_for, tmp_path: Path,
                                            engine: tuple[Any, EngineLoop]) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "ok", "text": "I love it."}) + "\n"
                    + json.dumps({"id": "long", "text": "word " * 9000}) + "\n")
    handle = api.submit(path, settings=settings, task="classify", labels=["positive", "negative"])
    items = run_all(settings, handle, engine)
    assert (items["ok"].status, items["long"].status) == (ItemStatus.succeeded, ItemStatus.failed)
    assert items["long"].error_code == "context_length_exceeded" and items["long"].attempts == 1
    out = tmp_path / "out.csv"
    handle.results(out, fmt="csv")
    assert "context_length_exceeded" in out.read_text()
