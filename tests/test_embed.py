"""Embeddings on both real engines and the default model: OpenAI /v1/embeddings lines and simple lines,
vectors normalised and stored as float32 bytes, the two engines agreeing, export as embedding responses
that vLLM's own batch output model accepts."""

from __future__ import annotations

import base64
import json
import math
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from producer import api
from schema.db import get_sessionmaker
from schema.kinds.embed import EmbedOutputLine
from schema.queue import Queue
from schema.states import BatchStatus
from schema.tables import Embedding, Item
from tests.conftest import gristmill
from worker import executor
from worker.engine_loop import EngineLoop
from worker.engines import load_engine
from worker.engines.base import EMBED
from worker.kinds import served_kinds
from worker.runtime import Runtime

SENTENCES = [
    "The cat sat on the mat.",
    "A kitten is resting on a rug.",
    "Quarterly revenue grew by eight percent.",
    "The company's sales rose in the last three months.",
    "How do I reset my password?",
    "Paris is the capital of France.",
]
DIMENSIONS = 576  # SmolLM2-135M's hidden size


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def vllm_embed_loop() -> Iterator[tuple[Any, EngineLoop]]:
    engine = load_engine("smollm2-135m-instruct", "vllm", needs=frozenset({EMBED}))  # a pooling engine of its own
    loop = EngineLoop(engine)
    yield engine, loop
    loop.close()
    engine.close()


@pytest.fixture
def engines(transformers_loop: tuple[Any, EngineLoop],
            vllm_embed_loop: tuple[Any, EngineLoop]) -> dict[str, tuple[Any, EngineLoop]]:
    return {"transformers": transformers_loop, "vllm": vllm_embed_loop}


def test_engines_agree_and_similar_texts_are_close(engines: dict[str, tuple[Any, EngineLoop]]) -> None:
    hf, vl = (engines[name][0].embed(SENTENCES) for name in ("transformers", "vllm"))
    for a, b in zip(hf, vl, strict=True):
        assert a.error is None and b.error is None
        assert len(a.vector) == len(b.vector) == DIMENSIONS
        assert math.isclose(math.fsum(x * x for x in a.vector), 1.0, abs_tol=1e-4)
        assert math.isclose(math.fsum(x * x for x in b.vector), 1.0, abs_tol=1e-4)
        assert cosine(a.vector, b.vector) >= 0.99
        assert a.prompt_tokens == b.prompt_tokens
    for vectors in (hf, vl):
        cat, kitten, revenue, sales = (v.vector for v in vectors[:4])
        assert cosine(cat, kitten) > cosine(cat, revenue) and cosine(revenue, sales) > cosine(revenue, kitten)
    assert served_kinds(engines["vllm"][0]) == ["embed"]  # vLLM's pooling runner does nothing else
    assert "embed" in served_kinds(engines["transformers"][0])


@pytest.mark.parametrize("name", ["transformers", "vllm"])
def test_openai_embedding_lines(name: str, sqlite_url: str, settings_for, tmp_path: Path,
                                engines: dict[str, tuple[Any, EngineLoop]]) -> None:  # type: ignore[no-untyped-def]
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    settings = settings_for(sqlite_url)

    def line(custom_id: str, **body: Any) -> str:
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}) + "\n"

    path = tmp_path / "in.jsonl"
    path.write_text(line("one", input=SENTENCES[0]) + line("two", input=SENTENCES[:2])
                    + line("b64", input=SENTENCES[0], encoding_format="base64")
                    + line("short", input=SENTENCES[0], dimensions=64)
                    + line("long", input="word " * 9000) + line("other", input="x", model="text-embedding-3-small"))
    handle = api.submit(path, settings=settings, task="embed")
    with get_sessionmaker(sqlite_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id, Item.status == "queued")))
    executor.run_chunk(Runtime(settings, *engines[name], queue=Queue(settings)), handle.id, ids)
    assert handle.status().status == BatchStatus.completed
    lines = {}
    for record in handle.output():
        text = record.line.model_dump_json()
        BatchRequestOutput.model_validate_json(text)  # vLLM reads it as its own run-batch output
        lines[record.line.custom_id] = EmbedOutputLine.model_validate_json(text)
    codes = {c: ln.error.code if ln.error else None for c, ln in lines.items()}
    assert codes == {"one": None, "two": None, "b64": None, "short": "unsupported",
                     "long": "context_length_exceeded", "other": "model_not_found"}
    one = lines["one"].response.body  # type: ignore[union-attr]
    two = lines["two"].response.body  # type: ignore[union-attr]
    assert [d.index for d in two.data] == [0, 1] and one.usage.prompt_tokens > 0
    first = one.data[0].embedding
    assert isinstance(first, list) and len(first) == DIMENSIONS and two.data[0].embedding == first
    encoded = lines["b64"].response.body.data[0].embedding  # type: ignore[union-attr]
    assert isinstance(encoded, str) and array("f", base64.b64decode(encoded)).tolist() == first
    with get_sessionmaker(sqlite_url)() as session:  # stored compactly: float32 bytes, not JSON text
        stored = {e.custom_id: e for e in session.scalars(select(Embedding))}
    assert len(stored["two"].vectors) == 4 * DIMENSIONS * 2 and stored["two"].count == 2


def test_embed_from_the_cli(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"s{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES[:3])))
    out, table = tmp_path / "vectors.jsonl", tmp_path / "vectors.csv"
    proc = gristmill("run", str(docs), "--task", "embed", "--engine", "transformers", "-o", str(out),
                     settings=settings, cwd=tmp_path)
    assert "completed: 3 items, 3 succeeded" in proc.stderr
    vectors = [EmbedOutputLine.model_validate_json(text).response.body.data[0].embedding  # type: ignore[union-attr]
               for text in out.read_text().splitlines()]
    assert all(isinstance(v, list) and len(v) == DIMENSIONS for v in vectors)
    batch_id = api.list_batches(settings=settings)[0].id
    gristmill("results", batch_id, "--format", "csv", "-o", str(table), settings=settings, cwd=tmp_path)
    rows = table.read_text().splitlines()
    assert rows[0] == "custom_id,status,dimensions,embedding,error_code,error" and len(rows) == 4
