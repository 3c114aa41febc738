"""Classification batches end to end: the CLI as a new user runs it, storage on SQLite
and PostgreSQL, exports, and bad input refused before anything is stored."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from producer import api
from schema.db import get_sessionmaker, upgrade
from schema.errors import InputError
from schema.kinds.classify import ClassifyOutputLine
from schema.models import resolve_model
from schema.queue import Queue
from schema.states import BatchStatus
from schema.tables import Batch, Classification, Item, Result
from tests.conftest import gristmill
from worker import executor
from worker.engine_loop import EngineLoop
from worker.kinds import calibration
from worker.runtime import Runtime

SENTIMENT = "What is the sentiment of this review?"
LINES: list[dict[str, object]] = [
    {"id": "r1", "text": "Great for the jawbone."},
    {"id": "r2", "text": "Tied to charger for conversations lasting more than 45 minutes.MAJOR PROBLEMS!!"},
    {"id": "r3", "text": "The mic is great."},
    {"id": "t1", "text": "I was charged twice on my last invoice.", "labels": ["billing question", "technical problem"]},
]


def write_jsonl(path: Path, lines: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def read_lines(path: Path) -> list[ClassifyOutputLine]:
    return [ClassifyOutputLine.model_validate_json(line) for line in path.read_text().splitlines()]


def batch_count(url: str) -> int:
    upgrade(url)
    with get_sessionmaker(url)() as session:
        return session.scalar(select(func.count()).select_from(Batch)) or 0


# --- the CLI, both engines --------------------------------------------------------------------


def test_run_classify_from_the_cli(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The CLI's path on one engine (transformers, the quicker to start); both engines' classification, and
    their agreement, are tests/test_classify_engines.py's."""
    settings, engine = settings_for(sqlite_url), "transformers"
    reviews, out, table = write_jsonl(tmp_path / "reviews.jsonl", LINES), tmp_path / "labels.jsonl", tmp_path / "labels.csv"
    proc = gristmill("run", str(reviews), "--task", "classify", "--labels", "positive,negative",
                     "--instruction", SENTIMENT, "-o", str(out), "--engine", engine, settings=settings, cwd=tmp_path)
    assert "completed: 4 items, 4 succeeded, 0 failed" in proc.stderr

    lines = read_lines(out)
    assert [line.custom_id for line in lines] == ["r1", "r2", "r3", "t1"]  # input order
    assert [line.label for line in lines[:3]] == ["positive", "negative", "positive"]
    assert lines[3].label in ("billing question", "technical problem")  # the line's own labels
    assert list(lines[3].probabilities or {}) == ["billing question", "technical problem"]
    for line in lines:
        assert line.error is None and line.method == "score" and line.calibrated is True
        assert sum((line.probabilities or {}).values()) == pytest.approx(1.0)
        assert line.raw_probabilities is not None

    with get_sessionmaker(sqlite_url)() as session:
        batch = session.scalars(select(Batch)).one()
        assert (batch.kind, batch.status, batch.succeeded) == ("classify", BatchStatus.completed, 4)
        stored = {row.custom_id: row for row in session.scalars(select(Classification))}
        assert {row.label for row in stored.values()} >= {"positive", "negative"}
        assert all(row.method == "score" and row.calibrated for row in stored.values())
        texts = dict(session.execute(select(Result.custom_id, Result.output_text)).tuples().all())
        assert texts == {line.custom_id: line.label for line in lines}
        assert all(item.engine == engine for item in session.scalars(select(Item)))

    gristmill("results", batch.id, "--format", "csv", "-o", str(table), settings=settings, cwd=tmp_path)
    rows = list(csv.DictReader(table.open()))
    assert list(rows[0]) == ["custom_id", "status", "label", "labels", "method", "calibrated", "p_positive",
                             "p_negative", "p_billing question", "p_technical problem", "error_code",
                             "error"]
    assert [row["label"] for row in rows] == [line.label for line in lines]
    assert float(rows[0]["p_positive"]) == pytest.approx(lines[0].probabilities["positive"])  # type: ignore[index]
    assert rows[3]["p_positive"] == ""  # a label this line was not asked about


def test_guided_choice_and_multi_label_from_the_cli(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    reviews = write_jsonl(tmp_path / "reviews.jsonl", LINES[:3])
    chosen = tmp_path / "chosen.jsonl"
    gristmill("run", str(reviews), "--task", "classify", "--labels", "positive,negative", "--method", "choice",
              "--instruction", SENTIMENT, "-o", str(chosen), "--engine", "transformers", settings=settings, cwd=tmp_path)
    for line in read_lines(chosen):
        assert line.method == "choice" and line.calibrated is False and line.raw_probabilities is None
        assert sorted((line.probabilities or {}).values()) == [0.0, 1.0]

    labels_file = tmp_path / "topics.yaml"
    labels_file.write_text("labels:\n  - sound\n  - battery\n  - price\n")
    tagged = tmp_path / "tagged.jsonl"
    gristmill("run", str(reviews), "--task", "classify", "--labels-file", str(labels_file), "--multi-label",
              "--threshold", "0.6", "--instruction", "Which topics does this review talk about?",
              "-o", str(tagged), "--engine", "transformers", settings=settings, cwd=tmp_path)
    for line in read_lines(tagged):
        probabilities = line.probabilities or {}
        assert list(probabilities) == ["sound", "battery", "price"]
        assert line.labels == [label for label, p in probabilities.items() if p >= 0.6]


SHOTS: list[dict[str, object]] = [  # labelled reviews (not the lines above), two of each label
    {"text": "Excellent product, works exactly as described.", "label": "positive"},
    {"text": "Terrible battery life, do not buy this.", "label": "negative"},
    {"text": "I love this headset, the sound is clear.", "label": "positive"},
    {"text": "It broke after two days and support never answered.", "label": "negative"},
    {"text": "Arrived scratched and the buttons stick.", "label": "negative"},
]


def test_few_shot_examples_from_the_cli(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`--examples labelled.jsonl --shots 2`: two examples of each label, stored once in each item's
    request, go before every text as earlier turns; the reviews get their labels."""
    settings = settings_for(sqlite_url)
    reviews, out = write_jsonl(tmp_path / "reviews.jsonl", LINES[:3]), tmp_path / "labels.jsonl"
    write_jsonl(tmp_path / "labelled.jsonl", SHOTS)
    gristmill("run", str(reviews), "--task", "classify", "--labels", "positive,negative", "--instruction", SENTIMENT,
              "--examples", "labelled.jsonl", "--shots", "2", "-o", str(out), "--engine", "transformers",
              settings=settings, cwd=tmp_path)
    assert [line.label for line in read_lines(out)] == ["positive", "negative", "positive"]
    with get_sessionmaker(sqlite_url)() as session:
        requests = list(session.scalars(select(Item.request)))
        params = session.scalars(select(Batch.params)).one()
    examples = [[(e["text"], e["label"]) for e in request["examples"]] for request in requests]
    assert all(chosen == examples[0] for chosen in examples) and len(examples[0]) == 4
    assert [label for _, label in examples[0]] == ["positive", "negative"] * 2
    assert params["examples"] == requests[0]["examples"]


def test_classification_model_from_the_cli(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "tiny-sentiment"
    source = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                         pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = settings_for(sqlite_url)
    reviews, out = write_jsonl(tmp_path / "reviews.jsonl", LINES[:3]), tmp_path / "labels.jsonl"
    gristmill("run", str(reviews), "--task", "classify", "--model", str(folder), "-o", str(out),
              "--engine", "transformers", settings=settings, cwd=tmp_path)  # no --labels: the model has them
    for line in read_lines(out):
        assert line.method == "head" and list(line.probabilities or {}) == ["negative", "positive"]
        assert sum((line.probabilities or {}).values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("flags", "message"), [
    (["--labels", "positive"], "at least two labels"),
    (["--labels", "positive,positive"], "duplicate label 'positive'"),
    (["--labels", "positive,"], "label 2 is empty"),
    (["--labels-file", "BAD"], "labels file is not valid YAML"),
    (["--labels", "a,b", "--labels-file", "BAD"], "not both"),
    ([], "no labels"),
])
def test_bad_labels_are_refused_before_anything_is_stored(flags: list[str], message: str, sqlite_url: str,
                                                          settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    reviews = write_jsonl(tmp_path / "reviews.jsonl", LINES[:1])
    (tmp_path / "bad.yaml").write_text("- billing\n- [unclosed\n")
    flags = [str(tmp_path / "bad.yaml") if flag == "BAD" else flag for flag in flags]
    proc = gristmill("submit", str(reviews), "--task", "classify", *flags, settings=settings, cwd=tmp_path,
                     check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stdout == ""
    assert batch_count(sqlite_url) == 0


# --- storage on SQLite and PostgreSQL, through the API and the executor ---------------------


@pytest.fixture
def engine(transformers_loop: tuple[object, EngineLoop]) -> tuple[object, EngineLoop]:
    return transformers_loop


def test_classifications_are_stored_once_and_exported(db_url: str, settings_for, tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    calibration.clear_priors()
    settings = settings_for(db_url)
    handle = api.submit(write_jsonl(tmp_path / "in.jsonl", LINES[:3]), task="classify",
                        labels=["positive", "negative"], instruction=SENTIMENT, calibrate=False, settings=settings)
    with get_sessionmaker(db_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id).order_by(Item.line)))
    runtime = Runtime(settings, *engine, queue=Queue(settings))
    assert executor.run_chunk(runtime, handle.id, ids) == {"claimed": 3, "succeeded": 3, "failed": 0}
    assert executor.run_chunk(runtime, handle.id, ids)["claimed"] == 0  # a redelivery changes nothing
    assert handle.status().status == BatchStatus.completed

    with get_sessionmaker(db_url)() as session:
        rows = session.scalars(select(Classification).order_by(Classification.item_id)).all()
        assert [(r.custom_id, r.method, r.calibrated) for r in rows] == [(c, "score", False) for c in ("r1", "r2", "r3")]
        assert all(r.raw_probabilities == r.probabilities for r in rows)  # uncalibrated: the same

    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    counts = handle.results(out, errors)
    assert (counts.succeeded, counts.failed, counts.pending) == (3, 0, 0)
    assert [line.label for line in read_lines(out)] == ["positive", "negative", "positive"]
    assert errors.read_text() == ""


def test_api_refuses_bad_classify_arguments(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    path = write_jsonl(tmp_path / "in.jsonl", LINES[:1])
    with pytest.raises(InputError, match="at least two labels"):
        api.submit(path, task="classify", labels=["only"], settings=settings)
    with pytest.raises(InputError, match="duplicate"):
        api.submit(path, task="classify", labels=["a", "a"], settings=settings)
    assert batch_count(sqlite_url) == 0
