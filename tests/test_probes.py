"""Probes (`--method probe`): a classifier learned from labelled texts on the default model's hidden
states, as a user runs it from the CLI: learned by the worker on first use, stored in SQL with its
metrics, reused by id without learning again; and what a submission naming a probe is refused for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from schema.db import get_sessionmaker
from schema.tables import Item, Probe
from tests.conftest import gristmill

THINGS = ["battery", "screen", "case", "charger", "headset", "speaker", "cable", "keyboard", "camera", "remote"]
PRAISE = ["works perfectly", "is excellent", "is great value for the money", "exceeded my expectations",
          "is wonderful", "is sturdy and reliable", "does exactly what I wanted", "is the best I have owned"]
COMPLAINTS = ["broke after a week", "is terrible", "stopped working after two days", "is a waste of money",
              "is flimsy and cheap", "arrived damaged", "never charged properly", "is the worst I have owned"]


def labelled(rows: slice) -> list[dict[str, str]]:
    """Short product reviews made here, praise and complaints in turn, each sentence once: different
    slices share no text (the data a test needs lives in the test)."""
    reviews = [(f"The {thing} {verdict}.", label) for thing in THINGS
               for pair in zip(PRAISE, COMPLAINTS, strict=True)
               for verdict, label in zip(pair, ("positive", "negative"), strict=True)]
    return [{"text": text, "label": label} for text, label in reviews[rows]]


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_probe_is_learned_once_then_reused_by_id(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    train, held_out = labelled(slice(0, 120)), labelled(slice(120, 160))  # the held-out texts are not trained on
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": line["text"]} for i, line in enumerate(held_out)])
    gristmill("run", "in.jsonl", "-o", "out.jsonl", "--engine", "transformers", "--task", "classify",
              "--method", "probe", "--train", "train.jsonl", settings=settings, cwd=tmp_path)
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(a["method"] == "probe" and sum(a["probabilities"].values()) == pytest.approx(1.0) for a in answers)
    accuracy = sum(a["label"] == gold["label"] for a, gold in zip(answers, held_out, strict=True)) / len(held_out)
    assert accuracy >= 0.75, accuracy  # on amazon_sentiment.tsv: 0.888 from 200 (bench/classify.py)

    with get_sessionmaker(sqlite_url)() as session:
        probe = session.scalars(select(Probe)).one()
        requests = list(session.scalars(select(Item.request)))
    assert (probe.version, probe.layer, probe.labels) == (1, 15, ["positive", "negative"])  # 30 layers: the middle
    metrics = probe.metrics or {}
    assert 0.6 < metrics["cv_accuracy"] <= 1.0 and metrics["examples"] == 120 and probe.trained_by
    assert metrics["per_label"] == {label: sum(t["label"] == label for t in train) for label in probe.labels}
    assert all(r["probe"] == probe.id and "train" not in r for r in requests)  # the items carry its id only

    listing = gristmill("probes", settings=settings, cwd=tmp_path).stdout
    assert probe.id in listing and f"{metrics['cv_accuracy']:.3f}" in listing
    gristmill("run", "in.jsonl", "-o", "again.jsonl", "--engine", "transformers", "--task", "classify",
              "--method", "probe", "--probe", probe.id, settings=settings, cwd=tmp_path)
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [a["label"] for a in again] == [a["label"] for a in answers]
    with get_sessionmaker(sqlite_url)() as session:
        reused = session.scalars(select(Probe)).one()
    assert reused.trained_at == probe.trained_at  # not learned again


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "probe"], "learned from --train labelled.jsonl or reused by --probe ID"),
    (["--method", "probe", "--probe", "probe_nothing"], "there is no probe 'probe_nothing'"),
    (["--method", "probe", "--probe", "p", "--layer", "3"], "--layer goes with --train"),
    (["--train", "train.jsonl"], "train is for --method probe"),
    (["--method", "probe", "--train", "train.jsonl", "--labels", "positive,neutral"], "label 'negative', not one of"),
])
def test_bad_probe_submissions_are_refused(flags: list[str], message: str, sqlite_url: str, settings_for,  # type: ignore[no-untyped-def]
                                           tmp_path: Path) -> None:
    settings = settings_for(sqlite_url)
    write_jsonl(tmp_path / "train.jsonl", labelled(slice(0, 10)))
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "fine"}])
    proc = gristmill("submit", "in.jsonl", "--task", "classify", *flags, settings=settings, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_a_schedule_learns_a_probe_from_its_training_file(tmp_path: Path) -> None:
    """A schedule's task names the training file as the CLI flag does, relative to the schedules file."""
    from producer.schedules import task_spec

    write_jsonl(tmp_path / "train.jsonl", labelled(slice(0, 10)))
    kind, _, values = task_spec({"kind": "classify", "method": "probe", "train": "train.jsonl"}, "nightly", tmp_path)
    assert kind == "classify" and values["train"] == labelled(slice(0, 10)) and values["method"] == "probe"
