"""Throughput, side by side in one run, on the same prompts, model and sampling parameters.

  (a) bare vllm.LLM.generate over every prompt at once (the ceiling)
  (b) vllm run-batch on the same requests as an OpenAI batch file
  (c) gristmill end to end on Redis + PostgreSQL, one `gristmill worker`: submit until every result is in SQL
  (d) the naive pattern: a Celery task per document, each calling generate on one prompt
  (e) gristmill on the embedded defaults (`gristmill run`), engine start excluded

Engine start-up is excluded everywhere (it is reported); every run is its own process, one at a time.
    python -m bench.throughput [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import prompts
from bench.services import REPO, env_for, fresh_services, stop_tree, worker_process
from schema.settings import Settings
from worker.engines.vllm_engine import CPU_BLOCK_SIZE, vllm_dtype


def _json_result(cmd: list[str], workdir: Path) -> dict[str, Any]:
    """Run a measuring script; it writes its figures to $BENCH_RESULT (vLLM logs to stdout)."""
    result = workdir / "result.json"
    env = {**os.environ, "BENCH_RESULT": str(result), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def run_bare(batch: Path, folder: Path, workdir: Path) -> dict[str, Any]:
    return _json_result([sys.executable, "-m", "bench.bare_vllm", str(batch), "--model-folder", str(folder)],
                        workdir)


def run_vllm_batch(batch: Path, folder: Path, workdir: Path) -> dict[str, Any]:
    return _json_result([sys.executable, "-m", "bench.run_batch_timed", "-i", str(batch), "-o",
                         str(workdir / "run_batch_out.jsonl"), "--model", str(folder), "--max-model-len", "2048",
                         "--dtype", vllm_dtype(), "--enforce-eager", "--disable-log-stats",
                         "--block-size", str(CPU_BLOCK_SIZE),
                         "--served-model-name", Settings().model], workdir)


def run_gristmill_distributed(batch: Path, workdir: Path) -> dict[str, Any]:
    from producer import api

    with fresh_services(workdir) as settings, worker_process(settings, "vllm", workdir / "worker_c.log"):
        warmup = workdir / "warmup.jsonl"
        prompts.write(prompts.build(1, seed=99), warmup)
        api.submit(warmup, settings=settings).wait(timeout=600)  # the engine is loaded and warm
        began = time.perf_counter()
        handle = api.submit(batch, settings=settings)
        info = handle.wait(poll_s=0.05, timeout=7200)
        seconds = time.perf_counter() - began
        stats = handle.stats()
    return {"requests": info.request_counts.total, "failed": info.request_counts.failed,
            "output_tokens": stats["completion_tokens"], "seconds": seconds}


def run_naive(lines: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    from bench import naive_celery

    env = env_for(Settings())
    env["NAIVE_BROKER_URL"] = naive_celery.BROKER
    import redis

    redis.Redis.from_url(naive_celery.BROKER).flushdb()
    with open(workdir / "worker_d.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.naive_celery", "worker", "-P", "solo",
                                 "--loglevel", "WARNING"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        first = naive_celery.generate.delay([{"role": "user", "content": "Hi"}], 4)
        first.get(timeout=600)  # engine loaded
        began = time.perf_counter()
        results = [naive_celery.generate.delay(line["body"]["messages"], line["body"]["max_tokens"]) for line in lines]
        outputs = [r.get(timeout=7200) for r in results]
        seconds = time.perf_counter() - began
    finally:
        stop_tree(proc)
    return {"requests": len(lines), "output_tokens": sum(o["completion_tokens"] for o in outputs), "seconds": seconds}


def run_embedded(batch: Path, workdir: Path) -> dict[str, Any]:
    home = workdir / "embedded"
    home.mkdir()
    settings = Settings(database_url=f"sqlite:///{home / 'gristmill.db'}", home=home / ".gristmill")
    summary_path = home / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "producer.cli", "run", str(batch), "-o", str(home / "out.jsonl"),
                           "--engine", "vllm", "--summary-json", str(summary_path)],
                          env=env_for(settings), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"gristmill run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    return {"requests": summary["items"], "failed": summary["failed"], "output_tokens": summary["completion_tokens"],
            "seconds": summary["wall_s"] - summary["engine_start_s"], "engine_start_s": summary["engine_start_s"]}


RUNS = {
    "a": "bare vllm.LLM.generate, all at once",
    "b": "vllm run-batch",
    "c": "gristmill, Redis + PostgreSQL, 1 worker",
    "d": "naive: Celery task per document",
    "e": "gristmill run (embedded defaults)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 requests instead of 512")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--naive-requests", type=int, help="(d) runs one prompt at a time: a subset (default 64)")
    parser.add_argument("--runs", default="abcde", help="which runs, e.g. 'ac'")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    n = args.requests or (64 if args.quick else 512)
    lines = prompts.build(n)
    naive_n = min(n, args.naive_requests or (32 if args.quick else 64))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from worker.models import prepare

    folder = prepare(Settings().model, Settings().cache_dir)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-") as tmp:
        workdir = Path(tmp)
        batch = prompts.write(lines, workdir / "batch.jsonl")
        steps = {"a": lambda: run_bare(batch, folder, workdir), "b": lambda: run_vllm_batch(batch, folder, workdir),
                 "c": lambda: run_gristmill_distributed(batch, workdir),
                 "d": lambda: run_naive(lines[:naive_n], workdir), "e": lambda: run_embedded(batch, workdir)}
        for key in args.runs:
            print(f"running ({key}) {RUNS[key]} ...", file=sys.stderr, flush=True)
            result = steps[key]()
            if result.get("errors") or result.get("failed"):
                raise RuntimeError(f"run ({key}) had failed requests: {result}")
            result["tokens_per_s"] = result["output_tokens"] / result["seconds"]
            runs[key] = {"name": RUNS[key], **result}
    report = {"requests": n, "machine": _machine(), "runs": runs, "ratios": _ratios(runs)}
    _print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


def _ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    pairs = [("c", "a"), ("c", "b"), ("c", "d"), ("e", "a")]
    return {f"{x}/{y}": runs[x]["tokens_per_s"] / runs[y]["tokens_per_s"] for x, y in pairs if x in runs and y in runs}


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


def _print(report: dict[str, Any]) -> None:
    print(f"\n{report['requests']} requests; {report['machine']}")
    print(f"{'run':<46} {'requests':>8} {'out tokens':>10} {'seconds':>8} {'tokens/s':>9}")
    for key, run in report["runs"].items():
        print(f"({key}) {run['name']:<42} {run['requests']:>8} {run['output_tokens']:>10} "
              f"{run['seconds']:>8.1f} {run['tokens_per_s']:>9.1f}")
    for name, value in report["ratios"].items():
        print(f"{name:<6} {value:.3f}")


if __name__ == "__main__":
    main()
