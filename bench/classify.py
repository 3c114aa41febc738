"""Classification: accuracy and documents/s of calibrated label scoring, uncalibrated scoring and
guided choice, on the labelled review sentences in shared/data/amazon_sentiment.tsv.

    python -m bench.classify [--quick] [--json PATH] [--engine vllm|transformers] [--half even|odd]

All three methods run the same prompt (the instruction below, then the sentence) on the same loaded
engine, each over every document in one call to worker.kinds.classify (what a worker does per chunk).
Before the timed runs each method runs once on 128 synthetic documents, so warm-up (kernels for
larger batch shapes, grammar compilation) is not charged to whichever method runs first. The timed
runs go in blocks of 250 documents, the methods taking turns on each block in a rotating order, two
passes over all documents: machine load from anything else falls on every method alike. Every run
starts from an empty prefix cache and, for calibrated scoring, with no cached prior: estimating it
(three content-free inputs) is part of the time of every block, as if each were a new worker.
Target: calibrated accuracy >= 0.82 and calibrated docs/s >= guided-choice docs/s.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schema.kinds.classify import ClassifyRequest
from schema.settings import Settings
from worker.engines import load_engine
from worker.engines.base import Engine
from worker.kinds import calibration
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
METHODS = {  # name -> what the request asks for
    "calibrated scoring": {"method": "score", "calibrate": True},
    "uncalibrated scoring": {"method": "score", "calibrate": False},
    "guided choice": {"method": "choice", "calibrate": False},
}


@dataclass
class Run:
    method: str
    docs: int
    seconds: float
    accuracy: float
    failed: int

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


def requests(rows: list[tuple[str, str]], instruction: str, **spec: Any) -> list[ClassifyRequest]:
    return [ClassifyRequest(text=text, labels=LABELS, instruction=instruction, **spec) for text, _ in rows]


def measure(engine: Engine, name: str, rows: list[tuple[str, str]], instruction: str) -> Run:
    batch = requests(rows, instruction, **METHODS[name])
    calibration.clear_priors()  # the calibrated run pays for estimating its prior
    _reset_prefix_cache(engine)
    started = time.perf_counter()
    results = classify(engine, batch)
    seconds = time.perf_counter() - started
    right = sum(1 for r, (_, gold) in zip(results, rows, strict=True)
                if r.classification is not None and r.classification.label == gold)
    return Run(name, len(rows), seconds, right / len(rows), sum(1 for r in results if r.error))


def rounds(engine: Engine, names: list[str], rows: list[tuple[str, str]], instruction: str,
           count: int) -> list[Run]:
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
                done[name].append(measure(engine, name, block, instruction))
    first = len(blocks)  # the first round's runs
    return [Run(name, sum(r.docs for r in runs), sum(r.seconds for r in runs),
                sum(r.accuracy * r.docs for r in runs[:first]) / len(rows), sum(r.failed for r in runs[:first]))
            for name, runs in done.items()]


def _reset_prefix_cache(engine: Engine) -> None:
    """Every method starts from an empty vLLM prefix cache: they all send the same prompts."""
    llm = getattr(engine, "_llm", None)  # VLLMEngine's vllm.LLM; transformers keeps no cache across calls
    if llm is not None:
        llm.reset_prefix_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.classify", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"the first {QUICK_DOCS} documents only")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--half", choices=["even", "odd"], help="only the even or odd lines (tuning / checking)")
    parser.add_argument("--instruction", default=INSTRUCTION)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    args = parser.parse_args(argv)

    rows = load()
    if args.half:
        rows = rows[0::2] if args.half == "even" else rows[1::2]
    rows = rows[:QUICK_DOCS] if args.quick else rows
    engine = load_engine(MODEL, args.engine, Settings())
    try:
        names = [m.strip() for m in args.methods.split(",")]
        for name in names:
            measure(engine, name, WARMUP, args.instruction)
        runs = rounds(engine, names, rows, args.instruction, 1 if args.quick else ROUNDS)
    finally:
        engine.close()
    report = summary(runs, rows, args)
    print(table(runs, report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def summary(runs: list[Run], rows: list[tuple[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    by_name = {run.method: run for run in runs}
    ratio = None
    if "calibrated scoring" in by_name and "guided choice" in by_name:
        ratio = by_name["calibrated scoring"].docs_per_s / by_name["guided choice"].docs_per_s
    return {
        "model": MODEL, "engine": args.engine, "instruction": args.instruction, "labels": LABELS,
        "documents": len(rows), "rounds": 1 if args.quick else ROUNDS, "half": args.half,
        "runs": {run.method: {"accuracy": run.accuracy, "docs_per_s": run.docs_per_s, "seconds": run.seconds,
                              "failed": run.failed} for run in runs},
        "ratio_calibrated_over_guided_docs_per_s": ratio,
        "targets": {"calibrated_accuracy": 0.82, "ratio": 1.0},
    }


def table(runs: list[Run], report: dict[str, Any]) -> str:
    lines = [(f"{report['engine']}, {MODEL}, {report['documents']} documents x {report['rounds']} timed rounds, "
              f"instruction {report['instruction']!r}"),
             f"{'method':<22} {'accuracy':>9} {'docs/s':>8} {'seconds':>8} {'failed':>7}"]
    lines += [f"{r.method:<22} {r.accuracy:>9.3f} {r.docs_per_s:>8.2f} {r.seconds:>8.1f} {r.failed:>7}" for r in runs]
    if report["ratio_calibrated_over_guided_docs_per_s"] is not None:
        lines.append(f"calibrated docs/s over guided-choice docs/s: "
                     f"{report['ratio_calibrated_over_guided_docs_per_s']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    raise SystemExit(main())
