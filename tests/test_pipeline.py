"""End to end on the embedded defaults (SQLite, filesystem broker, in-process worker), both real engines."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from schema.db import get_sessionmaker
from schema.outputs import OutputLine
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, EngineBatch, Item
from tests.conftest import REPO, gristmill

QUESTIONS = REPO / "examples" / "questions.jsonl"


def read_output(path: Path) -> list[OutputLine]:
    """Every line, checked against vLLM's own run-batch output model too."""
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    lines = path.read_text().splitlines()
    for line in lines:
        BatchRequestOutput.model_validate_json(line)
    return [OutputLine.model_validate_json(line) for line in lines]


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_run_on_embedded_defaults(engine: str, sqlite_url: str, settings_for, tmp_path: Path) -> None:
    settings = settings_for(sqlite_url)
    out = tmp_path / "answers.jsonl"
    proc = gristmill("run", str(QUESTIONS), "-o", str(out), "--engine", engine, settings=settings, cwd=tmp_path)
    assert "completed: 16 items, 16 succeeded, 0 failed" in proc.stderr
    assert "tokens/s" in proc.stderr
    # quiet: the engine's and Celery's INFO lines, and the worker banner, went to the log file
    assert " INFO " not in proc.stdout + proc.stderr and "celery@" not in proc.stdout + proc.stderr
    assert "[config]" not in proc.stdout
    assert f"engine {engine} loaded" in (settings.home / "gristmill.log").read_text()

    lines = read_output(out)
    assert [line.custom_id for line in lines] == [f"q-{i:02d}" for i in range(1, 17)]  # input order
    for line in lines:
        assert line.error is None and line.response is not None and line.response.status_code == 200
        body = line.response.body
        assert body.choices[0].message.content.strip()
        assert 5 < body.usage.prompt_tokens < 200
        assert 0 < body.usage.completion_tokens <= 48
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
    assert "Paris" in lines[0].response.body.choices[0].message.content  # type: ignore[union-attr]

    with get_sessionmaker(sqlite_url)() as session:
        batch = session.scalars(select(Batch)).one()
        assert batch.status == BatchStatus.completed and (batch.succeeded, batch.failed) == (16, 0)
        items = session.scalars(select(Item)).all()
        for item in items:
            assert item.status == ItemStatus.succeeded and item.attempts == 1 and item.engine == engine
            assert item.queue_wait_s is not None and 0 <= item.queue_wait_s < 600
            assert item.engine_s is not None and 0 < item.engine_s < 600
            assert item.tokens_per_s is not None and item.tokens_per_s > 0
            assert item.started_at <= item.finished_at and item.worker_host
        engine_batches = session.scalars(select(EngineBatch)).all()
        assert sum(eb.n_items for eb in engine_batches) == 16
        assert sum(eb.completion_tokens for eb in engine_batches) == sum(
            line.response.body.usage.completion_tokens for line in lines)  # type: ignore[union-attr]

    stats = gristmill("stats", batch.id, settings=settings, cwd=tmp_path).stdout
    assert "output_tokens_per_s" in stats and "queue_wait_s" in stats
