"""Long documents: a fixed set of documents of 0.5 to 4 contexts (the long descriptions of the Python
packages installed here, concatenated to known lengths), summarised three ways on a real engine in this
process: `fail` (too long: context_length_exceeded), `truncate` (head) and `map-reduce`. Reports the
share of documents answered, engine seconds, prompt and output tokens/s, and map-reduce's engine time
against its own windows run as one flat batch (target: at most 1.15x: the reduce and the bookkeeping
add little). The context is GRISTMILL_MAX_MODEL_LEN-style `--context` (1,024 by default: CPU-sized).
    python -m bench.long_documents [--docs 200] [--context 1024] [--engine vllm] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from producer import api
from schema.db import get_sessionmaker
from schema.jobs import SamplingParams
from schema.queue import Queue
from schema.settings import Settings
from schema.tables import Item
from worker import executor
from worker.engine_loop import EngineLoop
from worker.engines import load_engine
from worker.runtime import Runtime

MODEL = "smollm2-135m-instruct"
INSTRUCTION = "Summarise what this Python package does in one sentence."
LENGTHS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # in contexts, cycled over the documents
CHARS_PER_TOKEN = 4  # roughly, for English package descriptions: lengths are approximate, and fixed
CHUNK = 64


def descriptions() -> list[str]:
    """The long descriptions of the installed distributions, in name order (a fixed corpus here)."""
    found = {}
    for dist in importlib.metadata.distributions():
        text = (dist.metadata.get_payload() or dist.metadata.get("Description") or "").strip()  # type: ignore[attr-defined]
        if len(text) > 400:
            found[dist.metadata["Name"].lower()] = text
    return [found[name] for name in sorted(found)]


def documents(n: int, context: int) -> list[str]:
    """n documents, the i-th LENGTHS[i % 6] contexts long, each from consecutive descriptions."""
    corpus, docs, at = descriptions(), [], 0
    for i in range(n):
        want, text = int(LENGTHS[i % len(LENGTHS)] * context * CHARS_PER_TOKEN), ""
        while len(text) < want:
            text += corpus[at % len(corpus)] + "\n\n"
            at += 1
        docs.append(text[:want])
    return docs


def run_to_end(runtime: Runtime, batch_id: str) -> float:
    """Run the batch's queued items in chunks until none is queued (windows, then reduces); engine seconds."""
    engine_s = 0.0
    while True:
        with get_sessionmaker(runtime.settings.database_url)() as session:
            ids = list(session.scalars(select(Item.id).where(Item.batch_id == batch_id, Item.status == "queued")
                                       .order_by(Item.id)))
        if not ids:
            return engine_s
        for start in range(0, len(ids), CHUNK):
            clock = time.perf_counter()
            executor.run_chunk(runtime, batch_id, ids[start:start + CHUNK])
            engine_s += time.perf_counter() - clock


def measure(runtime: Runtime, path: Path, **options: Any) -> dict[str, Any]:
    handle = api.submit(path, settings=runtime.settings, cache=False, **options)
    engine_s = run_to_end(runtime, handle.id)
    stats = handle.stats()
    return {"batch": handle.id, "documents": stats["items"], "answered": stats["succeeded"] / stats["items"],
            "engine_s": engine_s, "prompt_tokens": stats["prompt_tokens"], "output_tokens": stats["completion_tokens"],
            "prompt_tokens_per_s": stats["prompt_tokens"] / engine_s, "output_tokens_per_s":
            stats["completion_tokens"] / engine_s, "truncated_items": stats["truncated_items"]}


def windows_as_flat_batch(settings: Settings, batch_id: str, path: Path) -> Path:
    """Map-reduce's windows (every round's), as OpenAI lines of one plain batch: the same engine work
    without the reduce and the waiting."""
    with get_sessionmaker(settings.database_url)() as session:
        rows = session.execute(select(Item.id, Item.request).where(Item.batch_id == batch_id,
                                                                   Item.parent_id.is_not(None))).all()
    lines = [{"custom_id": f"w{item_id}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": request["messages"], "max_tokens": request["sampling"]["max_tokens"]}}
             for item_id, request in rows]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        settings = Settings(database_url=f"sqlite:///{work / 'bench.db'}", home=work / "home",
                            max_model_len=args.context)
        docs = work / "docs.jsonl"
        docs.write_text("".join(json.dumps({"id": f"d{i:03d}", "text": text}) + "\n"
                                for i, text in enumerate(documents(args.docs, args.context))))
        engine = load_engine(MODEL, args.engine, settings=settings)
        loop = EngineLoop(engine)
        runtime = Runtime(settings, engine, loop, queue=Queue(settings))
        common = {"system_prompt": INSTRUCTION}
        try:
            rows = {
                "fail": measure(runtime, docs, sampling=SamplingParams(max_tokens=args.max_tokens), **common),
                "truncate head": measure(runtime, docs, sampling=SamplingParams(max_tokens=args.max_tokens,
                                                                                truncate="head"), **common),
                "map-reduce": measure(runtime, docs, sampling=SamplingParams(max_tokens=args.max_tokens),
                                      long={"long_documents": "map-reduce"}, **common),
            }
            flat = windows_as_flat_batch(settings, rows["map-reduce"]["batch"], work / "flat.jsonl")
            rows["its windows, flat"] = measure(runtime, flat)
        finally:
            loop.close()
            engine.close()
    ratio = rows["map-reduce"]["engine_s"] / rows["its windows, flat"]["engine_s"]
    print(f"{args.docs} documents of {', '.join(f'{x:g}' for x in LENGTHS)} contexts ({args.context} tokens), "
          f"{args.engine}, max_tokens {args.max_tokens}")
    print(f"{'run':<20} {'items':>6} {'answered':>9} {'engine s':>9} {'prompt tok/s':>13} {'output tok/s':>13}")
    for name, row in rows.items():
        print(f"{name:<20} {row['documents']:>6} {row['answered']:>9.0%} {row['engine_s']:>9.1f} "
              f"{row['prompt_tokens_per_s']:>13.0f} {row['output_tokens_per_s']:>13.1f}")
    print(f"map-reduce engine time / its windows flat: {ratio:.3f} (target <= 1.15)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "docs": args.docs,
                                               "context": args.context, "engine": args.engine, "runs": rows,
                                               "map_reduce_over_flat": ratio}, indent=2))


if __name__ == "__main__":
    main()
