"""End to end on the embedded defaults (SQLite, filesystem broker, in-process worker), both real engines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select

from schema.db import get_sessionmaker
from schema.outputs import OutputLine
from schema.states import BatchStatus, ItemStatus
from schema.tables import Batch, EngineBatch, Item
from tests.conftest import REPO, gristmill, gristmill_in_terminal

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
    """The README's first command at a terminal: on vLLM as given (every line on the terminal is
    gristmill's: no engine, Celery or library output), on transformers with -v (the log lines come back)."""
    settings = settings_for(sqlite_url)
    out = tmp_path / "answers.jsonl"
    verbose = engine == "transformers"
    code, terminal = gristmill_in_terminal("run", str(QUESTIONS), "-o", str(out), "--engine", engine,
                                           *(["-v"] if verbose else []), settings=settings, cwd=tmp_path)
    assert code == 0, terminal[-4000:]
    summary = re.search(r"completed: 16 items, 16 succeeded, 0 failed in [\d.]+ s \(engine start [\d.]+ s, "
                        r"processing [\d.]+ s\); tokens: \d+ prompt \([\d.]+/s\), \d+ output \([\d.]+/s\)", terminal)
    assert summary, terminal[-4000:]
    assert "16/16 done (0 failed), completed" in terminal  # the progress display's last state
    if verbose:
        assert f"engine {engine} loaded" in terminal and " INFO " in terminal
    else:
        lines = {line.strip() for line in re.split(r"[\r\n]", terminal) if line.strip()}
        ours = re.compile(r"^(batch batch_\w+|loading smollm2-135m-instruct \(vllm engine\) \.\.\. \d+ s|"
                          r"(writing results|stopping the engine) \.\.\. \d+ s|[━╸╺ ]*\d+/16 done .*|completed: .*)$")
        assert sorted(line for line in lines if not ours.match(line)) == []
        assert any(line.startswith("loading smollm2-135m-instruct") for line in lines)  # the phase line
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
