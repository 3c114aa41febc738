"""Documents longer than the model's context, through submission, a real engine (vLLM, the default
model at its own 8,192-token context) and export: they fail with context_length_exceeded unless the
batch asks to truncate, and then the answer comes from the part kept. A secret word stands at each end
of a document about three times the context; the instruction (the system prompt) is never cut."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sqlalchemy import select

from producer import api
from schema.db import get_sessionmaker
from schema.jobs import SamplingParams
from schema.queue import Queue
from schema.tables import Item
from tests.conftest import gristmill
from worker import executor
from worker.runtime import Runtime

QUESTION = "What is the secret word in the user's text? Answer with the word only."
DOCUMENT = "The secret word is PINEAPPLE.\n" + "Nothing happened today. " * 6000 + "\nThe secret word is MANGO."
KEPT = 600  # prompt tokens kept (truncate_to): the answer must come from the part kept, whatever the context


def run(settings: Any, engine: Any, path: Path, **options: Any) -> api.BatchHandle:
    handle = api.submit(path, settings=settings, **options)
    with get_sessionmaker(settings.database_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id, Item.status == "queued")))
    executor.run_chunk(Runtime(settings, *engine, queue=Queue(settings)), handle.id, ids)
    assert handle.status().done
    return handle


def only_line(handle: api.BatchHandle) -> dict[str, Any]:
    (record,) = list(handle.output())
    return json.loads(record.line.model_dump_json())


def test_too_long_fails_or_keeps_the_part_asked_for(sqlite_url: str, settings_for, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    vllm_loop: Any) -> None:
    settings = settings_for(sqlite_url)
    assert vllm_loop[0].max_model_len == 8192  # the model's own: the document is about 3x that
    simple = tmp_path / "doc.jsonl"
    simple.write_text(json.dumps({"id": "doc", "text": DOCUMENT}) + "\n")

    failed = only_line(run(settings, vllm_loop, simple, system_prompt=QUESTION))
    assert failed["error"]["code"] == "context_length_exceeded" and "context is 8192" in failed["error"]["message"]

    answers = {}
    for keep in ("head", "tail"):
        handle = run(settings, vllm_loop, simple, system_prompt=QUESTION,
                     sampling=SamplingParams(max_tokens=8, truncate=keep, truncate_to=KEPT))
        line = only_line(handle)
        usage = line["response"]["body"]["usage"]
        assert usage["prompt_tokens"] <= KEPT and usage["truncated_tokens"] > 20_000
        answers[keep] = line["response"]["body"]["choices"][0]["message"]["content"]
        stats = handle.stats()
        assert (stats["truncated_items"], stats["truncated_tokens"]) == (1, usage["truncated_tokens"])
    assert "PINEAPPLE" in answers["head"] and "MANGO" not in answers["head"]
    assert "MANGO" in answers["tail"] and "PINEAPPLE" not in answers["tail"]

    # CSV export carries the count; an untruncated item's usage has no such field
    gristmill("results", handle.id, "-o", "out.csv", "--format", "csv", settings=settings, cwd=tmp_path)
    (row,) = csv.DictReader((tmp_path / "out.csv").open())
    assert int(row["truncated_tokens"]) == usage["truncated_tokens"]


def test_openai_lines_with_truncate_prompt_tokens(sqlite_url: str, settings_for, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                 vllm_loop: Any) -> None:
    """vLLM's truncate_prompt_tokens extension in a batch body: the prompt keeps at most that many tokens,
    the document's tail (as vLLM keeps a prompt's last tokens), the system message whole."""
    settings = settings_for(sqlite_url)
    path = tmp_path / "batch.jsonl"

    def line(custom_id: str, **extra: Any) -> str:
        body = {"model": settings.model, "max_tokens": 8, "messages": [
            {"role": "system", "content": QUESTION}, {"role": "user", "content": DOCUMENT}], **extra}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"

    path.write_text(line("cut", truncate_prompt_tokens=KEPT) + line("short", messages=[
        {"role": "user", "content": "Say hello."}]))
    handle = api.submit(path, settings=settings)
    with get_sessionmaker(settings.database_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id)))
    executor.run_chunk(Runtime(settings, *vllm_loop, queue=Queue(settings)), handle.id, ids)
    lines = {r.line.custom_id: json.loads(r.line.model_dump_json()) for r in handle.output()}
    cut = lines["cut"]["response"]["body"]
    assert "MANGO" in cut["choices"][0]["message"]["content"]
    assert cut["usage"]["prompt_tokens"] <= KEPT and cut["usage"]["truncated_tokens"] > 20_000
    assert "truncated_tokens" not in lines["short"]["response"]["body"]["usage"]
