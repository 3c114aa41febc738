"""Classification: accuracy, macro-F1, expected calibration error and documents/s of calibrated label
scoring, uncalibrated scoring, guided choice, few-shot scoring and a probe, on the labelled review
sentences in shared/data/amazon_sentiment.tsv.

    python -m bench.classify [--quick] [--json PATH] [--engine vllm|transformers] [--half odd|even] [--wordings]

The measured half (the odd lines by default) is never learned from: the other half is the labelled data
few-shot prompts take their examples from (2 and 8 per label, chosen as `--examples` chooses) and the probe
learns from (its first 200 texts, the middle layer; its learning time is reported apart, as a probe is
learned once and reused). All methods run the same instruction on the same loaded engine, each over
every document in one call to worker.kinds.classify (what a worker does per chunk). Before the timed
runs each method runs once on 128 synthetic documents, so warm-up (kernels for larger batch shapes,
grammar compilation) is not charged to whichever method runs first. The timed runs go in blocks of 250
documents, the methods taking turns on each block in a rotating order, two passes over all documents:
machine load from anything else falls on every method alike. Every run starts from an empty prefix
cache and, for calibrated scoring, with no cached prior: estimating it (three content-free inputs) is
part of the time of every block, as if each were a new worker. `--wordings` adds calibrated scoring's
accuracy under five instructions and their spread.
Targets: calibrated accuracy >= 0.82, few-shot (8 per label) >= 0.85, probe >= 0.85 at >= 3x calibrated docs/s,
spread across wordings <= 0.05.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from producer.evaluation import single_label_metrics
from schema.kinds.classify import ClassifyRequest
from schema.settings import Settings
from worker.engines import load_engine
from worker.engines.base import Engine, HiddenStates
from worker.kinds import calibration, probe
from worker.kinds.classify import classify

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_sentiment.tsv"
MODEL = "smollm2-135m-instruct"
LABELS = ["positive", "negative"]
INSTRUCTION = "What is the sentiment of this review?"
QUICK_DOCS = 100
# Warm-up documents of our own (none is timed, so no timed document is ever cached beforehand), as many
# as a full engine step holds, so that the first timed method does not pay for warming larger shapes.
WARMUP = [(f"Review {i}: the {thing} {verdict}, and " + "I used it every day for a while. " * (i % 4), label)
          for i, (thing, verdict, label) in enumerate([
              ("case", "fits well", "positive"), ("charger", "stopped working", "negative"),
              ("headset", "sounds clear", "positive"), ("battery", "drains fast", "negative")] * 32)]
ROUNDS = 2  # timed passes over the documents
BLOCK_DOCS = 250  # documents per timed run: about one full engine batch (256 sequences)
PROBE_TRAINING = 200  # labelled texts a probe learns from
METHODS: dict[str, dict[str, Any]] = {  # name -> what the request asks (the other half: examples, probe)
    "calibrated scoring": {"method": "score", "calibrate": True},
    "uncalibrated scoring": {"method": "score", "calibrate": False},
    "guided choice": {"method": "choice", "calibrate": False},
    "few-shot (8 per label)": {"method": "score", "calibrate": True, "shots": 8},  # the default: plain text
    "few-shot (2 per label)": {"method": "score", "calibrate": True, "shots": 2},
    "few-shot uncalibrated (8 per label)": {"method": "score", "calibrate": False, "shots": 8},
    # the examples as earlier chat turns: the default before 2026-12-02
    "few-shot as chat turns (8 per label)": {"method": "score", "calibrate": True, "shots": 8, "template": "chat"},
    f"probe ({PROBE_TRAINING} labelled)": {"method": "probe", "probe": "bench"},
}
WORDINGS = [  # instructions whose spread `--wordings` reports (the first is the default's choice)
    INSTRUCTION, "Is this review positive or negative?", "What is the sentiment of this product review?",
    "Is the sentiment of this review positive or negative?", "How does the customer feel about the product?",
]


@dataclass
class Run:
    method: str
    docs: int
    seconds: float
    accuracy: float
    failed: int
    macro_f1: float = 0.0
    ece: float = 0.0

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds


def load(path: Path = DATA) -> list[tuple[str, str]]:
    """(sentence, label) pairs; the file's 1 is positive, 0 negative."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            text, gold = line.rsplit("\t", 1)
            rows.append((text, LABELS[0] if gold.strip() == "1" else LABELS[1]))
    return rows


@dataclass
class Labelled:
    """What the methods that learn get from the other half: few-shot examples, and a learned probe."""

    examples: list[dict[str, str]]
    probe: probe.Trained | None = None
    probe_seconds: float = 0.0


def requests(rows: list[tuple[str, str]], instruction: str, labelled: Labelled, **spec: Any) -> list[ClassifyRequest]:
    if "shots" in spec:
        spec["examples"] = labelled.examples
    return [ClassifyRequest(text=text, labels=LABELS, instruction=instruction, **spec) for text, _ in rows]


def learn_probe(engine: Engine, pool: list[tuple[str, str]]) -> Labelled:
    """A probe from the first PROBE_TRAINING texts of the other half, on the middle layer (its time is
    reported apart: a probe is learned once and reused)."""
    layered = cast(HiddenStates, engine)
    layer = layered.num_hidden_layers // 2
    started = time.perf_counter()
    vectors = [e.vector for e in layered.hidden_states([text for text, _ in pool[:PROBE_TRAINING]], layer)]
    weights, _ = probe.fit(np.array(vectors), [[gold] for _, gold in pool[:PROBE_TRAINING]], LABELS, False)
    return Labelled([{"text": text, "label": gold} for text, gold in pool],
                    probe.Trained("bench", layer, LABELS, False, weights), time.perf_counter() - started)


def measure(engine: Engine, name: str, rows: list[tuple[str, str]], instruction: str, labelled: Labelled) -> Run:
    batch = requests(rows, instruction, labelled, **METHODS[name])
    calibration.clear_priors()  # the calibrated run pays for estimating its prior
    reset_prefix_cache(engine)
    started = time.perf_counter()
    results = classify(engine, batch, {"bench": labelled.probe} if labelled.probe else None)
    seconds = time.perf_counter() - started
    answered = [(r.classification, gold) for r, (_, gold) in zip(results, rows, strict=True) if r.classification]
    scores = single_label_metrics([gold for _, gold in answered], [c.label for c, _ in answered],
                                  [c.probabilities[c.label] for c, _ in answered], LABELS)
    right = sum(1 for c, gold in answered if c.label == gold)
    return Run(name, len(rows), seconds, right / len(rows), sum(1 for r in results if r.error), scores["macro_f1"],
               scores["ece"])


def rounds(engine: Engine, names: list[str], rows: list[tuple[str, str]], instruction: str,
           count: int, labelled: Labelled) -> list[Run]:
    """Every method over every document `count` times, interleaved: the documents go in blocks, and
    the methods take turns on each block in a rotating order, so that load from anything else on the
    machine falls on all methods alike. One Run per method, with the summed time (the answers are
    deterministic, so the accuracy is the first round's)."""
    blocks = [rows[start : start + BLOCK_DOCS] for start in range(0, len(rows), BLOCK_DOCS)]
    done: dict[str, list[Run]] = {name: [] for name in names}
    for round_ in range(count):
        for index, block in enumerate(blocks):
            turn = (round_ + index) % len(names)
            for name in names[turn:] + names[:turn]:
                done[name].append(measure(engine, name, block, instruction, labelled))
    first = len(blocks)  # the first round's runs

    def weighted(runs: list[Run], figure: str) -> float:
        return sum(getattr(r, figure) * r.docs for r in runs[:first]) / len(rows)

    return [Run(name, sum(r.docs for r in runs), sum(r.seconds for r in runs), weighted(runs, "accuracy"),
                sum(r.failed for r in runs[:first]), weighted(runs, "macro_f1"), weighted(runs, "ece"))
            for name, runs in done.items()]


def wordings(engine: Engine, rows: list[tuple[str, str]], labelled: Labelled) -> dict[str, float]:
    """Calibrated scoring's accuracy under each wording of WORDINGS (one untimed pass each)."""
    return {wording: measure(engine, "calibrated scoring", rows, wording, labelled).accuracy for wording in WORDINGS}


def reset_prefix_cache(engine: Engine) -> None:
    """Every method starts from an empty vLLM prefix cache: they all send the same prompts."""
    llm = getattr(engine, "_llm", None)  # VLLMEngine's vllm.LLM; transformers keeps no cache across calls
    if llm is not None:
        llm.reset_prefix_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.classify", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"the first {QUICK_DOCS} documents only")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--half", choices=["even", "odd"], default="odd",
                        help="the lines measured (odd); the other half is labelled data for few-shot and probes")
    parser.add_argument("--wordings", action="store_true", help="also calibrated scoring's accuracy per wording")
    parser.add_argument("--instruction", default=INSTRUCTION)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed passes over the documents ({ROUNDS}); "
                        "the answers are deterministic, so more passes only steady the docs/s")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    args = parser.parse_args(argv)

    everything = load()
    rows, pool = (everything[0::2], everything[1::2]) if args.half == "even" else (everything[1::2], everything[0::2])
    rows = rows[:QUICK_DOCS] if args.quick else rows
    engine = load_engine(MODEL, args.engine, Settings())
    try:
        names = [m.strip() for m in args.methods.split(",")]
        labelled = learn_probe(engine, pool) if any(METHODS[n]["method"] == "probe" for n in names) else \
            Labelled([{"text": text, "label": gold} for text, gold in pool])
        for name in names:
            measure(engine, name, WARMUP, args.instruction, labelled)
        runs = rounds(engine, names, rows, args.instruction, 1 if args.quick else args.rounds, labelled)
        spread = wordings(engine, rows, labelled) if args.wordings else {}
    finally:
        engine.close()
    report = summary(runs, rows, args, labelled, spread)
    print(table(runs, report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def summary(runs: list[Run], rows: list[tuple[str, str]], args: argparse.Namespace, labelled: Labelled,
            spread: dict[str, float]) -> dict[str, Any]:
    by_name = {run.method: run for run in runs}
    calibrated = by_name.get("calibrated scoring")
    ratios = {f"{name} / calibrated scoring docs/s": run.docs_per_s / calibrated.docs_per_s
              for name, run in by_name.items() if calibrated and run is not calibrated}
    return {
        "model": MODEL, "engine": args.engine, "instruction": args.instruction, "labels": LABELS,
        "documents": len(rows), "rounds": 1 if args.quick else args.rounds, "half": args.half,
        "runs": {run.method: {"accuracy": run.accuracy, "macro_f1": run.macro_f1, "ece": run.ece,
                              "docs_per_s": run.docs_per_s, "seconds": run.seconds, "failed": run.failed}
                 for run in runs},
        "ratios": ratios, "probe_learning_seconds": labelled.probe_seconds,
        "wordings": spread, "wording_spread": (max(spread.values()) - min(spread.values())) if spread else None,
        "targets": {"calibrated_accuracy": 0.82, "few_shot_accuracy": 0.85, "probe_accuracy": 0.85,
                    "probe_over_calibrated_docs_per_s": 3.0, "wording_spread": 0.05},
    }


def table(runs: list[Run], report: dict[str, Any]) -> str:
    lines = [(f"{report['engine']}, {MODEL}, {report['documents']} documents ({report['half']} lines) x "
              f"{report['rounds']} timed rounds, instruction {report['instruction']!r}"),
             f"{'method':<36} {'accuracy':>9} {'macro-F1':>9} {'ECE':>6} {'docs/s':>8} {'seconds':>8} {'failed':>7}"]
    lines += [f"{r.method:<36} {r.accuracy:>9.3f} {r.macro_f1:>9.3f} {r.ece:>6.3f} {r.docs_per_s:>8.2f} "
              f"{r.seconds:>8.1f} {r.failed:>7}" for r in runs]
    lines += [f"{name}: {ratio:.2f}" for name, ratio in report["ratios"].items()]
    if report["probe_learning_seconds"]:
        lines.append(f"the probe learned from {PROBE_TRAINING} texts in {report['probe_learning_seconds']:.1f} s "
                     f"(once; not in its docs/s)")
    if report["wordings"]:
        lines += [f"calibrated scoring, {wording!r}: {accuracy:.3f}" for wording, accuracy in report["wordings"].items()]
        lines.append(f"spread across wordings (max - min): {report['wording_spread']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    raise SystemExit(main())
