"""How long an urgent small batch waits behind a huge one: a 64-item batch submitted right after a
20,000-item one, against the same small batch on an idle worker, on Redis + PostgreSQL with the
no-inference engine (the pipeline's ordering, not an engine's speed, is measured).

Two cases: the small batch `high` behind a `low` huge one (the target: within 3x of idle), and both
`normal` (a batch's first chunks go at its level, the rest one level lower, so it should start after
the huge batch's first chunks). A batch's time is its completed_at minus its created_at, from SQL.
    python -m bench.priority [--rounds 3] [--huge 20000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.overhead import NULL_ENGINE, write_items
from bench.services import fresh_services, worker_process
from producer import api
from schema.db import get_sessionmaker, seconds_between
from schema.tables import Batch

SMALL = 64


def batch_seconds(settings: Any, batch_id: str) -> float:
    with get_sessionmaker(settings.database_url)() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.status == "completed", batch_id
        return seconds_between(batch.created_at, batch.completed_at) or float("nan")


def small_batch_s(settings: Any, small: Path, priority: str, huge: Path | None, huge_priority: str) -> float:
    """The small batch's time from submission to completion, submitted right after the huge one if given."""
    big = api.submit(huge, settings=settings, priority=huge_priority, cache=False) if huge else None
    handle = api.submit(small, settings=settings, priority=priority, cache=False)
    handle.wait(timeout=600, poll_s=0.02)
    if big is not None:
        big.wait(timeout=3600, poll_s=0.2)
    return batch_seconds(settings, handle.id)


def measure(rounds: int, huge_n: int, workdir: Path) -> dict[str, Any]:
    with fresh_services(workdir, max_items_per_batch=max(huge_n, 100_000)) as settings, \
            worker_process(settings, NULL_ENGINE, workdir / "worker.log"):
        small, huge = write_items(workdir / "small.jsonl", SMALL), write_items(workdir / "huge.jsonl", huge_n)
        api.submit(write_items(workdir / "warmup.jsonl", 1000), settings=settings).wait(timeout=300)
        runs: dict[str, list[float]] = {"idle_s": [], "behind_low_s": [], "behind_same_s": []}
        for _ in range(rounds):  # interleaved, so a drift of the machine touches every case alike
            runs["idle_s"].append(small_batch_s(settings, small, "high", None, ""))
            runs["behind_low_s"].append(small_batch_s(settings, small, "high", huge, "low"))
            runs["behind_same_s"].append(small_batch_s(settings, small, "normal", huge, "normal"))
    ratios = {"priority_delay_ratio": [b / i for b, i in zip(runs["behind_low_s"], runs["idle_s"], strict=True)],
              "same_priority_delay_ratio": [b / i for b, i in zip(runs["behind_same_s"], runs["idle_s"], strict=True)]}
    report: dict[str, Any] = {"huge_items": huge_n, "small_items": SMALL, "rounds": rounds, "runs": {**runs, **ratios}}
    for key, values in {**runs, **ratios}.items():
        report[key] = statistics.median(values)
        report[key + "_range"] = [min(values), max(values)]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--huge", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gristmill-priority-") as tmp:
        report = measure(args.rounds, args.huge, Path(tmp))
    print(f"\n{'small batch of ' + str(SMALL):<34} {'median':>10} {'range':>18} {'target':>8}")
    for key, target in (("idle_s", ""), ("behind_low_s", ""), ("behind_same_s", ""),
                        ("priority_delay_ratio", "<= 3"), ("same_priority_delay_ratio", "")):
        low, high = report[key + "_range"]
        print(f"{key:<34} {report[key]:>10.3f} {f'{low:.3f}-{high:.3f}':>18} {target:>8}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
