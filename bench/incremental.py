"""What a nightly re-run costs: a schedule over 2,000 documents run three times: first (all new), again
unchanged, then with 5% of the documents changed. Each run goes the whole way (read the glob source,
submit, the result cache, run on a real engine in this process, finish the run); reports engine seconds
(time in the engine's chunks) and wall seconds per run, and each re-run's engine time as a share of the
first's. Targets: unchanged <= 2%, 5% changed <= 8%.
    python -m bench.incremental [--docs 2000] [--engine transformers|vllm] [--max-tokens 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from producer.scheduler import Scheduler
from producer.schedules import load
from producer.service import Service
from schema.db import get_sessionmaker
from schema.queue import Queue
from schema.settings import Settings
from schema.tables import Item
from worker import executor
from worker.engine_loop import EngineLoop
from worker.engines import load_engine
from worker.runtime import Runtime

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_sentiment.tsv"
MODEL = "smollm2-135m-instruct"
CHUNK = 128


def write_docs(folder: Path, n: int, revision: int = 0, changed: int = 0) -> None:
    """n documents of two review sentences each; the first `changed` get another text in this revision."""
    sentences = [line.split("\t")[0] for line in DATA.read_text(encoding="utf-8").splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = f"{sentences[i % len(sentences)]} {sentences[(i * 7 + 1) % len(sentences)]}"
        if i < changed:
            text += f" (revised {revision})"
        (folder / f"{i:05d}.txt").write_text(text, encoding="utf-8")


def one_run(scheduler: Scheduler, runtime: Runtime) -> dict[str, Any]:
    started = time.perf_counter()
    run = scheduler.fire(scheduler.schedules["nightly"], datetime.now(UTC), manual=True)
    assert run is not None and run.batch_id is not None, run
    engine_s = 0.0
    with get_sessionmaker(runtime.settings.database_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == run.batch_id, Item.status == "queued")
                                   .order_by(Item.line)))
    for start in range(0, len(ids), CHUNK):
        clock = time.perf_counter()
        executor.run_chunk(runtime, run.batch_id, ids[start:start + CHUNK])
        engine_s += time.perf_counter() - clock
    finished = scheduler.finish(run.id)
    assert finished.status == "succeeded", finished.error
    return {"items": finished.items, "new": finished.new, "changed": finished.changed, "cached": finished.unchanged,
            "to_engine": len(ids), "engine_s": engine_s, "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--engine", default="transformers")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_docs(work / "docs", args.docs)
        (work / "schedules.toml").write_text(
            '[[schedule]]\nname = "nightly"\ncron = "30 2 * * *"\nsource = { glob = "docs/*.txt" }\n'
            f'task = {{ kind = "generate", system = "Summarise the review in a few words.", '
            f'max_tokens = {args.max_tokens}, temperature = 0 }}\n')
        settings = Settings(database_url=f"sqlite:///{work / 'bench.db'}", broker_url="filesystem://",
                            home=work / ".gristmill", max_items_per_batch=max(args.docs * 2, 10_000))
        scheduler = Scheduler(Service(settings), load(work / "schedules.toml"))
        engine = load_engine(MODEL, args.engine, settings)
        loop = EngineLoop(engine)
        runtime = Runtime(settings, engine, loop, queue=Queue(settings))
        try:
            runs = {"first": one_run(scheduler, runtime), "unchanged": one_run(scheduler, runtime)}
            write_docs(work / "docs", args.docs, revision=1, changed=args.docs // 20)
            runs["5% changed"] = one_run(scheduler, runtime)
        finally:
            loop.close()
            engine.close()
    first = runs["first"]["engine_s"]
    for run in runs.values():
        run["engine_share"] = run["engine_s"] / first
    print(f"{args.docs} documents, {args.engine} engine, {MODEL}, max_tokens {args.max_tokens}; "
          f"{platform.machine()}, {platform.processor() or 'cpu'}")
    print(f"{'run':<12} {'items':>6} {'new':>5} {'changed':>7} {'cached':>6} {'to engine':>9} {'engine s':>9} "
          f"{'wall s':>7} {'engine share':>12}")
    for name, r in runs.items():
        print(f"{name:<12} {r['items']:>6} {r['new']:>5} {r['changed']:>7} {r['cached']:>6} {r['to_engine']:>9} "
              f"{r['engine_s']:>9.2f} {r['wall_s']:>7.2f} {r['engine_share']:>11.1%}")
    print(f"targets: unchanged <= 2% ({runs['unchanged']['engine_share']:.1%}), "
          f"5% changed <= 8% ({runs['5% changed']['engine_share']:.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": datetime.now(UTC).isoformat(), "docs": args.docs,
                                               "engine": args.engine, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
