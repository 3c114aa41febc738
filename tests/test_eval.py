"""Checking classification batches: answers per label and the calibration warning (`stats`, the dashboard),
and `gristmill eval` against gold labels, its figures checked against counts made here by hand: from a
real batch's exported lines (the CLI, transformers engine), and from answers written into SQL on SQLite
and PostgreSQL (single- and multi-label, with a long text's window whose answer must not count)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from producer import api, evaluation, stats
from producer.http_api import create_app
from schema.db import get_sessionmaker, utcnow
from schema.errors import GristmillError, InputError
from schema.kinds.classify import ClassifyOutputLine
from schema.settings import Settings
from schema.states import ItemStatus
from schema.tables import Batch, Classification, Evaluation, Item
from tests.conftest import gristmill
from tests.test_classify_pipeline import SENTIMENT, read_lines, write_jsonl

REVIEWS = [  # (id, text, the sentiment a reader gives it)
    ("r01", "Great for the jawbone.", "positive"),
    ("r02", "The battery died after two days. Terrible.", "negative"),
    ("r03", "The mic is great.", "positive"),
    ("r04", "I love this phone, it works perfectly.", "positive"),
    ("r05", "Broke after one week, a waste of money.", "negative"),
    ("r06", "Excellent sound quality and very comfortable.", "positive"),
    ("r07", "The worst headset I have ever owned.", "negative"),
    ("r08", "Highly recommended, five stars.", "positive"),
    ("r09", "It stopped charging and support never answered.", "negative"),
    ("r10", "Works great, I am very happy with it.", "positive"),
    ("r11", "Cheap plastic that cracked on the first day.", "negative"),
    ("r12", "Fast delivery and a lovely product.", "positive"),
    ("r13", "Do not buy this, it is junk.", "negative"),
    ("r14", "Clear calls and a long battery life.", "positive"),
    ("r15", "Very disappointed, the screen flickers.", "negative"),
    ("r16", "Perfect fit, exactly what I needed.", "positive"),
    ("r17", "The sound is awful and full of static.", "negative"),
    ("r18", "Best purchase I made this year.", "positive"),
    ("r19", "It hurts my ear after ten minutes.", "negative"),
    ("r20", "Easy to set up and it just works.", "positive"),
    ("r21", "Returned it, completely useless.", "negative"),
    ("r22", "I am delighted with the quality.", "positive"),
    ("r23", "The buttons stopped working within a month.", "negative"),
    ("r24", "Amazing value for the price.", "positive"),
    ("r25", "Poor quality and bad customer service.", "negative"),
    ("r26", "My kids love it, great gift.", "positive"),
    ("r27", "It keeps disconnecting, very annoying.", "negative"),
    ("r28", "Wonderful, better than expected.", "positive"),
    ("r29", "Horrible experience, never again.", "negative"),
    ("r30", "Solid build and a nice design.", "positive"),
]
NO_GOLD = {"r28", "r29", "r30"}  # batch items the gold file leaves out
NOT_IN_BATCH = [{"id": "x1", "label": "positive"}, {"id": "x2", "label": "negative"}]


# --- figures by hand: no scikit-learn -------------------------------------------------------------


def f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def ece(pairs: list[tuple[float, bool]]) -> float:
    """Ten bins [0, 0.1), [0.1, 0.2), ... [0.9, 1.0]: each bin's |mean confidence - share true|, by its size."""
    total = 0.0
    for b in range(10):
        low, high = b / 10, (b + 1) / 10
        inside = [(c, o) for c, o in pairs if low <= c < high or (b == 9 and c == 1.0)]
        if inside:
            gap = sum(c for c, _ in inside) / len(inside) - sum(o for _, o in inside) / len(inside)
            total += len(inside) / len(pairs) * abs(gap)
    return total


def single_by_hand(gold: list[str], predicted: list[str], confidences: list[float], labels: list[str]) -> dict[str, Any]:
    per_label = {}
    for label in labels:
        tp = sum(g == p == label for g, p in zip(gold, predicted))
        per_label[label] = f1(tp, sum(p == label != g for g, p in zip(gold, predicted)),
                              sum(g == label != p for g, p in zip(gold, predicted)))
    present = [label for label in labels if label in gold or label in predicted]
    return {"accuracy": sum(g == p for g, p in zip(gold, predicted)) / len(gold),
            "macro_f1": sum(per_label[label][2] for label in present) / len(present),
            "per_label": per_label,
            "confusion_matrix": [[sum(g == row and p == col for g, p in zip(gold, predicted)) for col in labels]
                                 for row in labels],
            "ece": ece([(c, g == p) for g, p, c in zip(gold, predicted, confidences)])}


def multi_by_hand(gold: list[set[str]], predicted: list[set[str]], probabilities: list[dict[str, float]],
                  labels: list[str]) -> dict[str, Any]:
    per_label, confusion = {}, []
    for label in labels:
        tp = sum(label in g and label in p for g, p in zip(gold, predicted))
        fp = sum(label not in g and label in p for g, p in zip(gold, predicted))
        fn = sum(label in g and label not in p for g, p in zip(gold, predicted))
        per_label[label] = f1(tp, fp, fn)
        confusion.append([[len(gold) - tp - fp - fn, fp], [fn, tp]])
    present = [label for label in labels if any(label in s for s in gold + predicted)]
    return {"accuracy": sum(g == p for g, p in zip(gold, predicted)) / len(gold),
            "macro_f1": sum(per_label[label][2] for label in present) / len(present),
            "per_label": per_label, "confusion_matrix": confusion,
            "ece": ece([(p[label], label in g) for g, p in zip(gold, probabilities) for label in labels])}


def same_figures(result: dict[str, Any], expected: dict[str, Any]) -> None:
    assert result["accuracy"] == pytest.approx(expected["accuracy"])
    assert result["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert result["ece"] == pytest.approx(expected["ece"]) and 0.0 <= result["ece"] <= 1.0
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    assert [row["label"] for row in result["per_label"]] == list(expected["per_label"])
    for row in result["per_label"]:
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(expected["per_label"][row["label"]])


# --- a real batch, run once ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    settings: Settings
    folder: Path
    batch_id: str
    lines: list[ClassifyOutputLine]
    gold: Path


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """30 reviews through `gristmill run --task classify` on the transformers engine, and a gold file that
    leaves 3 of them out and has 2 ids the batch does not."""
    folder = tmp_path_factory.mktemp("reviews")
    settings = Settings(database_url=f"sqlite:///{folder / 'gristmill.db'}", broker_url="filesystem://",
                        home=folder / ".gristmill")
    source = write_jsonl(folder / "in.jsonl", [{"id": i, "text": text} for i, text, _ in REVIEWS])
    gristmill("run", str(source), "-o", str(folder / "out.jsonl"), "--task", "classify", "--labels",
              "positive,negative", "--instruction", SENTIMENT, "--engine", "transformers", settings=settings, cwd=folder)
    with get_sessionmaker(settings.database_url)() as session:
        batch_id = session.scalars(select(Batch.id)).one()
    gold = write_jsonl(folder / "gold.jsonl", [{"custom_id": i, "label": label} for i, _, label in REVIEWS
                                               if i not in NO_GOLD] + NOT_IN_BATCH)  # type: ignore[operator]
    return Run(settings, folder, batch_id, read_lines(folder / "out.jsonl"), gold)


def test_eval_of_a_real_batch_against_counts_by_hand(reviews: Run) -> None:
    gold = {i: label for i, _, label in REVIEWS if i not in NO_GOLD}
    scored = [line for line in reviews.lines if line.custom_id in gold]
    expected = single_by_hand([gold[line.custom_id] for line in scored], [str(line.label) for line in scored],
                              [(line.probabilities or {})[str(line.label)] for line in scored], ["positive", "negative"])
    proc = gristmill("eval", reviews.batch_id, "--gold", str(reviews.gold), "--json", settings=reviews.settings,
                     cwd=reviews.folder)
    result = json.loads(proc.stdout)
    assert (result["matched"], result["missing_gold"], result["unknown_ids"], result["unanswered"]) == (27, 3, 2, 0)
    assert result["labels"] == ["positive", "negative"] and result["multi_label"] is False
    same_figures(result, expected)
    assert sum(map(sum, result["confusion_matrix"])) == 27
    assert [row["support"] for row in result["per_label"]] == [14, 13]  # gold labels of the 27
    assert sum(b["count"] for b in result["reliability"]) == 27
    assert expected["accuracy"] >= 0.7, "the model should get most of these reviews right"

    text = gristmill("eval", reviews.batch_id, "--gold", "gold.jsonl", settings=reviews.settings, cwd=reviews.folder).stdout
    assert text.startswith(f"accuracy {expected['accuracy']:.3f}  macro-F1 {expected['macro_f1']:.3f}  "
                           f"ECE {expected['ece']:.3f}: 27 items against gold.jsonl; 3 items without a gold label, "
                           f"2 gold ids not in the batch, 0 without an answer")
    assert "confusion matrix" in text and "gold \\ predicted" in text and "per label" in text


def test_stats_show_labels_and_the_latest_evaluation(reviews: Run) -> None:
    handle = api.open_batch(reviews.batch_id, reviews.settings)
    first = handle.evaluate(reviews.gold)
    (reviews.folder / "few.jsonl").write_text(json.dumps({"id": "r01", "label": "positive"}) + "\n")
    latest = handle.evaluate(reviews.folder / "few.jsonl")  # the latest is what stats shows
    assert (latest["matched"], latest["missing_gold"], latest["accuracy"]) == (1, 29, float(reviews.lines[0].label == "positive"))
    counts = {"positive": sum(line.label == "positive" for line in reviews.lines)}
    counts["negative"] = len(reviews.lines) - counts["positive"]

    summary = json.loads(gristmill("stats", reviews.batch_id, "--json", settings=reviews.settings,
                                   cwd=reviews.folder).stdout)
    assert summary["label_counts"] == counts and list(summary["label_counts"]) == ["positive", "negative"]
    assert summary["calibration_warning"] is None  # calibrated
    assert summary["evaluation"] == latest and latest != first
    text = gristmill("stats", reviews.batch_id, settings=reviews.settings, cwd=reviews.folder).stdout
    assert f"label_counts         positive {counts['positive']}  negative {counts['negative']}\n" in text
    assert "evaluation           accuracy" in text and "1 items against" in text and "warning" not in text

    handle.evaluate(reviews.gold)
    with TestClient(create_app(reviews.settings, local=True)) as client:
        page = client.get(f"/batches/{reviews.batch_id}").text
    assert f"<td>positive</td><td class=\"num\">{counts['positive']}</td>" in page
    assert 'id="confusion"' in page and f'<b id="accuracy">{first["accuracy"]:.3g}</b>' in page
    assert "calibration-warning" not in page and "gold.jsonl" in page


@pytest.mark.parametrize(("line", "message"), [
    ({"id": "r01"}, "gold.jsonl:2: field 'label': required field is missing (a single-label batch's gold gives 'label')"),
    ({"id": "r01", "label": "neutral"},
     "gold.jsonl:2: field 'label': 'neutral' is not one of the batch's labels ['positive', 'negative']"),
    ({"id": "r01", "label": 1}, "gold.jsonl:2: field 'label': Input should be a valid string (got 1)"),
    ({"label": "positive"}, "gold.jsonl:2: field 'custom_id': required field is missing"),
    ({"id": "r02", "label": "negative"}, "gold.jsonl:2: field 'custom_id': duplicate id 'r02'; first on line 1"),
    ("{not json", "gold.jsonl:2: not valid JSON"),
])
def test_a_bad_gold_line_is_named_and_nothing_stored(reviews: Run, line: Any, message: str, tmp_path: Path) -> None:
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"id": "r02", "label": "negative"}) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with get_sessionmaker(reviews.settings.database_url)() as session:
        before = session.scalar(select(func.count()).select_from(Evaluation))
    with pytest.raises(InputError) as raised:
        api.open_batch(reviews.batch_id, reviews.settings).evaluate(gold)
    assert str(raised.value).replace(str(tmp_path) + "/", "").startswith(message)
    with get_sessionmaker(reviews.settings.database_url)() as session:
        assert session.scalar(select(func.count()).select_from(Evaluation)) == before


def test_eval_errors_from_the_cli(reviews: Run) -> None:
    (reviews.folder / "bad.jsonl").write_text('{"id": "r01", "label": "positive"}\n{"id": "r02", "labels": ["negative"]}\n')
    proc = gristmill("eval", reviews.batch_id, "--gold", "bad.jsonl", settings=reviews.settings, cwd=reviews.folder,
                     check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: bad.jsonl:2: field 'label': required field is missing "
                                   "(a single-label batch's gold gives 'label')")
    write_jsonl(reviews.folder / "strangers.jsonl", NOT_IN_BATCH)  # type: ignore[arg-type]
    proc = gristmill("eval", reviews.batch_id, "--gold", "strangers.jsonl", settings=reviews.settings,
                     cwd=reviews.folder, check=False)
    assert proc.returncode == 1
    assert "no id of strangers.jsonl is an answered item" in proc.stderr and "(2 of 2 are not in the batch)" in proc.stderr


# --- answers written into SQL, both databases -----------------------------------------------------------


SINGLE = {  # id: (gold, predicted, its probabilities)
    "a": ("spam", "spam", {"spam": 0.93, "ham": 0.05, "other": 0.02}),
    "b": ("spam", "ham", {"spam": 0.35, "ham": 0.55, "other": 0.10}),
    "c": ("ham", "ham", {"spam": 0.12, "ham": 0.81, "other": 0.07}),
    "d": ("ham", "ham", {"spam": 0.02, "ham": 0.97, "other": 0.01}),
    "e": ("other", "spam", {"spam": 0.44, "ham": 0.16, "other": 0.40}),
    "f": ("ham", "spam", {"spam": 0.66, "ham": 0.30, "other": 0.04}),
    "g": ("spam", "spam", {"spam": 0.71, "ham": 0.19, "other": 0.10}),
}
MULTI = {  # id: (gold, predicted at threshold 0.5, yes-probabilities)
    "a": ({"sound"}, {"sound"}, {"sound": 0.91, "battery": 0.12, "price": 0.33}),
    "b": ({"sound", "price"}, {"sound"}, {"sound": 0.77, "battery": 0.08, "price": 0.46}),
    "c": ({"battery"}, {"battery", "price"}, {"sound": 0.21, "battery": 0.84, "price": 0.62}),
    "d": (set(), set(), {"sound": 0.04, "battery": 0.27, "price": 0.15}),
    "e": ({"battery", "price"}, {"battery", "price"}, {"sound": 0.35, "battery": 0.58, "price": 0.95}),
    "f": ({"price"}, {"sound"}, {"sound": 0.52, "battery": 0.49, "price": 0.38}),
}


def write_answers(db_url: str, settings: Settings, tmp_path: Path, multi: bool) -> str:
    """A classification batch whose answers are written straight into SQL, one extra item unanswered, and
    a window of item "a" whose own answer (every label) must count nowhere."""
    answers, labels = (MULTI, ["sound", "battery", "price"]) if multi else (SINGLE, ["spam", "ham", "other"])
    lines = [{"id": i, "text": f"text {i}"} for i in [*answers, "unanswered"]]
    batch_id = api.submit(write_jsonl(tmp_path / "in.jsonl", lines), task="classify", labels=labels,  # type: ignore[arg-type]
                          multi_label=multi, settings=settings).id
    now = utcnow()
    with get_sessionmaker(db_url)() as session, session.begin():
        items = {item.custom_id: item for item in session.scalars(select(Item).where(Item.batch_id == batch_id))}
        window = Item(batch_id=batch_id, line=0, custom_id="a#window", endpoint="/v1/classify", request={}, body={},
                      status=ItemStatus.succeeded, parent_id=items["a"].id, round=1, window=0)
        session.add(window)
        session.flush()
        rows: list[tuple[Item, str, list[str] | None, dict[str, float]]] = [
            (window, labels[-1], labels if multi else None, {label: 0.99 for label in labels})]
        for custom_id, (_, predicted, probabilities) in answers.items():
            if multi:
                top = max(probabilities, key=lambda label: probabilities[label])
                rows.append((items[custom_id], top, [label for label in labels if label in predicted], probabilities))
            else:
                rows.append((items[custom_id], str(predicted), None, probabilities))
        for item, label, chosen, probabilities in rows:
            session.add(Classification(item_id=item.id, batch_id=batch_id, custom_id=item.custom_id, label=label,
                                       labels=chosen, probabilities=probabilities, raw_probabilities=None,
                                       method="score", calibrated=True, created_at=now))
        session.execute(update(Item).where(Item.id.in_([items[i].id for i in answers])).values(status=ItemStatus.succeeded))
    return batch_id


@pytest.mark.parametrize("multi", [False, True], ids=["single-label", "multi-label"])
def test_counts_and_figures_from_sql(db_url: str, settings_for, tmp_path: Path, multi: bool) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(db_url)
    batch_id = write_answers(db_url, settings, tmp_path, multi)
    answers = MULTI if multi else SINGLE
    labels = ["sound", "battery", "price"] if multi else ["spam", "ham", "other"]
    counts = {label: sum(label in (predicted if multi else {predicted}) for _, predicted, _ in answers.values())
              for label in labels}
    with get_sessionmaker(db_url)() as session:
        summary = stats.summarise(session, batch_id)
    assert summary["label_counts"] == counts and list(summary["label_counts"]) == labels  # no window in them
    assert summary["evaluation"] is None

    gold_lines = [{"id": i, **({"labels": sorted(gold)} if multi else {"label": gold})}  # type: ignore[arg-type]
                  for i, (gold, _, _) in answers.items()]
    result = api.open_batch(batch_id, settings).evaluate(write_jsonl(tmp_path / "gold.jsonl", gold_lines))
    golds, predicted, probabilities = (list(column) for column in zip(*answers.values()))
    if multi:
        expected = multi_by_hand(golds, predicted, probabilities, labels)
        assert all(sum(map(sum, m)) == len(answers) for m in result["confusion_matrix"])
    else:
        confidences = [p[label] for label, p in zip(predicted, probabilities)]
        expected = single_by_hand(golds, predicted, confidences, labels)
        assert sum(map(sum, result["confusion_matrix"])) == len(answers)
    same_figures(result, expected)
    assert (result["matched"], result["missing_gold"], result["unknown_ids"], result["unanswered"]) == (len(answers), 1, 0, 0)
    with get_sessionmaker(db_url)() as session:
        assert stats.summarise(session, batch_id)["evaluation"] == result  # as stored, labels in order


def test_gold_files_that_cannot_be_used(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    batch_id = write_answers(sqlite_url, settings, tmp_path, multi=True)
    with pytest.raises(InputError, match="missing.jsonl: cannot read the gold file: No such file or directory"):
        api.open_batch(batch_id, settings).evaluate(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="empty.jsonl: the gold file has no lines"):
        api.open_batch(batch_id, settings).evaluate(tmp_path / "empty.jsonl")
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"id": "a", "labels": ["sound"]}, {"id": "b", "label": "sound"}])
    with pytest.raises(InputError, match="gold.jsonl:2: field 'labels': required field is missing"):
        api.open_batch(batch_id, settings).evaluate(gold)
    write_jsonl(tmp_path / "gold.jsonl", [{"id": "a", "labels": ["sound", "volume"]}])
    with pytest.raises(InputError, match="gold.jsonl:1: field 'labels': 'volume' is not one of the batch's labels"):
        api.open_batch(batch_id, settings).evaluate(gold)
    generate = api.submit(write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "x"}]), settings=settings)
    with pytest.raises(GristmillError, match="is a generate batch; eval checks classification batches"):
        generate.evaluate(gold)


# --- the calibration warning --------------------------------------------------------------------------


def test_calibration_warning_on_counts() -> None:
    warn = evaluation.calibration_warning
    assert warn({"positive": 19, "negative": 1}, calibrate=False, method="score") == (
        "95% of answers are 'positive' and calibration is off: the model's bias may be deciding; try without "
        "--no-calibrate")
    assert warn({"yes": 0, "no": 25}, calibrate=True, method="choice") == (
        "100% of answers are 'no' and calibration is off: the model's bias may be deciding; try --method score, "
        "which calibrates")
    assert warn({"positive": 19, "negative": 0}, calibrate=False, method="score") is None  # too few to say
    assert warn({"positive": 18, "negative": 2}, calibrate=False, method="score") is None  # 90%: not over
    assert warn({"positive": 30, "negative": 0}, calibrate=True, method="score") is None  # calibrated
    assert warn({"a": 91, "b": 5, "c": 4}, calibrate=False, method="score") is not None
    assert math.isclose(evaluation.LOPSIDED_SHARE, 0.9)


def test_warning_when_every_answer_is_one_label(pg_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """24 copies of one sentence, uncalibrated: every answer is the same label, whichever it is."""
    settings = settings_for(pg_url)
    source = write_jsonl(tmp_path / "same.jsonl", [{"id": f"s{n}", "text": "It arrived on Tuesday."} for n in range(24)])
    proc = gristmill("run", str(source), "-o", str(tmp_path / "out.jsonl"), "--task", "classify", "--labels",
                     "positive,negative", "--no-calibrate", "--engine", "transformers", settings=settings, cwd=tmp_path)
    label = read_lines(tmp_path / "out.jsonl")[0].label
    warning = (f"100% of answers are {label!r} and calibration is off: the model's bias may be deciding; try without "
               f"--no-calibrate")
    assert f"warning: {warning}" in proc.stderr
    with get_sessionmaker(pg_url)() as session:
        batch_id = session.scalars(select(Batch.id)).one()
    text = gristmill("stats", batch_id, settings=settings, cwd=tmp_path).stdout
    assert f"\nwarning: {warning}\n" in text and f"{label} 24" in text
    with TestClient(create_app(settings, local=True)) as client:
        page = client.get(f"/batches/{batch_id}").text
    assert warning.replace("'", "&#39;") in page and 'id="no-evaluation"' in page
