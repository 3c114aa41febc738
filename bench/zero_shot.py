"""Zero-shot classification that holds up: the prompt format chosen on one half of two tasks' data, and
reported on the other half, with the spread across wordings, label orders and label names.

    python -m bench.zero_shot [--tune-docs 200] [--docs 500] [--engine vllm|transformers] [--json PATH]

Two tasks: sentiment (shared/data/amazon_sentiment.tsv: review sentences, positive/negative) and topics
(bench/data/debian_topics.tsv: Debian package descriptions, five archive sections). Even lines tune,
odd lines report; nothing measured on the odd lines takes part in a choice.

Tuning, calibrated label scoring on the first --tune-docs even lines of each task. Question formats:
text first or question first, chat template or plain text, each under every question of
worker/kinds/classify_prompt.DEFAULT_INSTRUCTIONS; the format's score is its ensemble's accuracy (the
wordings' calibrated probabilities averaged, as a batch without an instruction does) averaged over the
two tasks. The cue format (plain text, no question: a lead such as `Text:`, the text, then an answer cue
such as `Label:`): every candidate lead under every candidate cue alone; the lead whose cues do best on
average, and its ENSEMBLE_SIZE best cues, make its ensemble and score. The best format is chosen; the
product's defaults (classify_prompt's TEXT_LEAD and DEFAULT_CUES) are checked against the choice.
Reporting, on the first --docs odd lines: the product's default as a worker runs it (timed, against one
wording alone), each of its wordings alone, every other candidate cue alone (what a cue picked blind
would give), the ensemble of every ENSEMBLE_SIZE of the candidate cues (what the default owes to which
cues were picked), the default with the labels in reverse order and under other names, and the two previous
defaults: the question-first chat ensemble of DEFAULT_INSTRUCTIONS (2026-12-01 to 12-03) and one generic
question before that.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.classify import reset_prefix_cache
from producer.evaluation import single_label_metrics
from schema.kinds.classify import ClassifyRequest
from schema.settings import Settings
from worker.engines import load_engine
from worker.engines.base import Engine
from worker.kinds import calibration, classify_prompt
from worker.kinds.classify import classify
from worker.kinds.classify_prompt import DEFAULT_INSTRUCTIONS

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
FORMATS: list[dict[str, Any]] = [{"layout": layout, "template": template}
           for layout, template in itertools.product(["text-first", "question-first"], ["chat", "plain"])]
CUE_FORMAT = "text and answer cue, plain"
LEADS = ["Text:", "Document:", "Input:"]  # candidates, written after one look at the tuning lines only
CUES = ["Label:", "Category:", "Class:", "Type:", "Tag:", "Topic:", "Answer:", "Classification:"]
ENSEMBLE_SIZE = 4  # cues averaged: as many as the default questions
PREVIOUS: dict[str, Any] = {"layout": "question-first", "template": "chat"}  # the questions' ensemble, to 2026-12-03
OLDER: dict[str, Any] = {**PREVIOUS, "instruction": "Which of these labels fits the text best: {labels}?"}
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


@contextmanager
def asked_as(lead: str | None = None, cues: list[str] | None = None) -> Iterator[None]:
    """The cue format under a candidate lead or cues instead of the product's (classify_prompt reads
    them when it builds each prompt)."""
    saved = classify_prompt.TEXT_LEAD, classify_prompt.DEFAULT_CUES
    classify_prompt.TEXT_LEAD = lead or saved[0]
    classify_prompt.DEFAULT_CUES = tuple(cues) if cues else saved[1]
    try:
        yield
    finally:
        classify_prompt.TEXT_LEAD, classify_prompt.DEFAULT_CUES = saved


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
    """Every format on the tuning rows (question formats under every default question, the cue format
    under every candidate lead and cue); the format whose ensemble does best on average over the tasks."""
    table: dict[str, Any] = {}
    for fmt in FORMATS:
        name = f"{fmt['layout']}, {fmt['template']}"
        parts = {task.name: [run(engine, task, data[task.name], instruction=wording, **fmt)
                             for wording in DEFAULT_INSTRUCTIONS] for task in TASKS}
        table[name] = _tuned(name, {"format": fmt}, data, parts)
    singles = {(lead, cue, task.name): _alone_with(engine, task, data[task.name], lead, cue)
               for lead in LEADS for task in TASKS for cue in CUES}

    def mean(lead: str, cue: str) -> float:  # rounded, so that equal counts tie exactly: the first listed wins
        return round(sum(singles[lead, cue, task.name].accuracy for task in TASKS) / len(TASKS), 6)

    lead = max(LEADS, key=lambda candidate: round(sum(mean(candidate, cue) for cue in CUES), 6))
    cues = sorted(CUES, key=lambda cue: -mean(lead, cue))[:ENSEMBLE_SIZE]
    table[CUE_FORMAT] = _tuned(CUE_FORMAT, {"format": {"template": "plain"}, "lead": lead, "cues": cues,
                                            "candidates": {f"{le} {cue}": round(mean(le, cue), 4)
                                                           for le in LEADS for cue in CUES}},
                               data, {task.name: [singles[lead, cue, task.name] for cue in cues] for task in TASKS})
    chosen = max(table, key=lambda name: table[name]["score"])
    product = (classify_prompt.TEXT_LEAD, list(classify_prompt.DEFAULT_CUES))
    return {"formats": table, "chosen": chosen,
            "product_defaults_match": chosen == CUE_FORMAT and product == (lead, cues)}


def _alone_with(engine: Engine, task: Task, rows: list[tuple[str, str]], lead: str, cue: str) -> Scored:
    with asked_as(lead, [cue]):
        scored = run(engine, task, rows, template="plain")
    print(f"tune {lead} ... {cue:<16} {task.name:<10} {scored.accuracy:.3f}", flush=True)
    return scored


def _tuned(name: str, entry: dict[str, Any], data: dict[str, list[tuple[str, str]]],
           parts: dict[str, list[Scored]]) -> dict[str, Any]:
    """A format's tuning row: per task its ensemble over `parts` (one per wording) and their spread."""
    entry["tasks"] = {}
    for task in TASKS:
        together = ensemble(task, data[task.name], parts[task.name])
        singles = [p.accuracy for p in parts[task.name]]
        entry["tasks"][task.name] = {"ensemble": together.accuracy, "wordings": singles,
                                     "spread": max(singles) - min(singles)}
        print(f"tune {name:<26} {task.name:<10} ensemble {together.accuracy:.3f}  wordings "
              + " ".join(f"{a:.3f}" for a in singles), flush=True)
    entry["score"] = sum(t["ensemble"] for t in entry["tasks"].values()) / len(TASKS)
    return entry


def report(engine: Engine, data: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """On the held-out rows: the product's default for a batch without an instruction (as a worker runs
    it), each of its cues alone, the other candidate cues alone, reversed labels, other names, and the
    previous defaults."""
    out: dict[str, Any] = {}
    for task in TASKS:
        rows = data[task.name]
        together = run(engine, task, rows)  # no spec: what a worker asks a batch without an instruction
        singles = {cue: _alone(engine, task, rows, cue) for cue in classify_prompt.DEFAULT_CUES}
        others = {cue: _alone(engine, task, rows, cue) for cue in CUES if cue not in singles}
        reversed_labels = run(engine, task, rows, labels=task.labels[::-1])
        renamed = run(engine, task, rows, labels=[task.other_names[label] for label in task.labels])
        previous, older = run(engine, task, rows, **PREVIOUS), run(engine, task, rows, **OLDER)
        variants = [together.accuracy, reversed_labels.accuracy, renamed.accuracy]
        every = [s.accuracy for s in [*singles.values(), *others.values()]]
        # what the default owes to which cues were picked: the ensemble of every ENSEMBLE_SIZE candidates
        picks = [ensemble(task, rows, list(chosen)).accuracy
                 for chosen in itertools.combinations([*singles.values(), *others.values()], ENSEMBLE_SIZE)]
        out[task.name] = {
            "documents": len(rows),
            "ensemble": _figures(together), "wordings": {c: _figures(s) for c, s in singles.items()},
            "wording_spread": max(s.accuracy for s in singles.values()) - min(s.accuracy for s in singles.values()),
            "other_cues": {c: _figures(s) for c, s in others.items()}, "every_cue_spread": max(every) - min(every),
            "any_cues_ensembles": {"count": len(picks), "min": min(picks), "max": max(picks),
                                   "spread": max(picks) - min(picks)},
            "reversed_labels": _figures(reversed_labels), "other_names": _figures(renamed),
            "order_and_names_spread": max(variants) - min(variants), "previous_default": _figures(previous),
            "older_default": _figures(older),
            "ensemble_over_one_wording_seconds": together.seconds / (sum(s.seconds for s in singles.values())
                                                                     / len(singles)),
        }
        print(f"report {task.name}: default {together.accuracy:.3f}, previous {previous.accuracy:.3f}", flush=True)
    return out


def _alone(engine: Engine, task: Task, rows: list[tuple[str, str]], cue: str) -> Scored:
    with asked_as(cues=[cue]):
        return run(engine, task, rows)


def _figures(scored: Scored) -> dict[str, float]:
    return {"accuracy": scored.accuracy, "macro_f1": scored.macro_f1, "seconds": scored.seconds,
            "top_label_share": scored.share_of_top_label}


def table(result: dict[str, Any]) -> str:
    tuning = result["tuning"]
    lines = [(f"{result['engine']}, {MODEL}; tuned on {result['tune_docs']} even lines per task, reported on "
             f"{result['docs']} odd lines"), "", "tuning (even lines): ensemble accuracy per task, mean",
             f"{'format':<28} " + " ".join(f"{t.name:>10}" for t in TASKS) + f" {'mean':>7} {'spread':>7}"]
    for name, row in tuning["formats"].items():
        spreads = max(t["spread"] for t in row["tasks"].values())
        mark = " <- chosen" if name == tuning["chosen"] else ""
        lines.append(f"{name:<28} " + " ".join(f"{row['tasks'][t.name]['ensemble']:>10.3f}" for t in TASKS)
                     + f" {row['score']:>7.3f} {spreads:>7.3f}{mark}")
    cue = tuning["formats"][CUE_FORMAT]
    lines += [f"cue format: lead {cue['lead']!r}, cues {cue['cues']} (mean accuracy of each candidate alone: "
              + ", ".join(f"{k} {v:.3f}" for k, v in cue["candidates"].items()) + ")",
              "the product's defaults " + ("match the choice" if tuning["product_defaults_match"]
                                           else "DO NOT match the choice"), "",
              f"held out (odd lines), the default ({classify_prompt.TEXT_LEAD} ... {classify_prompt.DEFAULT_CUES}):",
              (f"{'task':<10} {'default':>8} {'F1':>6} {'top share':>9} {'cues min-max':>13} {'spread':>7} "
               f"{'any cue':>12} {f'any {ENSEMBLE_SIZE} cues':>12} {'reversed':>9} {'renamed':>8} {'previous':>9} {'older':>6} "
               f"{'cost x':>7}")]
    for name, row in result["report"].items():
        accuracies = [w["accuracy"] for w in row["wordings"].values()]
        every = accuracies + [w["accuracy"] for w in row["other_cues"].values()]
        lines.append(f"{name:<10} {row['ensemble']['accuracy']:>8.3f} {row['ensemble']['macro_f1']:>6.3f} "
                     f"{row['ensemble']['top_label_share']:>9.2f} {min(accuracies):>6.3f}-{max(accuracies):.3f} "
                     f"{row['wording_spread']:>7.3f} {min(every):>6.3f}-{max(every):.3f} "
                     f"{row['any_cues_ensembles']['min']:>6.3f}-{row['any_cues_ensembles']['max']:.3f} "
                     f"{row['reversed_labels']['accuracy']:>9.3f} {row['other_names']['accuracy']:>8.3f} "
                     f"{row['previous_default']['accuracy']:>9.3f} {row['older_default']['accuracy']:>6.3f} "
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
        reported = report(engine, held_out)
    finally:
        engine.close()
    result = {"model": MODEL, "engine": args.engine, "tune_docs": args.tune_docs, "docs": args.docs,
              "questions": list(DEFAULT_INSTRUCTIONS), "lead": classify_prompt.TEXT_LEAD,
              "cues": list(classify_prompt.DEFAULT_CUES), "tuning": tuned, "report": reported}
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    raise SystemExit(main())
