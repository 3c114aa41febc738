"""Zero-shot classification that holds up: the prompt format chosen on one half of two tasks' data, and
reported on the other half, with the spread across wordings, label orders and label names.

    python -m bench.zero_shot [--tune-docs 200] [--docs 500] [--engine vllm|transformers] [--json PATH]

Two tasks: sentiment (shared/data/amazon_sentiment.tsv: review sentences, positive/negative) and topics
(bench/data/debian_topics.tsv: Debian package descriptions, five archive sections). Even lines tune,
odd lines report; nothing measured on the odd lines takes part in a choice.

Tuning: every prompt format (text first or question first, chat template or plain text) under each of
worker/kinds/classify_prompt.DEFAULT_INSTRUCTIONS, calibrated label scoring, on the first --tune-docs
even lines of each task. A format's score is its ensemble's accuracy (the wordings' calibrated
probabilities averaged, as a batch without an instruction does) averaged over the two tasks; the best
format is chosen. Reporting, on the first --docs odd lines: the chosen format's ensemble (timed, as
the worker runs it: one call per block of documents), each of its wordings alone (the spread), the
ensemble with the labels in reverse order and under other names, and the previous default (question
first, one generic wording) for comparison.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.classify import reset_prefix_cache
from producer.evaluation import single_label_metrics
from schema.kinds.classify import ClassifyRequest
from schema.settings import Settings
from worker.engines import load_engine
from worker.engines.base import Engine
from worker.kinds import calibration
from worker.kinds.classify import classify
from worker.kinds.classify_prompt import DEFAULT_INSTRUCTIONS

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
FORMATS: list[dict[str, Any]] = [{"layout": layout, "template": template}
           for layout, template in itertools.product(["text-first", "question-first"], ["chat", "plain"])]
PREVIOUS: dict[str, Any] = {"layout": "question-first", "template": "chat", "instruction": "Which of these labels fits the text "
                                                                           "best: {labels}?"}
BLOCK_DOCS = 250  # documents per classify() call, about what a worker's chunk holds


@dataclass
class Task:
    name: str
    path: Path
    labels: list[str]
    other_names: dict[str, str]  # the same classes under other label names
    gold: dict[str, str] = field(default_factory=dict)  # the file's label -> ours (when they differ)

    def load(self) -> list[tuple[str, str]]:
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                text, label = line.rsplit("\t", 1)
                rows.append((text, self.gold.get(label.strip(), label.strip())))
        return rows


TASKS = [
    Task("sentiment", HERE.parents[1] / "shared" / "data" / "amazon_sentiment.tsv", ["positive", "negative"],
         {"positive": "good", "negative": "bad"}, {"1": "positive", "0": "negative"}),
    Task("topics", HERE / "data" / "debian_topics.tsv", ["games", "graphics", "sound", "email", "database"],
         {"games": "video games", "graphics": "images", "sound": "audio", "email": "mail", "database": "data storage"}),
]


@dataclass
class Scored:
    """One configuration's answers on a task's documents."""

    accuracy: float
    macro_f1: float
    seconds: float
    probabilities: list[list[float]]  # per document, in the labels' order given
    share_of_top_label: float  # how much of the answers the most answered label takes


def run(engine: Engine, task: Task, rows: list[tuple[str, str]], labels: list[str] | None = None,
        **spec: Any) -> Scored:
    """Calibrated label scoring of `rows` under `spec` (layout, template, instruction), `labels` renamed
    or reordered; the answers mapped back to the task's labels."""
    labels = labels or task.labels
    back = dict(zip(labels, _original(task, labels), strict=True))
    calibration.clear_priors()  # every configuration pays for its priors
    reset_prefix_cache(engine)
    started, results = time.perf_counter(), []
    for start in range(0, len(rows), BLOCK_DOCS):
        results += classify(engine, [ClassifyRequest(text=text, labels=labels, **spec)
                                     for text, _ in rows[start: start + BLOCK_DOCS]])
    seconds = time.perf_counter() - started
    failed = [r.error for r in results if r.classification is None]
    if failed:
        raise SystemExit(f"{task.name}: {len(failed)} documents failed, e.g. {failed[0]}")
    answers = [back[r.classification.label] for r in results if r.classification]
    probabilities = [[r.classification.probabilities[label] for label in labels]
                     for r in results if r.classification]
    return _scored(task, rows, answers, [_reorder(p, labels, task) for p in probabilities], seconds)


def _original(task: Task, labels: list[str]) -> list[str]:
    renamed = {other: label for label, other in task.other_names.items()}
    return [renamed.get(label, label) for label in labels]


def _reorder(probabilities: list[float], labels: list[str], task: Task) -> list[float]:
    by_label = dict(zip(_original(task, labels), probabilities, strict=True))
    return [by_label[label] for label in task.labels]


def _scored(task: Task, rows: list[tuple[str, str]], answers: list[str], probabilities: list[list[float]],
            seconds: float) -> Scored:
    golds = [gold for _, gold in rows]
    metrics = single_label_metrics(golds, answers, [max(p) for p in probabilities], task.labels)
    top = max(answers.count(label) for label in task.labels) / len(answers)
    return Scored(sum(a == g for a, g in zip(answers, golds, strict=True)) / len(rows), metrics["macro_f1"], seconds,
                  probabilities, top)


def ensemble(task: Task, rows: list[tuple[str, str]], parts: list[Scored]) -> Scored:
    """What a batch without an instruction answers: the wordings' calibrated probabilities averaged."""
    averaged = [calibration.average(list(per_doc)) for per_doc in zip(*(p.probabilities for p in parts), strict=True)]
    answers = [task.labels[max(range(len(p)), key=p.__getitem__)] for p in averaged]
    return _scored(task, rows, answers, averaged, sum(p.seconds for p in parts))


def tune(engine: Engine, data: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """Every format under every default wording on the tuning rows; the format whose ensemble does best
    on average over the tasks."""
    table: dict[str, Any] = {}
    for fmt in FORMATS:
        name = f"{fmt['layout']}, {fmt['template']}"
        table[name] = {"format": fmt, "tasks": {}}
        for task in TASKS:
            rows = data[task.name]
            parts = [run(engine, task, rows, instruction=wording, **fmt) for wording in DEFAULT_INSTRUCTIONS]
            together = ensemble(task, rows, parts)
            singles = [p.accuracy for p in parts]
            table[name]["tasks"][task.name] = {"ensemble": together.accuracy, "wordings": singles,
                                               "spread": max(singles) - min(singles)}
            print(f"tune {name:<26} {task.name:<10} ensemble {together.accuracy:.3f}  wordings "
                  + " ".join(f"{a:.3f}" for a in singles), flush=True)
        table[name]["score"] = sum(t["ensemble"] for t in table[name]["tasks"].values()) / len(TASKS)
    chosen = max(table, key=lambda name: table[name]["score"])
    return {"formats": table, "chosen": chosen}


def report(engine: Engine, data: dict[str, list[tuple[str, str]]], fmt: dict[str, Any]) -> dict[str, Any]:
    """On the held-out rows: the chosen format's ensemble (as the product runs it), its wordings one by
    one, reversed labels, other names, and the previous default."""
    out: dict[str, Any] = {}
    for task in TASKS:
        rows = data[task.name]
        together = run(engine, task, rows, **fmt)  # instruction None: the ensemble, timed as a worker runs it
        singles = [run(engine, task, rows, instruction=wording, **fmt) for wording in DEFAULT_INSTRUCTIONS]
        reversed_labels = run(engine, task, rows, labels=task.labels[::-1], **fmt)
        renamed = run(engine, task, rows, labels=[task.other_names[label] for label in task.labels], **fmt)
        previous = run(engine, task, rows, **PREVIOUS)
        variants = [together.accuracy, reversed_labels.accuracy, renamed.accuracy]
        out[task.name] = {
            "documents": len(rows),
            "ensemble": _figures(together), "wordings": {w: _figures(s) for w, s in zip(DEFAULT_INSTRUCTIONS, singles,
                                                                                      strict=True)},
            "wording_spread": max(s.accuracy for s in singles) - min(s.accuracy for s in singles),
            "reversed_labels": _figures(reversed_labels), "other_names": _figures(renamed),
            "order_and_names_spread": max(variants) - min(variants), "previous_default": _figures(previous),
            "ensemble_over_one_wording_seconds": together.seconds / (sum(s.seconds for s in singles) / len(singles)),
        }
        print(f"report {task.name}: ensemble {together.accuracy:.3f}, previous {previous.accuracy:.3f}", flush=True)
    return out


def _figures(scored: Scored) -> dict[str, float]:
    return {"accuracy": scored.accuracy, "macro_f1": scored.macro_f1, "seconds": scored.seconds,
            "top_label_share": scored.share_of_top_label}


def table(result: dict[str, Any]) -> str:
    lines = [(f"{result['engine']}, {MODEL}; tuned on {result['tune_docs']} even lines per task, reported on "
             f"{result['docs']} odd lines"), "", "tuning (even lines): ensemble accuracy per task, mean",
             f"{'format':<28} " + " ".join(f"{t.name:>10}" for t in TASKS) + f" {'mean':>7} {'spread':>7}"]
    for name, row in result["tuning"]["formats"].items():
        spreads = max(t["spread"] for t in row["tasks"].values())
        mark = " <- chosen" if name == result["tuning"]["chosen"] else ""
        lines.append(f"{name:<28} " + " ".join(f"{row['tasks'][t.name]['ensemble']:>10.3f}" for t in TASKS)
                     + f" {row['score']:>7.3f} {spreads:>7.3f}{mark}")
    lines += ["", f"held out (odd lines), {result['tuning']['chosen']}:",
              (f"{'task':<10} {'ensemble':>9} {'F1':>6} {'top share':>9} {'wordings min-max':>17} {'spread':>7} "
              f"{'reversed':>9} {'renamed':>8} {'previous':>9} {'cost x':>7}")]
    for name, row in result["report"].items():
        accuracies = [w["accuracy"] for w in row["wordings"].values()]
        lines.append(f"{name:<10} {row['ensemble']['accuracy']:>9.3f} {row['ensemble']['macro_f1']:>6.3f} "
                     f"{row['ensemble']['top_label_share']:>9.2f} {min(accuracies):>8.3f}-{max(accuracies):.3f} "
                     f"{row['wording_spread']:>7.3f} {row['reversed_labels']['accuracy']:>9.3f} "
                     f"{row['other_names']['accuracy']:>8.3f} {row['previous_default']['accuracy']:>9.3f} "
                     f"{row['ensemble_over_one_wording_seconds']:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zero_shot", description=__doc__.splitlines()[0])
    parser.add_argument("--tune-docs", type=int, default=200, help="even lines per task to choose on (200)")
    parser.add_argument("--docs", type=int, default=500, help="odd lines per task to report on (500)")
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    everything = {task.name: task.load() for task in TASKS}
    tuning = {name: rows[0::2][: args.tune_docs] for name, rows in everything.items()}
    held_out = {name: rows[1::2][: args.docs] for name, rows in everything.items()}
    engine = load_engine(MODEL, args.engine, Settings())
    try:
        tuned = tune(engine, tuning)
        reported = report(engine, held_out, tuned["formats"][tuned["chosen"]]["format"])
    finally:
        engine.close()
    result = {"model": MODEL, "engine": args.engine, "tune_docs": args.tune_docs, "docs": args.docs,
              "wordings": list(DEFAULT_INSTRUCTIONS), "tuning": tuned, "report": reported}
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    raise SystemExit(main())
